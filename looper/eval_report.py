"""The evaluation report: accuracy with Wilson 95% intervals per scorer, dataset and `cleaning_status`, paired
deltas between targets (bootstrap 95% interval over questions, exact McNemar p-value), and a bar chart."""

from collections import defaultdict
from itertools import combinations
from pathlib import Path

from looper.stats import mcnemar_exact, mean_interval, paired_bootstrap, wilson


def _by_question(rows: list[dict], scorer: str) -> dict:
    """question id -> share of its answers (one, or `eval.samples`) that `scorer` marks correct."""
    verdicts = defaultdict(list)
    for r in rows:
        verdicts[r["id"]].append(r[f"correct_{scorer}"])
    return {key: sum(v) / len(v) for key, v in verdicts.items()}


def accuracy_summary(records: list[dict], scorers: list[str]) -> dict:
    """n (answers), accuracy and correct count per scorer, overall and by `cleaning_status` (when the dataset has
    one); with several sampled answers per question, `questions`, `samples` and each scorer's interval over
    questions (`ci_<scorer>`); the share of answers cut at the token limit (`truncated`) and, for reasoning models,
    of think blocks closed (`think_closed`)."""

    def block(rows):
        out = {"n": len(rows)}
        for s in scorers:
            out[f"correct_{s}"] = sum(r[f"correct_{s}"] for r in rows)
            out[f"acc_{s}"] = out[f"correct_{s}"] / len(rows) if rows else 0.0
        questions = len({r["id"] for r in rows})
        if rows and questions < len(rows):
            out["questions"], out["samples"] = questions, len(rows) // questions
            for s in scorers:
                out[f"ci_{s}"] = list(mean_interval(list(_by_question(rows, s).values())))
        return out

    summary = block(records)
    if records and "truncated" in records[0]:
        summary["truncated"] = sum(r["truncated"] for r in records) / len(records)
    if records and "think_closed" in records[0]:
        summary["think_closed"] = sum(r["think_closed"] for r in records) / len(records)
    statuses = defaultdict(list)
    for r in records:
        if r.get("cleaning_status") is not None:
            statuses[r["cleaning_status"]].append(r)
    if statuses:
        summary["by_status"] = {status: block(rows) for status, rows in sorted(statuses.items())}
    return summary


def interval(block: dict, scorer: str) -> tuple[float, float]:
    """The 95% interval of a summary block's accuracy: over questions for sampled answers, else Wilson."""
    if f"ci_{scorer}" in block:
        return tuple(block[f"ci_{scorer}"])
    return wilson(block[f"correct_{scorer}"], block["n"])


def _cell(block: dict, scorer: str) -> str:
    low, high = interval(block, scorer)
    return f"{100 * block[f'acc_{scorer}']:.1f}% [{100 * low:.1f}, {100 * high:.1f}]"


def table(results: list[dict], scorers: list[str], primary: str) -> str:
    """The headline table: one row per dataset and target, one accuracy column per scorer (primary first)."""
    ordered = [primary] + [s for s in scorers if s != primary]
    truncation = any("truncated" in r for r in results)
    lines = [
        "| dataset | target | n | "
        + " | ".join(f"acc_{s}" for s in ordered)
        + (" | truncated |" if truncation else " |"),
        "| --- | --- | --- | " + " | ".join("---" for _ in ordered) + (" | --- |" if truncation else " |"),
    ]
    for r in results:
        lines.append(
            f"| {r['dataset']} | {r['target']} | {r['n']} | "
            + " | ".join(f"{100 * r[f'acc_{s}']:.1f}%" for s in ordered)
            + (f" | {100 * r.get('truncated', 0.0):.1f}% |" if truncation else " |")
        )
    return "\n".join(lines)


def _paired(a: list[dict], b: list[dict], scorer: str) -> tuple[list, list]:
    """Per question answered by both: the verdicts (bools), or with sampled answers the share correct."""
    first, second = _by_question(a, scorer), _by_question(b, scorer)
    common = [key for key in second if key in first]
    sampled = len(first) < len(a) or len(second) < len(b)
    convert = float if sampled else bool
    return [convert(first[key]) for key in common], [convert(second[key]) for key in common]


def deltas(results: list[dict], records: dict, scorers: list[str]) -> list[dict]:
    """Every pair of targets evaluated on the same dataset (A before B in eval.targets' order), per scorer: the paired
    delta B - A over the questions both answered, its bootstrap 95% interval, the discordant counts and the exact
    McNemar p-value (None for sampled answers, where verdicts are shares)."""
    found = []
    for dataset in dict.fromkeys(r["dataset"] for r in results):
        rows = [r for r in results if r["dataset"] == dataset]
        for first, second in combinations(rows, 2):
            for scorer in scorers:
                a, b = _paired(records[(dataset, first["target"])], records[(dataset, second["target"])], scorer)
                low, high = paired_bootstrap(a, b)
                found.append(
                    {
                        "dataset": dataset,
                        "a": first["target"],
                        "b": second["target"],
                        "scorer": scorer,
                        "n": len(a),
                        "delta": (sum(b) - sum(a)) / max(len(a), 1),
                        "low": low,
                        "high": high,
                        "only_a": sum(x > y for x, y in zip(a, b)),
                        "only_b": sum(y > x for x, y in zip(a, b)),
                        "p": mcnemar_exact(a, b) if all(isinstance(x, bool) for x in a + b) else None,
                    }
                )
    return found


def report(results: list[dict], records: dict, scorers: list[str], primary: str) -> str:
    """report.md: accuracy with intervals, accuracy by cleaning_status, paired deltas with p-values."""
    out = [
        "# Evaluation report",
        "",
        "Every target answers the same questions (greedy unless eval.temperature > 0). Accuracy with a 95% "
        "interval (Wilson; over questions for several sampled answers per question). Truncated: answers cut at "
        f"the token limit. Primary scorer: `{primary}`.",
        "",
    ]
    ordered = [primary] + [s for s in scorers if s != primary]
    for dataset in dict.fromkeys(r["dataset"] for r in results):
        rows = [r for r in results if r["dataset"] == dataset]
        out += [
            f"## {dataset}",
            "",
            "| target | n | " + " | ".join(ordered) + " | truncated |",
            "| --- | --- | " + " | ".join("---" for _ in ordered) + " | --- |",
        ]
        out += [
            f"| {r['target']} | {r['n']} | "
            + " | ".join(_cell(r, s) for s in ordered)
            + (f" | {100 * r['truncated']:.1f}% |" if "truncated" in r else " | — |")
            for r in rows
        ]
        statuses = sorted({status for r in rows for status in r.get("by_status", {})})
        if statuses:
            out += [
                "",
                "### By cleaning_status",
                "",
                "| cleaning_status | target | n | " + " | ".join(ordered) + " |",
                "| --- | --- | --- | " + " | ".join("---" for _ in ordered) + " |",
            ]
            for status in statuses:
                for r in rows:
                    block = r.get("by_status", {}).get(status)
                    if block:
                        out.append(
                            f"| {status} | {r['target']} | {block['n']} | "
                            + " | ".join(_cell(block, s) for s in ordered)
                            + " |"
                        )
        if len(rows) > 1:
            out += [
                "",
                "### Paired deltas (B − A, same questions)",
                "",
                "| A → B | scorer | n | delta | bootstrap 95% | only A right | only B right | McNemar p |",
                "| --- | --- | --- | --- | --- | --- | --- | --- |",
            ]
            for d in deltas(rows, records, ordered):
                exact = f"{d['p']:.3g}" if d["p"] is not None else "—"
                out.append(
                    f"| {d['a']} → {d['b']} | {d['scorer']} | {d['n']} | {100 * d['delta']:+.1f} | "
                    f"[{100 * d['low']:+.1f}, {100 * d['high']:+.1f}] | {d['only_a']} | {d['only_b']} | {exact} |"
                )
        out.append("")
    return "\n".join(out)


def plot(results: list[dict], scorers: list[str], path: Path, title: str = "") -> None:
    """Grouped bars: accuracy (%, as the tables give it) per target and scorer, each bar labelled with its value, one
    panel per dataset, Wilson 95% error bars; `title` names the run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = list(dict.fromkeys(r["dataset"] for r in results))
    fig, axes = plt.subplots(1, len(datasets), figsize=(5 * len(datasets), 4), squeeze=False)
    for ax, dataset in zip(axes[0], datasets):
        rows = [r for r in results if r["dataset"] == dataset]
        width = 0.8 / len(scorers)
        for i, scorer in enumerate(scorers):
            accs = [100 * r[f"acc_{scorer}"] for r in rows]
            bounds = [tuple(100 * b for b in interval(r, scorer)) for r in rows]
            errors = [[a - lo for a, (lo, _) in zip(accs, bounds)], [hi - a for a, (_, hi) in zip(accs, bounds)]]
            bars = ax.bar([x + i * width for x in range(len(rows))], accs, width, yerr=errors, capsize=3, label=scorer)
            ax.bar_label(bars, fmt="%.1f", fontsize=7, padding=2)
        ax.set_xticks([x + width * (len(scorers) - 1) / 2 for x in range(len(rows))], [r["target"] for r in rows])
        ax.set_ylim(0, 105)
        ax.set_title(f"{dataset} (n={rows[0]['n']})")
        ax.set_ylabel("accuracy, %")
    axes[0][0].legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write(run_dir: Path, results: list[dict], records: dict, scorers: list[str], primary: str) -> None:
    """Write eval_table.md, report.md and accuracy.png into the run directory."""
    (run_dir / "eval_table.md").write_text(table(results, scorers, primary) + "\n")
    (run_dir / "report.md").write_text(report(results, records, scorers, primary))
    plot(results, scorers, run_dir / "accuracy.png", f"accuracy: {run_dir.parent.name}/{run_dir.name}")
