"""Sweep report: `python -m looper.report SWEEP_DIR` — no W&B needed.

Reads every job's `summary.json` under SWEEP_DIR (multirun/<date>/<time>) and writes, next to them:
- `sweep.csv`: one row per job, every tabulated parameter and every metric;
- `sweep.md`: the jobs best first by the chosen accuracy, with Wilson 95% intervals, and beside it the same target's
  accuracy on the other datasets (test sets: reported, never ranked on);
- figures of whatever was swept (`seed` aside: seeds are aggregated, their mean drawn with their spread), each as PNG
  and SVG:
  - one swept parameter: `sweep_<key>`, the accuracy on each dataset against it, with intervals (95% Wilson for one
    seed, min-max over seeds for several) and the SFT policy as a dashed baseline when the jobs evaluated `sft`;
  - two or more: `heatmap_<x>_<y>`, one panel per value of the other parameters, every panel on one colour scale,
    cells in percent.
By default the accuracy is the jobs' objective (primary scorer, last eval target, a dev split: never a test set
unless the jobs set eval.select_on to one); `--dataset`, `--target` and `--scorer` choose another.
"""

import argparse
import csv
import json
import math
from pathlib import Path
from typing import Optional

from looper.stats import wilson


def load_jobs(sweep_dir: Path) -> list[dict]:
    """The summaries of the finished jobs of a sweep that evaluated (others are skipped), in job order."""
    jobs = []
    for path in sorted(
        sweep_dir.rglob("summary.json"),
        key=lambda p: [int(x) if x.isdigit() else x for x in p.parent.relative_to(sweep_dir).parts],
    ):
        summary = json.loads(path.read_text())
        if "objective" not in summary:  # (a job that did not evaluate: nothing to compare)
            continue
        summary["job"] = str(path.parent.relative_to(sweep_dir))
        summary["params"] = {**summary.get("params", {}), **overridden(summary.get("overrides", []))}
        jobs.append(summary)
    return jobs


def overridden(overrides: list[str]) -> dict:
    """{key: value} of a job's command-line overrides (`key=value`, `+key=value`, `group=option`), values read as
    YAML (numbers as numbers), leaving out where things go (`paths.*`, `hydra.*`, `logger.*`): the sweep's own
    parameters, whatever was swept."""
    import yaml

    from looper.tracking import PLACES, override_key

    out = {}
    for item in overrides:
        key, value = override_key(item), item.partition("=")[2]
        if key.startswith(PLACES) or "/" in key:
            continue
        try:
            out[key] = yaml.safe_load(value)
        except yaml.YAMLError:
            out[key] = value
    return out


def accuracy(job: dict, dataset: Optional[str], target: Optional[str], scorer: Optional[str]) -> tuple:
    """(accuracy, correct, n) of one job for the chosen dataset/target/scorer (defaults: the job's objective)."""
    dataset = dataset or job["objective"]["dataset"]
    target = target or job["objective"]["target"]
    scorer = scorer or job["primary_scorer"]
    counts = job["counts"][f"{dataset}/{target}"]
    return job["metrics"][f"{dataset}/{target}/acc_{scorer}"], counts[f"correct_{scorer}"], counts["n"]


def varied(jobs: list[dict]) -> list[str]:
    """The parameters that differ between jobs (any key the sweep's overrides set, and the usual hyperparameters)."""
    keys = list(dict.fromkeys(k for j in jobs for k in j["params"]))
    return [k for k in keys if len({json.dumps(j["params"].get(k), default=str) for j in jobs}) > 1]


def write_csv(jobs: list[dict], path: Path) -> None:
    params = list(dict.fromkeys(k for j in jobs for k in j["params"]))
    metrics = sorted({m for j in jobs for m in j["metrics"]})
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["job", *params, *metrics])
        for j in jobs:
            writer.writerow([j["job"], *(j["params"].get(p) for p in params), *(j["metrics"].get(m) for m in metrics)])


def beside(jobs: list[dict], choice: tuple) -> list[str]:
    """The other datasets the ranked target was evaluated on (shown next to the ranking, not ranked on)."""
    dataset, target, scorer = choice
    found = []
    for j in jobs:
        chosen = dataset or j["objective"]["dataset"]
        suffix = f"/{target or j['objective']['target']}/acc_{scorer or j['primary_scorer']}"
        found += [m[: -len(suffix)] for m in j["metrics"] if m.endswith(suffix) and not m.startswith(chosen + "/")]
    return list(dict.fromkeys(found))


def table(jobs: list[dict], keys: list[str], choice: tuple) -> str:
    """Markdown, best job first: varied parameters, accuracy with its Wilson 95% interval, n, then the same target's
    accuracy on the other datasets."""
    rows = sorted(jobs, key=lambda j: -accuracy(j, *choice)[0])
    others = beside(jobs, choice)
    lines = [
        "| rank | job | "
        + " | ".join(keys)
        + " | selected on: accuracy [95% CI] | n |"
        + "".join(f" {d} |" for d in others),
        "| --- | --- | " + " | ".join("---" for _ in keys) + " | --- | --- |" + " --- |" * len(others),
    ]
    for rank, j in enumerate(rows, start=1):
        acc, correct, n = accuracy(j, *choice)
        low, high = wilson(correct, n)
        extra = ""
        for d in others:
            try:
                extra += f" {100 * accuracy(j, d, choice[1], choice[2])[0]:.1f}% |"
            except KeyError:
                extra += " — |"
        lines.append(
            f"| {rank} | {j['job']} | "
            + " | ".join(str(j["params"].get(k)) for k in keys)
            + f" | {100 * acc:.1f}% [{100 * low:.1f}, {100 * high:.1f}] | {n} |"
            + extra
        )
    return "\n".join(lines)


def points(jobs: list[dict], keys: list[str], choice: tuple, target: Optional[str] = None) -> dict:
    """{values of `keys`: (mean accuracy over seeds, low, high, seeds)} for the chosen dataset and scorer and `target`
    (default: the chosen one). One seed: the Wilson 95% interval; several: the seeds' min and max. Jobs that did not
    evaluate the target on the dataset are left out."""
    groups: dict = {}
    for job in jobs:
        try:
            acc, correct, n = accuracy(job, choice[0], target or choice[1], choice[2])
        except KeyError:
            continue
        groups.setdefault(tuple(job["params"].get(k) for k in keys), []).append((acc, correct, n))
    out = {}
    for values, runs in sorted(groups.items(), key=lambda item: [_sortable(v) for v in item[0]]):
        accs = [acc for acc, _, _ in runs]
        low, high = wilson(runs[0][1], runs[0][2]) if len(runs) == 1 else (min(accs), max(accs))
        out[values] = (sum(accs) / len(accs), low, high, len(runs))
    return out


def _has(job: dict, choice: tuple) -> bool:
    try:
        accuracy(job, *choice)
    except KeyError:
        return False
    return True


def _sortable(value) -> tuple:
    return (0, value, "") if isinstance(value, (int, float)) else (1, 0, str(value))


def log_axis(xs: list) -> bool:
    """Whether swept values span a decade or more (all positive numbers): they go on a log axis."""
    numeric = [x for x in xs if isinstance(x, (int, float)) and not isinstance(x, bool)]
    return len(numeric) == len(xs) >= 2 and min(numeric) > 0 and max(numeric) / min(numeric) >= 10


def dodge(x: float, index: int, count: int, log: bool, width: float) -> float:
    """x of series `index` of `count` drawn at the same swept value, spread over a small share of the axis so their
    error bars do not hide each other (multiplicative on a log axis)."""
    shift = (index - (count - 1) / 2) * 0.04 * width
    return x * 10**shift if log else x + shift


def honest_ylim(lows: list[float], highs: list[float], span: float = 10.0) -> tuple[float, float]:
    """y-limits (percent) around the data and its intervals, at least `span` points tall and within 0-100, so a
    half-point difference does not fill the figure."""
    low, high = min(lows), max(highs)
    pad = max(0.0, span - (high - low)) / 2 + 1.0
    low, high = max(0.0, low - pad), min(100.0, high + pad)
    if high - low < span:  # (pushed against 0 or 100)
        low, high = (0.0, span) if low == 0.0 else (100.0 - span, 100.0)
    return low, high


def _save(fig, out_dir: Path, stem: str) -> list[Path]:
    paths = [out_dir / f"{stem}.png", out_dir / f"{stem}.svg"]
    fig.savefig(paths[0], dpi=120)
    fig.savefig(paths[1])
    return paths


def _datasets(jobs: list[dict], choice: tuple) -> list[str]:
    """The chosen dataset first, then the others the target was evaluated on."""
    return [choice[0] or jobs[0]["objective"]["dataset"], *beside(jobs, choice)]


def line_plot(jobs: list[dict], key: str, choice: tuple, out_dir: Path) -> list[Path]:
    """Accuracy against the one swept parameter: a line per dataset with intervals, the SFT baseline dashed."""
    plt = _pyplot()
    target = choice[1] or jobs[0]["objective"]["target"]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    seeds = 1
    xs_all = sorted({job["params"].get(key) for job in jobs}, key=_sortable)
    numeric = all(isinstance(x, (int, float)) for x in xs_all)
    log = log_axis(xs_all)
    place = (lambda x: x) if numeric else (lambda x: xs_all.index(x))
    width = (math.log10(max(xs_all) / min(xs_all)) if log else max(xs_all) - min(xs_all)) if numeric else 1.0
    datasets = [d for d in _datasets(jobs, choice) if points(jobs, [key], (d, choice[1], choice[2]))]
    lows, highs, n = [], [], set()
    for index, (colour, dataset) in enumerate(zip(colours, datasets)):
        chosen = (dataset, choice[1], choice[2])
        found = points(jobs, [key], chosen)
        xs = [dodge(place(v[0]), index, len(datasets), log, width or 1.0) for v in found]
        means = [100 * p[0] for p in found.values()]
        below = [100 * (p[0] - p[1]) for p in found.values()]
        above = [100 * (p[2] - p[0]) for p in found.values()]
        lows += [100 * p[1] for p in found.values()]
        highs += [100 * p[2] for p in found.values()]
        seeds = max(seeds, *(p[3] for p in found.values()))
        n |= {accuracy(j, dataset, choice[1], choice[2])[2] for j in jobs if _has(j, chosen)}
        ax.errorbar(xs, means, yerr=[below, above], marker="o", capsize=4, color=colour, label=f"{target}, {dataset}")
        baseline = points(jobs, [key], chosen, target="sft") if target != "sft" else {}
        if baseline:
            level = [100 * p[0] for p in baseline.values()]
            lows, highs = lows + level, highs + level
            ax.plot(
                [place(v[0]) for v in baseline],
                level,
                linestyle="--",
                color=colour,
                alpha=0.7,
                label=f"sft, {dataset}",
            )
    if log:
        ax.set_xscale("log")
    if not numeric:
        ax.set_xticks(range(len(xs_all)), [str(x) for x in xs_all])
    if lows:
        ax.set_ylim(*honest_ylim(lows, highs))
    ax.set_xlabel(key)
    ax.set_ylabel(f"accuracy, % ({choice[2] or jobs[0]['primary_scorer']})")
    spread = "min-max over seeds" if seeds > 1 else "Wilson 95% interval"
    questions = f"n={'/'.join(str(v) for v in sorted(n))}" if n else ""
    ax.set_title(f"{target} accuracy against {key} ({spread}, {questions})", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    written = _save(fig, out_dir, f"sweep_{key}")
    plt.close(fig)
    return written


def heatmaps(jobs: list[dict], keys: list[str], choice: tuple, out_dir: Path) -> list[Path]:
    """Accuracy over the first two swept parameters, one panel per value of the others, on one colour scale."""
    plt = _pyplot()
    x_key, y_key, rest = keys[0], keys[1], keys[2:]
    found = points(jobs, [x_key, y_key, *rest], choice)
    xs = sorted({v[0] for v in found}, key=_sortable)
    ys = sorted({v[1] for v in found}, key=_sortable)
    panels = sorted({v[2:] for v in found}, key=lambda p: [_sortable(v) for v in p])
    means = [100 * p[0] for p in found.values()]
    low, high = min(means), max(means)
    flat = high - low < 1  # a flat sweep: one colour, the values written in the cells, no scale to read a range from
    if flat:
        low, high = low - 0.5, high + 0.5
    fig, axes = plt.subplots(
        1,
        len(panels),
        figsize=(1.8 + (1.3 * len(xs) + 0.5) * len(panels), 1.8 + 0.8 * len(ys)),
        squeeze=False,
        sharey=True,
        layout="constrained",
    )
    seeds = max(p[3] for p in found.values())
    for ax, panel in zip(axes[0], panels):
        grid = [[float("nan")] * len(xs) for _ in ys]
        for values, (mean, *_) in found.items():
            if values[2:] == panel:
                grid[ys.index(values[1])][xs.index(values[0])] = 100 * mean
        image = ax.imshow(grid, origin="lower", cmap="viridis", aspect="auto", vmin=low, vmax=high)
        for y, row in enumerate(grid):
            for x, value in enumerate(row):
                if value == value:  # not NaN
                    dark = (value - low) / (high - low) < 0.6  # viridis is dark at the bottom of its scale
                    ax.text(x, y, f"{value:.1f}", ha="center", va="center", color="white" if dark else "black")
        ax.set_xticks(range(len(xs)), [str(x) for x in xs])
        ax.set_yticks(range(len(ys)), [str(y) for y in ys])
        ax.set_xlabel(x_key)
        ax.set_title(", ".join(f"{k}={v}" for k, v in zip(rest, panel)) or "accuracy", fontsize=9)
    axes[0][0].set_ylabel(y_key)
    dataset = choice[0] or jobs[0]["objective"]["dataset"]
    target, scorer = choice[1] or jobs[0]["objective"]["target"], choice[2] or jobs[0]["primary_scorer"]
    n = sorted({accuracy(j, *choice)[2] for j in jobs if _has(j, choice)})
    seeds_text = f"mean of {seeds} seeds" if seeds > 1 else "one seed"
    fig.suptitle(f"{target} accuracy, % on {dataset} ({scorer}; n={'/'.join(map(str, n))}; {seeds_text})", fontsize=10)
    if not flat:
        bar = fig.colorbar(image, ax=list(axes[0]))
        bar.set_label(f"accuracy, % ({seeds_text})")
    written = _save(fig, out_dir, f"heatmap_{x_key}_{y_key}")
    plt.close(fig)
    return written


def figures(jobs: list[dict], choice: tuple, out_dir: Path) -> list[Path]:
    """The figures that fit what was swept (seeds aside): a line plot for one parameter, heatmaps for more."""
    keys = [k for k in varied(jobs) if k != "seed"]
    if not keys:
        return []
    if len(keys) == 1:
        return line_plot(jobs, keys[0], choice, out_dir)
    return heatmaps(jobs, keys, choice, out_dir)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def log_to_wandb(sweep_dir: Path, jobs: list[dict], written: list[Path]) -> None:
    """One W&B run (job_type `report`) in the sweep's group, with the figures, their SVGs, sweep.md and the jobs as a
    typed table; project, entity and mode as the jobs logged (their `wandb_runs.jsonl`, `.hydra/config.yaml`)."""
    import wandb
    from omegaconf import OmegaConf

    from looper.tracking import Tracker

    first = sweep_dir / jobs[0]["job"]
    runs = (
        [json.loads(line) for line in (first / "wandb_runs.jsonl").read_text().splitlines()]
        if (first / "wandb_runs.jsonl").exists()
        else []
    )
    logger = OmegaConf.load(first / ".hydra" / "config.yaml").logger
    run = wandb.init(
        project=logger.project,
        entity=logger.entity,
        group=runs[0]["group"] if runs else sweep_dir.name,
        mode=runs[0]["mode"] if runs else "offline",
        job_type="report",
        name=f"report:{sweep_dir.name}",
        dir=str(sweep_dir),
        settings=wandb.Settings(silent=True),
    )
    tracker = Tracker(run)
    for path in written:
        if path.suffix == ".png":
            tracker.image(f"sweep/{path.stem}", path)
        tracker.file(path)
    tracker.file(sweep_dir / "sweep.md")
    tracker.table("sweep/jobs", [{"job": j["job"], **j["params"], **j["metrics"]} for j in jobs])
    run.finish()
    print(f"logged the report to W&B run {run.name} (group {run.group}) -> {run.dir}")


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m looper.report", description=__doc__.split("\n")[0])
    parser.add_argument("sweep_dir", type=Path, help="a sweep directory (multirun/<date>/<time>)")
    parser.add_argument("--dataset", help="eval dataset (default: each job's objective dataset)")
    parser.add_argument("--target", help="eval target (default: each job's objective target)")
    parser.add_argument("--scorer", help="answer scorer (default: each job's primary scorer)")
    parser.add_argument("--wandb", action="store_true", help="also log the report to a W&B run in the sweep's group")
    args = parser.parse_args(argv)
    jobs = load_jobs(args.sweep_dir)
    if not jobs:
        raise SystemExit(f"no summary.json under {args.sweep_dir}: did the jobs run the eval stage?")
    choice = (args.dataset, args.target, args.scorer)
    write_csv(jobs, args.sweep_dir / "sweep.csv")
    keys = varied(jobs)
    selected = args.dataset or jobs[0]["objective"]["dataset"]
    text = (
        f"# Sweep report: {args.sweep_dir}\n\n{len(jobs)} jobs, best first by their accuracy on {selected}; "
        f"the other datasets are shown, not ranked on.\n\n{table(jobs, keys, choice)}\n"
    )
    (args.sweep_dir / "sweep.md").write_text(text)
    written = figures(jobs, choice, args.sweep_dir)
    print(text)
    print(f"wrote {args.sweep_dir / 'sweep.csv'}, {args.sweep_dir / 'sweep.md'}", *(str(p) for p in written), sep="\n")
    if args.wandb:
        log_to_wandb(args.sweep_dir, jobs, written)


if __name__ == "__main__":
    main()
