"""Sweep report: `python -m looper.report MULTIRUN_DIR` — no W&B needed.

Reads every job's `summary.json` under MULTIRUN_DIR and writes, next to them:
- `sweep.csv`: one row per job, every tabulated parameter and every metric;
- `sweep.md`: the jobs best first by the chosen accuracy, with Wilson 95% intervals, and beside it the same target's
  accuracy on the other datasets (test sets: reported, never ranked on);
- `heatmap_dpo.beta=<v>.png`: that accuracy over reward.alpha x reward.beta, one image per dpo.beta.
By default the accuracy is the jobs' objective (primary scorer, last eval target, a dev split: never a test set
unless the jobs set eval.select_on to one); `--dataset`, `--target` and `--scorer` choose another.
"""

import argparse
import csv
import json
from pathlib import Path
from typing import Optional

from looper.stats import wilson


def load_jobs(sweep_dir: Path) -> list[dict]:
    """The summaries of the finished jobs of a sweep (jobs without one are skipped), in job order."""
    jobs = []
    for path in sorted(
        sweep_dir.rglob("summary.json"),
        key=lambda p: [int(x) if x.isdigit() else x for x in p.parent.relative_to(sweep_dir).parts],
    ):
        summary = json.loads(path.read_text())
        summary["job"] = str(path.parent.relative_to(sweep_dir))
        jobs.append(summary)
    return jobs


def accuracy(job: dict, dataset: Optional[str], target: Optional[str], scorer: Optional[str]) -> tuple:
    """(accuracy, correct, n) of one job for the chosen dataset/target/scorer (defaults: the job's objective)."""
    dataset = dataset or job["objective"]["dataset"]
    target = target or job["objective"]["target"]
    scorer = scorer or job["primary_scorer"]
    counts = job["counts"][f"{dataset}/{target}"]
    return job["metrics"][f"{dataset}/{target}/acc_{scorer}"], counts[f"correct_{scorer}"], counts["n"]


def varied(jobs: list[dict]) -> list[str]:
    """The parameters that differ between jobs."""
    keys = list(jobs[0]["params"])
    return [k for k in keys if len({json.dumps(j["params"][k]) for j in jobs}) > 1]


def write_csv(jobs: list[dict], path: Path) -> None:
    params = list(jobs[0]["params"])
    metrics = sorted({m for j in jobs for m in j["metrics"]})
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["job", *params, *metrics])
        for j in jobs:
            writer.writerow([j["job"], *(j["params"][p] for p in params), *(j["metrics"].get(m) for m in metrics)])


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
            + " | ".join(str(j["params"][k]) for k in keys)
            + f" | {100 * acc:.1f}% [{100 * low:.1f}, {100 * high:.1f}] | {n} |"
            + extra
        )
    return "\n".join(lines)


def heatmaps(jobs: list[dict], choice: tuple, out_dir: Path) -> list[Path]:
    """One heatmap of accuracy over reward.alpha x reward.beta per dpo.beta."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for dpo_beta in sorted({j["params"]["dpo.beta"] for j in jobs}):
        cell = [j for j in jobs if j["params"]["dpo.beta"] == dpo_beta]
        alphas = sorted({j["params"]["reward.alpha"] for j in cell})
        betas = sorted({j["params"]["reward.beta"] for j in cell})
        grid = [[float("nan")] * len(alphas) for _ in betas]
        for j in cell:
            grid[betas.index(j["params"]["reward.beta"])][alphas.index(j["params"]["reward.alpha"])] = accuracy(
                j, *choice
            )[0]
        fig, ax = plt.subplots(figsize=(1.6 + 1.2 * len(alphas), 1.4 + 0.9 * len(betas)))
        image = ax.imshow(grid, origin="lower", cmap="viridis", aspect="auto")
        for y, row in enumerate(grid):
            for x, value in enumerate(row):
                if value == value:  # not NaN
                    ax.text(x, y, f"{100 * value:.1f}", ha="center", va="center", color="white", fontsize=9)
        ax.set_xticks(range(len(alphas)), [str(a) for a in alphas])
        ax.set_yticks(range(len(betas)), [str(b) for b in betas])
        ax.set_xlabel("reward.alpha")
        ax.set_ylabel("reward.beta")
        ax.set_title(f"accuracy, dpo.beta={dpo_beta}")
        fig.colorbar(image, ax=ax)
        fig.tight_layout()
        path = out_dir / f"heatmap_dpo.beta={dpo_beta}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m looper.report", description=__doc__.split("\n")[0])
    parser.add_argument("sweep_dir", type=Path, help="a Hydra multirun directory (multirun/<date>/<time>)")
    parser.add_argument("--dataset", help="eval dataset (default: each job's objective dataset)")
    parser.add_argument("--target", help="eval target (default: each job's objective target)")
    parser.add_argument("--scorer", help="answer scorer (default: each job's primary scorer)")
    args = parser.parse_args(argv)
    jobs = load_jobs(args.sweep_dir)
    if not jobs:
        raise SystemExit(f"no summary.json under {args.sweep_dir}: did the jobs run the eval stage?")
    choice = (args.dataset, args.target, args.scorer)
    write_csv(jobs, args.sweep_dir / "sweep.csv")
    keys = varied(jobs) or ["dpo.beta"]
    selected = args.dataset or jobs[0]["objective"]["dataset"]
    text = (
        f"# Sweep report: {args.sweep_dir}\n\n{len(jobs)} jobs, best first by their accuracy on {selected}; "
        f"the other datasets are shown, not ranked on.\n\n{table(jobs, keys, choice)}\n"
    )
    (args.sweep_dir / "sweep.md").write_text(text)
    written = heatmaps(jobs, choice, args.sweep_dir)
    print(text)
    print(f"wrote {args.sweep_dir / 'sweep.csv'}, {args.sweep_dir / 'sweep.md'} and {len(written)} heatmap(s)")


if __name__ == "__main__":
    main()
