"""End to end through `python -m looper`: the pipeline, the cache across runs and sweeps, and bad data."""

import json
import os
from pathlib import Path

from looper import report
from tests.conftest import FAST, looper_cli


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "artifacts.jsonl").read_text().splitlines()]


def test_the_pipeline_runs_end_to_end_and_prints_the_table(artifacts, tiny_sft, tmp_path):
    run_dir = tmp_path / "run"
    result = looper_cli(f"paths.artifacts={artifacts}", f"hydra.run.dir={run_dir}", *FAST)
    assert result.returncode == 0, result.stderr[-3000:]
    for target in ("base", "sft", "dpo"):
        assert f"| synthetic_test | {target} | 16 |" in result.stdout
    stages = {r["stage"] for r in _records(run_dir)}
    assert {"base", "sft", "rollout", "preferences", "dpo", "eval"} <= stages
    summary = json.loads((run_dir / "summary.json").read_text())
    assert set(summary["metrics"]) >= {f"synthetic_test/{t}/acc_strict" for t in ("base", "sft", "dpo")}
    for record in _records(run_dir):
        assert (Path(record["path"]) / "DONE").exists()
    trajectories = next(Path(r["path"]) for r in _records(run_dir) if r["stage"] == "rollout") / "trajectories.jsonl"
    first = json.loads(trajectories.read_text().splitlines()[0])
    assert {
        "question_id",
        "arm",
        "sample",
        "text",
        "answer",
        "correct",
        "num_tokens",
        "s_end",
        "s_path",
        "s_wm",
    } <= set(first)


def test_stage_dpo_produces_its_upstream_then_reuses_everything(artifacts, tiny_sft, tmp_path):
    fresh = [*FAST, "sft.max_steps=151"]  # a new SFT key: sft, rollout, preferences, dpo must all be made
    first = looper_cli(
        f"paths.artifacts={artifacts}", f"hydra.run.dir={tmp_path / 'a'}", *fresh, "stage=dpo", "reward.beta=0.5"
    )
    assert first.returncode == 0, first.stderr[-3000:]
    made = {r["stage"] for r in _records(tmp_path / "a") if r["status"] == "made"}
    assert made == {"sft", "rollout", "preferences", "dpo"}
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())  # every run has one, eval or not
    built = {a["stage"]: a["path"] for a in summary["artifacts"] if a["status"] == "built"}
    assert summary["stage"] == "dpo" and set(built) == made and "objective" not in summary
    assert all((Path(path) / "DONE").exists() for path in built.values())
    again = looper_cli(
        f"paths.artifacts={artifacts}", f"hydra.run.dir={tmp_path / 'b'}", *fresh, "stage=dpo", "reward.beta=0.5"
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert {r["status"] for r in _records(tmp_path / "b")} == {"reused"}
    log = again.stdout + again.stderr
    assert "building" not in log and all(
        f"{s} (tiny): reusing" in log for s in ("sft", "rollout", "preferences", "dpo")
    )
    assert (tmp_path / "b" / "looper.log").exists()  # named after the program, not __main__


def test_changing_the_reward_reuses_the_rollout(artifacts, tiny_sft, tmp_path):
    result = looper_cli(
        f"paths.artifacts={artifacts}",
        f"hydra.run.dir={tmp_path}",
        *FAST,
        "stage=preferences",
        "reward.beta=0.9",
        "reward.w_path=0.3",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    statuses = {r["stage"]: r["status"] for r in _records(tmp_path)}
    assert statuses["rollout"] == "reused" and statuses["preferences"] == "made"


def test_a_sweep_shares_sft_and_rollout_and_logs_one_wandb_group(artifacts, tiny_sft, tmp_path):
    fast = [*FAST, "logger=wandb"]
    result = looper_cli(
        "-m",
        f"paths.artifacts={artifacts}",
        f"hydra.sweep.dir={tmp_path}",
        *fast,
        "logger.mode=offline",
        "eval.targets=[dpo]",
        "dpo.beta=0.15,0.35",
        wandb_silent=False,  # what a user sees: logger.quiet alone keeps W&B's console output off
    )
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = [{r["stage"]: r["path"] for r in _records(tmp_path / str(n))} for n in (0, 1)]
    assert jobs[0]["sft"] == jobs[1]["sft"] and jobs[0]["rollout"] == jobs[1]["rollout"]
    assert jobs[0]["dpo"] != jobs[1]["dpo"]
    runs = [
        json.loads(line) for n in (0, 1) for line in (tmp_path / str(n) / "wandb_runs.jsonl").read_text().splitlines()
    ]
    assert len(runs) == 2 and len({r["id"] for r in runs}) == 2  # one run per job, the reused stages in it
    group = f"tiny_demo-{tmp_path.parent.name}-{tmp_path.name}"  # the experiment, and the sweep's directory
    assert {r["group"] for r in runs} == {group} and {r["mode"] for r in runs} == {"offline"}
    assert sorted(r["name"] for r in runs) == ["pipeline tiny_demo dpo.beta=0.15", "pipeline tiny_demo dpo.beta=0.35"]
    report.main([str(tmp_path)])  # one swept key: a line plot, no heatmap
    assert sorted(p.name for p in tmp_path.glob("sweep_*")) == ["sweep_dpo.beta.png", "sweep_dpo.beta.svg"]
    assert not list(tmp_path.glob("heatmap_*"))
    console = (result.stdout + result.stderr).splitlines()  # no W&B banners: one looper line per run says where
    assert [line for line in console if "wandb:" in line] == []
    assert sum("W&B run pipeline tiny_demo" in line for line in console) == len(runs)


def test_a_malformed_data_line_stops_with_its_location_and_keeps_finished_artifacts(artifacts, tiny_sft, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    good = json.dumps({"question": "Q?", "answer": "1+1=<<1+1=2>>2\n#### 2"})
    (data / "train.jsonl").write_text(f"{good}\n{good}\n" + json.dumps({"question": "Q?"}) + "\n")
    (data / "test.jsonl").write_text(f"{good}\n")
    done_before = sorted(str(p) for p in artifacts.glob("*/*/DONE"))
    result = looper_cli(
        f"paths.artifacts={artifacts}",
        f"hydra.run.dir={tmp_path / 'run'}",
        *FAST,
        "data=gsm8k",
        f"data.path={data}",
        "model.tiny.pretrain_steps=400",
    )
    assert result.returncode != 0
    assert f"{data / 'train.jsonl'}:3" in result.stderr and "missing or empty field 'answer'" in result.stderr
    assert sorted(str(p) for p in artifacts.glob("*/*/DONE")) == done_before  # nothing lost, nothing built first


def test_run_names_carry_what_the_sweep_varies():
    from looper.tracking import run_name

    sweep = ["paths.artifacts=/x", "reward.alpha=0.5,1.0", "dpo.beta=range(0.1,0.3,0.1)", "seed=1"]
    job = ["paths.artifacts=/x", "reward.alpha=0.5", "dpo.beta=0.2", "seed=1", "reward.beta=0.7"]
    assert run_name(job, sweep) == "reward.alpha=0.5,dpo.beta=0.2,reward.beta=0.7"
    # the stage and the experiment lead the name already (run_label); where things go is never part of it
    assert run_name(["paths.artifacts=/x", "stage=dpo", "experiment=e", "logger.mode=offline", "lora=r64"], None) == (
        "lora=r64"
    )
    assert len(run_name([f"+sft.trainer.k{i}=1" for i in range(40)], None)) == 80


def test_a_run_stopped_before_it_finished_is_continued_and_a_finished_one_is_not(tmp_path):
    import socket

    from looper.tracking import resume_id

    record = tmp_path / "job.json"
    assert resume_id(record) is None  # never ran
    record.write_text(json.dumps({"id": "abc", "host": socket.gethostname(), "pid": 2**22 + 7, "finished": False}))
    assert resume_id(record) == "abc"  # killed: its process is gone
    record.write_text(json.dumps({"id": "abc", "host": socket.gethostname(), "pid": os.getpid(), "finished": False}))
    assert resume_id(record) is None  # the same command running now keeps its own run
    record.write_text(json.dumps({"id": "abc", "finished": True}))
    assert resume_id(record) is None


def test_a_wandb_failure_never_stops_a_stage(fast_cfg, monkeypatch, tmp_path):
    import wandb

    from looper.tracking import job_run

    def broken(*args, **kwargs):
        raise RuntimeError("wandb is down")

    monkeypatch.setattr(wandb, "init", broken)
    cfg = fast_cfg("logger=wandb", "logger.mode=offline")
    with job_run(cfg, tmp_path) as tracker:  # init fails: the job goes on untracked
        tracker.summary({"x": 1})
        tracker.table("t", [{"a": 1}])
        assert tracker.run is None
