"""What an eval run shows in W&B: the figures of the report as values, and the answers as tables.

Owns the eval run's content: accuracy per dataset, target and scorer with its 95% interval (`<key>_low`,
`<key>_high`), the paired deltas between targets (`eval/<dataset>/<b>_minus_<a>/<scorer>` with interval and McNemar
p), a typed results table, each target's answers wrong-first, a side-by-side table of every target's answer to the same
questions (questions some target got wrong first), and `accuracy.png`, `report.md` and `eval_table.md`. Reads what
eval_report computes; never changes a record.
"""

from pathlib import Path
from typing import Optional

from looper import eval_report, throughput

ROWS = 200  # answers per table: enough to read, small enough to open


def metrics(results: list[dict], records: dict, scorers: list[str]) -> dict:
    """The flat summary values: accuracies with intervals, truncation, throughput, and the paired deltas."""
    out = {}
    for r in results:
        prefix = f"eval/{r['dataset']}/{r['target']}"
        out[f"{prefix}/n"] = r["n"]
        for scorer in scorers:
            low, high = eval_report.interval(r, scorer)
            out |= {f"{prefix}/acc_{scorer}": r[f"acc_{scorer}"], f"{prefix}/acc_{scorer}_low": low}
            out[f"{prefix}/acc_{scorer}_high"] = high
        out |= {f"{prefix}/{key}": r[key] for key in ("truncated", "think_closed") if key in r}
        out |= throughput.metrics(prefix, r.get("generation", {}))
    for d in eval_report.deltas(results, records, scorers):
        key = f"eval/{d['dataset']}/{d['b']}_minus_{d['a']}/{d['scorer']}"
        out |= {key: d["delta"], f"{key}_low": d["low"], f"{key}_high": d["high"], f"{key}_n": d["n"]}
        if d["p"] is not None:
            out[f"{key}_mcnemar_p"] = d["p"]
    return out


def side_by_side(records: dict, dataset: str, targets: list[str], scorer: str) -> list[dict]:
    """One row per question of `dataset` (its first answer per target): every target's answer, verdict and completion,
    the questions fewest targets got right first, then those the last target got wrong."""
    by_target = {t: {} for t in targets}
    for target in targets:
        for r in records.get((dataset, target), []):
            by_target[target].setdefault(r["id"], r)
    first = by_target[targets[0]]
    rows = []
    for question_id, record in first.items():
        if not all(question_id in by_target[t] for t in targets):
            continue
        row = {"id": question_id, "question": record.get("question"), "gold": record.get("gold")}
        for target in targets:
            answer = by_target[target][question_id]
            row |= {f"{target}_correct": answer[f"correct_{scorer}"], f"{target}_answer": answer[f"pred_{scorer}"]}
            row[f"{target}_completion"] = answer["completion"]
        rows.append(row)
    rows.sort(key=lambda row: (sum(row[f"{t}_correct"] for t in targets), row[f"{targets[-1]}_correct"]))
    return rows[:ROWS]


def log(tracker, results: list[dict], records: dict, scorers: list[str], primary: str, run_dir: Optional[Path]):
    """Everything above into the job's run. The primary accuracies are also logged as values (so a project's panels
    and runs table compare them across runs) and drawn as a bar chart per dataset."""
    values = metrics(results, records, scorers)
    tracker.summary(values)
    tracker.log({key: v for key, v in values.items() if key.endswith(f"/acc_{primary}")})
    for dataset in dict.fromkeys(r["dataset"] for r in results):
        rows = [r for r in results if r["dataset"] == dataset]
        tracker.bars(
            f"eval/{dataset}/accuracy_chart",
            [r["target"] for r in rows],
            [100 * r[f"acc_{primary}"] for r in rows],
            f"{dataset}: accuracy ({primary}, %, n={rows[0]['n']})",
            "accuracy %",
        )
    table = []
    for r in results:
        row = {"dataset": r["dataset"], "target": r["target"], "n": r["n"]}
        for scorer in scorers:
            low, high = eval_report.interval(r, scorer)
            row |= {f"acc_{scorer}": r[f"acc_{scorer}"], f"acc_{scorer}_low": low, f"acc_{scorer}_high": high}
        table.append(row | {k: r[k] for k in ("truncated", "think_closed") if k in r})
    tracker.table("eval/results", table)
    tracker.table("eval/deltas", eval_report.deltas(results, records, scorers))
    for (dataset, target), rows in records.items():
        wrong_first = sorted(rows, key=lambda r: r[f"correct_{primary}"])[:ROWS]
        tracker.table(f"eval/{dataset}/{target}/examples", wrong_first)
    for dataset in dict.fromkeys(r["dataset"] for r in results):
        targets = [r["target"] for r in results if r["dataset"] == dataset]
        if len(targets) > 1:
            tracker.table(f"eval/{dataset}/side_by_side", side_by_side(records, dataset, targets, primary))
    if run_dir is not None:
        tracker.image("eval/accuracy", run_dir / "accuracy.png")
        for name in ("report.md", "eval_table.md"):
            tracker.file(run_dir / name)
