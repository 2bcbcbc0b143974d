"""The sweep report draws what was swept: a line plot for one parameter (seeds aggregated, SFT baseline), heatmaps on
one colour scale for two or more; every figure as PNG and SVG."""

import itertools
import json
from pathlib import Path

import pytest

from looper import report

PARAMS = {"reward.alpha": 1.0, "reward.beta": 0.5, "dpo.beta": 0.1, "seed": 0}


def _job(sweep: Path, n: int, params: dict, correct: dict, total: int = 100, overrides: tuple = ()) -> None:
    """A finished job's summary.json: `correct` maps (dataset, target) to how many of `total` were right."""
    summary = {
        "params": {**PARAMS, **params},
        "overrides": list(overrides),
        "primary_scorer": "strict",
        "objective": {"dataset": "synthetic_dev", "target": "dpo", "value": correct["synthetic_dev", "dpo"] / total},
        "metrics": {f"{d}/{t}/acc_strict": c / total for (d, t), c in correct.items()},
        "counts": {f"{d}/{t}": {"n": total, "correct_strict": c} for (d, t), c in correct.items()},
    }
    (sweep / str(n)).mkdir(parents=True)
    (sweep / str(n) / "summary.json").write_text(json.dumps(summary))


@pytest.fixture
def beta_sweep(tmp_path):
    """dpo.beta in {0.05, 0.1, 0.2}, two seeds each; SFT (shared) at 50 of 100."""
    for n, (beta, seed) in enumerate(itertools.product([0.05, 0.1, 0.2], [0, 1])):
        right = 50 + int(100 * beta) + 2 * seed
        _job(
            tmp_path,
            n,
            {"dpo.beta": beta, "seed": seed},
            {("synthetic_dev", "dpo"): right, ("synthetic_dev", "sft"): 50, ("synthetic_test", "dpo"): right - 3},
        )
    return tmp_path


def test_a_one_parameter_sweep_draws_lines_with_seed_spread_and_the_sft_baseline(beta_sweep, monkeypatch):
    drawn = {}
    original = report.line_plot

    def spy(jobs, key, choice, out_dir):
        drawn["key"] = key
        drawn["dev"] = report.points(jobs, [key], ("synthetic_dev", None, None))
        drawn["sft"] = report.points(jobs, [key], ("synthetic_dev", None, None), target="sft")
        return original(jobs, key, choice, out_dir)

    monkeypatch.setattr(report, "line_plot", spy)
    report.main([str(beta_sweep)])
    assert drawn["key"] == "dpo.beta"  # seed is aggregated, not plotted
    mean, low, high, seeds = drawn["dev"][(0.1,)]
    assert (round(mean, 3), low, high, seeds) == (0.61, 0.6, 0.62, 2)  # mean of the seeds, their min and max
    assert {v[0] for v in drawn["sft"].values()} == {0.5}
    names = sorted(p.name for p in beta_sweep.glob("sweep_*"))
    assert names == ["sweep_dpo.beta.png", "sweep_dpo.beta.svg"] and not list(beta_sweep.glob("heatmap_*"))
    svg = (beta_sweep / "sweep_dpo.beta.svg").read_text()
    assert "sft, synthetic_dev" in svg and "dpo, synthetic_test" in svg and "min-max over seeds" in svg


def test_one_seed_gets_the_wilson_interval():
    jobs = [
        {
            "params": {**PARAMS, "dpo.beta": 0.1},
            "primary_scorer": "strict",
            "objective": {"dataset": "d", "target": "dpo"},
            "metrics": {"d/dpo/acc_strict": 0.5},
            "counts": {"d/dpo": {"n": 100, "correct_strict": 50}},
        }
    ]
    mean, low, high, seeds = report.points(jobs, ["dpo.beta"], (None, None, None))[(0.1,)]
    assert (mean, seeds) == (0.5, 1) and (round(low, 3), round(high, 3)) == (0.404, 0.596)


def test_a_grid_draws_heatmaps_on_one_colour_scale(tmp_path, monkeypatch):
    for n, (alpha, beta, dpo_beta) in enumerate(itertools.product([0.5, 1.0], [0.0, 0.5], [0.05, 0.2])):
        right = 40 + int(10 * alpha) + int(10 * beta) + int(100 * dpo_beta)
        _job(
            tmp_path,
            n,
            {"reward.alpha": alpha, "reward.beta": beta, "dpo.beta": dpo_beta},
            {("synthetic_dev", "dpo"): right, ("synthetic_test", "dpo"): right},
        )
    scales = []
    import matplotlib.axes

    imshow = matplotlib.axes.Axes.imshow

    def spy(self, grid, **kwargs):
        scales.append((kwargs["vmin"], kwargs["vmax"], [v for row in grid for v in row]))
        return imshow(self, grid, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "imshow", spy)
    report.main([str(tmp_path)])
    assert sorted(p.name for p in tmp_path.glob("heatmap_*")) == [
        "heatmap_reward.alpha_reward.beta.png",
        "heatmap_reward.alpha_reward.beta.svg",
    ]
    assert len(scales) == 2 and len({(low, high) for low, high, _ in scales}) == 1  # one panel per dpo.beta, one scale
    cells = [v for _, _, grid in scales for v in grid]
    assert (scales[0][0], scales[0][1]) == (min(cells), max(cells)) == (50.0, 75.0)  # percent, not fractions
    svg = (tmp_path / "heatmap_reward.alpha_reward.beta.svg").read_text()
    assert "dpo.beta=0.05" in svg and "dpo.beta=0.2" in svg and "accuracy, %" in svg


def test_the_report_logs_its_figures_to_the_sweeps_wandb_group(beta_sweep, monkeypatch):
    pytest.importorskip("wandb")
    from tests.wandb_files import Run

    monkeypatch.setenv("WANDB_MODE", "offline")
    for job in beta_sweep.glob("[0-9]*"):
        (job / ".hydra").mkdir()
        (job / ".hydra" / "config.yaml").write_text("logger:\n  project: looper\n  entity: null\n")
        (job / "wandb_runs.jsonl").write_text(json.dumps({"group": "sweep-x", "mode": "offline"}) + "\n")
    report.main([str(beta_sweep), "--wandb"])
    run = Run(next((beta_sweep / "wandb").glob("offline-run-*")))
    assert (run.run.job_type, run.run.run_group) == ("report", "sweep-x")
    assert {"sweep_dpo.beta.svg", "sweep_dpo.beta.png", "sweep.md"} <= run.files
    assert any(f.startswith("media/images/sweep/sweep_dpo.beta") for f in run.files)
    jobs = run.table("sweep/jobs")
    assert len(jobs["data"]) == 6 and isinstance(jobs["data"][0][jobs["columns"].index("dpo.beta")], float)


def test_a_sweep_over_any_key_is_read_from_its_overrides_and_drawn(tmp_path, monkeypatch):
    for n, steps in enumerate([2, 3]):  # a key no fixed list names: `-m dpo.max_steps=2,3`
        overrides = (f"dpo.max_steps={steps}", f"paths.artifacts={tmp_path}/cache", "logger=none")
        correct = {("synthetic_dev", "dpo"): 50 + steps, ("synthetic_dev", "sft"): 50}
        _job(tmp_path / "sweep", n, {}, correct, overrides=overrides)
    drawn = []
    original = report.line_plot
    monkeypatch.setattr(report, "line_plot", lambda jobs, key, *a: drawn.append(key) or original(jobs, key, *a))
    report.main([str(tmp_path / "sweep")])
    assert drawn == ["dpo.max_steps"]  # (where things go, paths and logger, is not a parameter)
    table = (tmp_path / "sweep" / "sweep.md").read_text()
    assert "dpo.max_steps" in table.splitlines()[4] and "dpo.beta" not in table  # no constant column
    assert "53.0%" in table and "52.0%" in table


def test_series_at_one_value_stand_apart_on_an_honest_axis(beta_sweep, monkeypatch):
    import matplotlib.axes

    drawn, limits = {}, []
    errorbar, set_ylim = matplotlib.axes.Axes.errorbar, matplotlib.axes.Axes.set_ylim

    def spy_errorbar(self, xs, ys, **kwargs):
        drawn[kwargs["label"]] = list(xs)
        return errorbar(self, xs, ys, **kwargs)

    def spy_ylim(self, *args, **kwargs):
        limits.append(args)
        return set_ylim(self, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "errorbar", spy_errorbar)
    monkeypatch.setattr(matplotlib.axes.Axes, "set_ylim", spy_ylim)
    report.main([str(beta_sweep)])
    dev, test = drawn["dpo, synthetic_dev"], drawn["dpo, synthetic_test"]
    assert all(a < b for a, b in zip(dev, test))  # dev and test error bars side by side, not on top of each other
    low, high = [args for args in limits if len(args) == 2][-1]  # (looper's call; matplotlib makes its own)
    assert high - low >= 10 and 0 <= low and high <= 100
    assert "n=100" in (beta_sweep / "sweep_dpo.beta.svg").read_text()


def test_values_spanning_a_decade_go_on_a_log_axis_and_a_small_gap_stays_small():
    assert report.log_axis([0.01, 0.1]) and report.log_axis([0.05, 0.1, 0.5])
    assert not report.log_axis([0.1, 0.3, 0.5]) and not report.log_axis([0, 1, 10]) and not report.log_axis(["a", "b"])
    low, high = report.honest_ylim([67.0], [67.5])
    assert high - low >= 10 and low < 67 and high > 67.5
    assert report.honest_ylim([0.5], [1.0]) == (0.0, 10.0)  # (against the floor)


def test_a_heatmap_names_dataset_scorer_and_n_and_a_flat_grid_gets_no_colour_scale(tmp_path):
    for n, (alpha, beta) in enumerate(itertools.product([0.5, 1.0], [0.0, 0.5])):
        _job(tmp_path, n, {"reward.alpha": alpha, "reward.beta": beta}, {("synthetic_dev", "dpo"): 60}, total=80)
    report.main([str(tmp_path)])
    svg = (tmp_path / "heatmap_reward.alpha_reward.beta.svg").read_text()
    assert "synthetic_dev" in svg and "strict" in svg and "n=80" in svg
    assert "accuracy, % (one seed)" not in svg  # no colour bar inventing a range for a constant
