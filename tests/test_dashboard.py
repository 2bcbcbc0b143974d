"""The W&B dashboard, read back from the offline run files of the tiny pipeline (tests/wandb_files.py): what each
stage's run holds, and the artifacts that tie the stages together."""

import json

import pytest

from looper import __main__ as entry
from tests.wandb_files import Run


@pytest.fixture(scope="module")
def runs(fast_cfg, tiny_sft, tmp_path_factory):
    """{stage: Run} of one pipeline run with offline W&B; a rollout of its own makes the rollout, pairs, DPO and its
    evaluations here (the base and SFT come from the session's cache)."""
    pytest.importorskip("wandb")
    run_dir = tmp_path_factory.mktemp("dashboard")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("WANDB_DIR", str(run_dir))
        patch.setenv("WANDB_MODE", "offline")
        cfg = fast_cfg("logger=wandb", "logger.mode=offline", "rollout.num_questions=15", "logger.group=dashboard")
        entry.run(cfg, run_dir)
    found = {}
    for directory in sorted((run_dir / "wandb").glob("offline-run-*")):
        run = Run(directory)
        found[run.run.job_type] = run
    return found


def test_every_stage_has_a_run_in_the_experiments_group(runs):
    assert sorted(runs) == ["dpo", "eval", "preferences", "rollout", "sft"]
    assert {run.run.run_group for run in runs.values()} == {"dashboard"}


def test_eval_logs_intervals_and_paired_deltas_as_values(runs):
    summary = runs["eval"].summary
    for target in ("base", "sft", "dpo"):
        low, acc, high = (summary[f"eval/synthetic_test/{target}/acc_strict{s}"] for s in ("_low", "", "_high"))
        assert 0 <= low <= acc <= high <= 1
    delta = summary["eval/synthetic_test/dpo_minus_sft/strict"]
    assert summary["eval/synthetic_test/dpo_minus_sft/strict_low"] <= delta
    assert delta <= summary["eval/synthetic_test/dpo_minus_sft/strict_high"]
    assert 0 <= summary["eval/synthetic_test/dpo_minus_base/strict_mcnemar_p"] <= 1
    assert summary["eval/synthetic_test/dpo_minus_sft/strict_n"] == 16


def test_eval_keeps_the_figure_and_the_reports(runs):
    files = runs["eval"].files
    assert {"report.md", "eval_table.md"} <= files
    assert any(f.startswith("media/images/eval/accuracy") and f.endswith(".png") for f in files)


def test_tables_are_typed(runs):
    examples = runs["eval"].table("eval/synthetic_test/dpo/examples")
    column = {name: [row[i] for row in examples["data"]] for i, name in enumerate(examples["columns"])}
    assert {type(v) for v in column["correct_strict"]} == {bool}  # not "True"/"False": sortable, filterable
    assert {type(v) for v in column["num_tokens"]} == {int}
    assert sorted(column["correct_strict"]) == column["correct_strict"]  # wrong first
    results = runs["eval"].table("eval/results")
    row = dict(zip(results["columns"], results["data"][0]))
    assert isinstance(row["acc_strict"], float) and isinstance(row["n"], int) and row["acc_strict_low"] <= 1


def test_the_pairs_and_side_by_side_tables(runs):
    pairs = runs["preferences"].table("preferences/pairs")
    assert {"question", "chosen", "rejected", "pair_type", "chosen_arm", "rejected_arm", "chosen_s_wm"} <= set(
        pairs["columns"]
    )
    assert pairs["data"] and isinstance(pairs["data"][0][pairs["columns"].index("chosen_reward")], float)
    side = runs["eval"].table("eval/synthetic_test/side_by_side")
    columns = side["columns"]
    assert {"question", "gold", "base_answer", "sft_answer", "dpo_answer", "dpo_completion"} <= set(columns)
    right = [sum(row[columns.index(f"{t}_correct")] for t in ("base", "sft", "dpo")) for row in side["data"]]
    assert len(right) == 16 and right == sorted(right)  # the questions fewest targets got right first


def test_artifacts_tie_the_stages_together(runs):
    def logged(stage):
        return {a.name: a.digest for a in runs[stage].logged if a.type != "run_table"}

    def used(stage):
        return {a.name: a.digest for a in runs[stage].used}

    made_pairs = logged("preferences")
    assert [a.type for a in runs["preferences"].logged if a.name in made_pairs] == ["pairs"]
    assert made_pairs.items() <= used("dpo").items()  # same name, same digest: one artifact, an edge between runs
    made_dpo = logged("dpo")
    assert len(made_dpo) == 1 and made_dpo.items() <= used("eval").items()
    assert any(name.startswith("sft-") for name in used("rollout")) and any(
        n.startswith("rollout-") for n in used("preferences")
    )
    assert sum(a.type == "predictions" for a in runs["eval"].logged) == 4  # base, sft, dpo on test; dpo on dev
    # small files uploaded, none by path: the pairs artifact carries its own records
    manifest = next(a for a in runs["preferences"].logged if a.type == "pairs").manifest
    entries = {entry.path: entry for entry in manifest.contents}
    assert "pairs.jsonl" in entries and not entries["pairs.jsonl"].ref


def test_rollout_and_eval_log_progress_while_they_work(runs):
    rollout = [
        row["rollout/progress/questions"] for row in runs["rollout"].history if "rollout/progress/questions" in row
    ]
    assert rollout and rollout[-1] == 15
    shares = [row["eval/progress/share"] for row in runs["eval"].history if "eval/progress/share" in row]
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
    with tracking.stage_run(fast_cfg("logger=wandb", "logger.mode=offline", f"logger.quiet={quiet}"), "sft"):
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
