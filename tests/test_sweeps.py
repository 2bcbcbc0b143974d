"""Sweeps: one SFT and one rollout shared by a grid of DPO jobs, W&B grouping, the sweep report, Optuna search."""

import json
from pathlib import Path

import pytest
import yaml

from looper import report
from tests.conftest import FAST, looper_cli

GRID = ["reward.alpha=0.5,1.0", "reward.beta=0.5", "dpo.beta=0.05,0.2"]  # 2 x 2 jobs, reward.beta fixed


def _records(job_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (job_dir / "artifacts.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def grid(artifacts, tiny_sft, tmp_path_factory):
    """A 2 x 2 sweep (reward.alpha x dpo.beta) of the fast tiny setup over a fresh SFT key (so its rollout is made
    inside the sweep)."""
    sweep_dir = tmp_path_factory.mktemp("sweep")
    fast = [*FAST, "logger=wandb"]
    result = looper_cli(
        "-m",
        f"paths.artifacts={artifacts}",
        f"hydra.sweep.dir={sweep_dir}",
        *fast,
        "sft.max_steps=152",
        "logger.mode=offline",
        "eval.targets=[dpo]",
        *GRID,
        timeout=1200,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return sweep_dir


def test_the_grid_runs_four_dpo_jobs_on_one_sft_and_one_rollout(grid):
    jobs = [grid / str(n) for n in range(4)]
    records = [r for job in jobs for r in _records(job)]
    made = [r for r in records if r["status"] == "made"]
    # generation happens once: one rollout (and one SFT) made in the whole sweep, reused by every other job
    assert [r["stage"] for r in made].count("rollout") == 1 and [r["stage"] for r in made].count("sft") == 1
    assert len({r["path"] for r in records if r["stage"] == "rollout"}) == 1
    assert len({r["path"] for r in records if r["stage"] == "dpo"}) == 4
    assert len({r["path"] for r in records if r["stage"] == "preferences"}) == 2  # one per alpha; dpo.beta shares
    for job in jobs:
        summary = json.loads((job / "summary.json").read_text())
        assert set(summary["params"]) >= {"reward.alpha", "reward.beta", "dpo.beta"} and summary["metrics"]
        # eval.datasets is [synthetic_test]: the objective still comes from the dev split, never the test set
        assert summary["objective"]["dataset"] == "synthetic_dev"
        assert "synthetic_dev/dpo/acc_strict" in summary["metrics"]


def test_the_grid_makes_four_wandb_runs_and_the_report_one_more(grid):
    from tests.wandb_files import Run

    runs = [Run(directory) for directory in sorted(grid.glob("*/wandb/offline-run-*"))]
    assert len(runs) == 4 and len({run.run.run_id for run in runs}) == 4  # one per job, the stages it reused in it
    assert {run.run.run_group for run in runs} == {f"tiny_demo-{grid.parent.name}-{grid.name}"}  # experiment, sweep
    assert {run.run.display_name for run in runs} == {
        f"pipeline tiny_demo reward.alpha={a},dpo.beta={b}" for a in (0.5, 1.0) for b in (0.05, 0.2)
    }
    for run in runs:
        assert {"sft/", "rollout/", "preferences/", "dpo/", "eval/"} <= {k[: k.find("/") + 1] for k in run.summary}
    report.main([str(grid), "--wandb"])
    assert len(list(grid.glob("wandb/offline-run-*"))) == 1  # the report's own run, in the sweep's directory


def test_the_sweep_report_writes_a_table_and_heatmaps(grid):
    report.main([str(grid)])
    rows = (grid / "sweep.csv").read_text().splitlines()
    assert len(rows) == 5
    table = (grid / "sweep.md").read_text()
    # ranked on the dev split (the objective), the test set shown beside it, never ranked on
    assert "best first by their accuracy on synthetic_dev" in table
    assert ("| rank | job | reward.alpha | dpo.beta | selected on: accuracy [95% CI] | n | synthetic_test |") in table
    assert [line.split(" | ")[0] for line in table.splitlines() if line.startswith("| ") and line[2].isdigit()] == [
        f"| {rank}" for rank in range(1, 5)
    ] and "% [" in table
    # two swept keys: one alpha x dpo.beta heatmap (tests/test_report.py checks the figures, panels and scale)
    assert sorted(p.name for p in grid.glob("heatmap_*")) == [
        "heatmap_reward.alpha_dpo.beta.png",
        "heatmap_reward.alpha_dpo.beta.svg",
    ]


def test_rerunning_the_sweep_reuses_every_finished_artifact(grid, artifacts, tmp_path):
    fast = [*FAST, "logger=wandb"]
    result = looper_cli(
        "-m",
        f"paths.artifacts={artifacts}",
        f"hydra.sweep.dir={tmp_path}",
        *fast,
        "sft.max_steps=152",
        "logger=none",
        "eval.targets=[dpo]",
        *GRID,
        timeout=1200,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    statuses = {r["status"] for n in range(4) for r in _records(tmp_path / str(n))}
    assert statuses == {"reused"}


def test_an_optuna_search_names_the_best_setting(artifacts, tiny_sft, tmp_path):
    result = looper_cli(
        f"paths.artifacts={artifacts}",
        f"hydra.sweep.dir={tmp_path}",
        *FAST,
        "hparams_search=coherence_optuna",
        "hydra.sweeper.n_trials=4",
        timeout=1200,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    best = yaml.safe_load((tmp_path / "optimization_results.yaml").read_text())
    assert set(best["best_params"]) == {"reward.alpha", "reward.beta", "dpo.beta"}
    values = [json.loads((tmp_path / str(n) / "summary.json").read_text())["objective"] for n in range(4)]
    assert {v["dataset"] for v in values} == {"synthetic_dev"} and {v["target"] for v in values} == {"dpo"}
    assert best["best_value"] == max(v["value"] for v in values)
