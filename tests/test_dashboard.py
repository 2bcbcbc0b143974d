"""The W&B dashboard, read back from the offline run files of the tiny pipeline (tests/wandb_files.py): what each
stage's run holds, and the artifacts that tie the stages together."""

import json

import pytest

from looper import __main__ as entry
from tests.wandb_files import Run


@pytest.fixture(scope="module")
def run(fast_cfg, tiny_sft, tmp_path_factory):
    """The one W&B run of a pipeline job with offline W&B; a rollout of its own makes the rollout, pairs, DPO and its
    evaluations here (the base and SFT come from the session's cache)."""
    pytest.importorskip("wandb")
    run_dir = tmp_path_factory.mktemp("dashboard")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("WANDB_MODE", "offline")
        cfg = fast_cfg("logger=wandb", "logger.mode=offline", "rollout.num_questions=15", "logger.group=dashboard")
        entry.run(cfg, run_dir)
    found = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(found) == 1, found  # one run for the job, whatever it built or reused
    return Run(found[0])


def test_the_job_has_one_run_with_a_section_per_stage(run):
    assert run.run.job_type == "pipeline" and run.run.run_group == "dashboard"
    assert run.run.display_name == "pipeline tiny_demo"
    keys = {key for row in run.history for key in row} | set(run.summary)
    assert {key.split("/")[0] for key in keys if "/" in key} >= {"sft", "rollout", "preferences", "dpo", "eval"}
    assert run.summary["sft/reused_artifact"]  # reused from the cache: its figures, not a new run
    steps = [row["dpo/step"] for row in run.history if "dpo/loss" in row]  # the trainer's curve, on its own axis
    assert steps == [1, 2, 3] and isinstance(run.summary["dpo/train_loss"], float)


def test_eval_logs_intervals_and_paired_deltas_as_values(run):
    summary = run.summary
    for target in ("base", "sft", "dpo"):
        low, acc, high = (summary[f"eval/synthetic_test/{target}/acc_strict{s}"] for s in ("_low", "", "_high"))
        assert 0 <= low <= acc <= high <= 1
    delta = summary["eval/synthetic_test/dpo_minus_sft/strict"]
    assert summary["eval/synthetic_test/dpo_minus_sft/strict_low"] <= delta
    assert delta <= summary["eval/synthetic_test/dpo_minus_sft/strict_high"]
    assert 0 <= summary["eval/synthetic_test/dpo_minus_base/strict_mcnemar_p"] <= 1
    assert summary["eval/synthetic_test/dpo_minus_sft/strict_n"] == 16


def test_eval_keeps_the_figure_and_the_reports(run):
    files = run.files
    assert {"report.md", "eval_table.md"} <= files
    assert any(f.startswith("media/images/eval/accuracy") and f.endswith(".png") for f in files)


def test_tables_are_typed(run):
    examples = run.table("eval/synthetic_test/dpo/examples")
    column = {name: [row[i] for row in examples["data"]] for i, name in enumerate(examples["columns"])}
    assert {type(v) for v in column["correct_strict"]} == {bool}  # not "True"/"False": sortable, filterable
    assert {type(v) for v in column["num_tokens"]} == {int}
    assert sorted(column["correct_strict"]) == column["correct_strict"]  # wrong first
    results = run.table("eval/results")
    row = dict(zip(results["columns"], results["data"][0]))
    assert isinstance(row["acc_strict"], float) and isinstance(row["n"], int) and row["acc_strict_low"] <= 1


def test_the_pairs_and_side_by_side_tables(run):
    pairs = run.table("preferences/pairs")
    assert {"question", "chosen", "rejected", "pair_type", "chosen_arm", "rejected_arm", "chosen_s_wm"} <= set(
        pairs["columns"]
    )
    assert pairs["data"] and isinstance(pairs["data"][0][pairs["columns"].index("chosen_reward")], float)
    side = run.table("eval/synthetic_test/side_by_side")
    columns = side["columns"]
    assert {"question", "gold", "base_answer", "sft_answer", "dpo_answer", "dpo_completion"} <= set(columns)
    right = [sum(row[columns.index(f"{t}_correct")] for t in ("base", "sft", "dpo")) for row in side["data"]]
    assert len(right) == 16 and right == sorted(right)  # the questions fewest targets got right first


def test_the_run_logs_what_it_built_and_uses_what_it_reused(run):
    logged = {a.name: a for a in run.logged if a.type != "run_table"}
    used = {a.name for a in run.used}
    assert sorted(a.type for a in logged.values()) == ["model", "pairs", "predictions", "predictions"] + [
        "predictions",
        "predictions",
        "rollout",
    ]  # dpo; pairs; base, sft, dpo on test and dpo on dev; the rollout: each once, though later stages read them
    assert {name.split("-")[0] for name in used} == {"base", "sft"}  # from the cache: the lineage stays whole
    assert not used & set(logged)
    # small files uploaded, none by path: the pairs artifact carries its own records
    manifest = next(a for a in logged.values() if a.type == "pairs").manifest
    entries = {entry.path: entry for entry in manifest.contents}
    assert "pairs.jsonl" in entries and not entries["pairs.jsonl"].ref


def test_accuracies_are_logged_as_values_and_charts_a_project_compares(run):
    logged = {key: value for row in run.history for key, value in row.items()}
    assert 0 <= logged["eval/synthetic_test/dpo/acc_strict"] <= 1
    assert any(key.startswith("eval/synthetic_test/accuracy_chart") for key in logged)


def test_rollout_and_eval_log_progress_while_they_work(run):
    rollout = [row["rollout/progress/questions"] for row in run.history if "rollout/progress/questions" in row]
    assert rollout and rollout[-1] == 15
    shares = [row["eval/progress/share"] for row in run.history if "eval/progress/share" in row]
    assert len(shares) > 4 and shares[-1] == 1.0


@pytest.mark.parametrize("quiet", [True, False])
def test_logger_quiet_turns_the_banners_off(fast_cfg, monkeypatch, tmp_path, quiet):
    wandb = pytest.importorskip("wandb")
    from looper import tracking

    seen = {}

    def init(**kwargs):
        seen.update(kwargs)
        raise RuntimeError("stop here")  # (tracking goes on without a run)

    monkeypatch.setattr(wandb, "init", init)
    with tracking.job_run(fast_cfg("logger=wandb", "logger.mode=offline", f"logger.quiet={quiet}"), tmp_path):
        pass
    assert (seen["settings"] is not None and seen["settings"].silent) is quiet


def test_the_upload_limit_decides_what_is_copied_and_what_is_referenced(tmp_path):
    pytest.importorskip("wandb")
    from looper.tracking import _artifact

    directory = tmp_path / "rollout" / "0123456789abcdef"
    directory.mkdir(parents=True)
    (directory / "stats.json").write_text(json.dumps({"questions": 3}))
    (directory / "trajectories.jsonl").write_bytes(b"x" * 3 * 2**20)
    small = _artifact("rollout", directory, upload_limit_mb=1)
    entries = small.manifest.entries
    assert entries["trajectories.jsonl"].ref and not entries["stats.json"].ref
    assert small.name == "rollout-0123456789abcdef" and small.type == "rollout"
    assert small.metadata["stats"] == {"questions": 3}
    assert not _artifact("rollout", directory, upload_limit_mb=4).manifest.entries["trajectories.jsonl"].ref
    assert _artifact("rollout", directory, upload_limit_mb=1).digest == small.digest  # what joins producer and user
