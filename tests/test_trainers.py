"""The trainers' surface: named keys and TRL's pass-through reach the trainer and the artifact's identity, unknown
keys fail at start naming themselves, and a SIGKILLed SFT or DPO resumes from its last checkpoint."""

import json
import logging
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from trl import DPOConfig, SFTConfig

from looper import pipeline, preflight, training
from looper.artifacts import ArtifactStore
from looper.stages import dpo, sft
from tests.conftest import FAST, ROOT, cache_sharing_models, compose, each_rank, looper_cli, on_two_processes
from tests.test_training import _pairs_dir


def _sft_args(cfg):
    return training.trainer_arguments(cfg.sft, "sft", SFTConfig, sft.looper_arguments(cfg, ROOT / "unused"))


def test_named_keys_and_the_passthrough_reach_trl(fast_cfg):
    cfg = fast_cfg("sft.weight_decay=0.1", "+sft.trainer.neftune_noise_alpha=5", "sft.optim=adamw_torch")
    args = _sft_args(cfg)
    assert (args.weight_decay, args.neftune_noise_alpha, args.optim) == (0.1, 5, "adamw_torch")
    assert (args.lr_scheduler_type, args.save_strategy, args.save_steps) == ("cosine", "steps", 200)
    default = _sft_args(fast_cfg())
    assert (default.weight_decay, default.neftune_noise_alpha, default.optim) == (0.0, None, "adamw_torch_fused")
    assert _sft_args(fast_cfg("sft.save_steps=0")).save_strategy == "no"
    held = fast_cfg("dpo.eval_fraction=0.25", "dpo.eval_steps=2", "+dpo.trainer.label_smoothing=0.1")
    args = training.trainer_arguments(held.dpo, "dpo", DPOConfig, dpo.looper_arguments(held, ROOT, evaluate=True))
    assert (args.eval_strategy, args.eval_steps, args.label_smoothing) == ("steps", 2, 0.1)


@pytest.mark.parametrize("section, args_class", [("sft", SFTConfig), ("dpo", DPOConfig)])
def test_every_named_trainer_key_reaches_trl(fast_cfg, section, args_class):
    values = {
        "weight_decay": 0.05,
        "lr_scheduler_type": "constant",
        "optim": "adamw_torch",
        "max_grad_norm": 0.5,
        "use_liger_kernel": True,
        "save_steps": 7,
        "save_total_limit": 3,
        "warmup_ratio": 0.2,
        "logging_steps": 4,
    }
    cfg = fast_cfg(*(f"{section}.{k}={v}" for k, v in values.items()))
    stage = {"sft": sft, "dpo": dpo}[section]
    args = training.trainer_arguments(
        getattr(cfg, section), section, args_class, stage.looper_arguments(cfg, ROOT / "unused")
    )
    found = {k: getattr(args, "warmup_steps" if k == "warmup_ratio" else k) for k in values}
    assert found == values


def spec_of(stage, cfg, store, up: dict) -> dict:
    """The identity of `stage`'s artifact over the upstreams it needs among `up`."""
    name = stage.__name__.rsplit(".", 1)[-1]
    return pipeline.stage_spec(cfg, store, name, {need: up[need] for need in pipeline.declared(stage.NEEDS, cfg)})


def test_a_trainer_key_changes_the_sft_artifact_key_and_a_logging_key_does_not(fast_cfg, artifacts):
    store = ArtifactStore(artifacts)
    key = lambda cfg: store.path("sft", pipeline.stage_spec(cfg, store, "sft", {"base": "tiny"})).name
    assert key(fast_cfg("sft.weight_decay=0.1")) != key(fast_cfg())
    assert key(fast_cfg("+sft.trainer.neftune_noise_alpha=5")) != key(fast_cfg())
    assert key(fast_cfg("sft.save_steps=7", "sft.logging_steps=3")) == key(fast_cfg())


def test_a_generation_limit_changes_the_rollout_key_but_not_the_trained_models(fast_cfg, artifacts):
    from looper.stages import rollout

    store = ArtifactStore(artifacts)
    up = {"base": "tiny", "sft": str(artifacts / "sft" / "s"), "preferences": str(artifacts / "preferences" / "p")}
    key = lambda stage, cfg: store.path("any", spec_of(stage, cfg, store, up)).name
    shorter = fast_cfg("model.max_new_tokens=24")
    assert key(rollout, shorter) != key(rollout, fast_cfg())  # what is sampled depends on it
    assert key(sft, shorter) == key(sft, fast_cfg()) and key(dpo, shorter) == key(dpo, fast_cfg())  # training not


def test_keys_the_chosen_options_never_read_leave_the_keys_alone(fast_cfg, artifacts):
    from looper.stages import rollout

    store = ArtifactStore(artifacts)
    up = {"base": "tiny", "sft": str(artifacts / "sft" / "s"), "preferences": str(artifacts / "preferences" / "p")}
    key = lambda stage, cfg: store.path("any", spec_of(stage, cfg, store, up)).name
    assert key(rollout, fast_cfg("rollout.budget=16", "rollout.waves=3")) == key(rollout, fast_cfg())  # uniform
    assert key(rollout, fast_cfg("rollout.allocation=thompson_sequential", "rollout.budget=16")) != key(
        rollout, fast_cfg("rollout.allocation=thompson_sequential", "rollout.budget=8")
    )
    assert key(sft, fast_cfg("lora.r=8", "lora.alpha=4")) == key(sft, fast_cfg())  # lora=none: full fine-tuning
    assert key(dpo, fast_cfg("lora.r=8")) == key(dpo, fast_cfg())
    assert key(sft, fast_cfg("lora=r64", "lora.r=8")) != key(sft, fast_cfg("lora=r64"))
    cell = lambda cfg: pipeline.eval_spec(cfg, store, str(artifacts / "sft" / "s"), "synthetic_test")
    assert cell(fast_cfg("eval.top_p=0.5")) == cell(fast_cfg())  # greedy decoding reads no top_p
    sampled = ("eval.temperature=0.5", "eval.samples=2")
    assert cell(fast_cfg(*sampled, "eval.top_p=0.5")) != cell(fast_cfg(*sampled))


@pytest.mark.parametrize(
    "override, message",
    [
        ("+reward.alpah=1", r"reward.alpah: not a config key \(did you mean reward.alpha\?\)"),
        ("+sft.weight_decayy=0.1", r"sft.weight_decayy: not a config key \(did you mean sft.weight_decay\?\)"),
        ("+arms.plain.temprature=1", r"arms.plain.temprature: not a config key"),
        ("+nonsense=1", r"nonsense: not a config key"),
    ],
)
def test_a_key_the_schema_does_not_know_fails_naming_it(override, message):
    with pytest.raises(ValueError, match=message):
        compose(override)


@pytest.mark.parametrize(
    "override, message",
    [
        ("+sft.trainer.weight_decayy=0.1", r"sft.trainer.weight_decayy: not an argument of TRL's SFTConfig"),
        ("+sft.trainer.weight_decay=0.1", r"sft.trainer.weight_decay: .*set sft.weight_decay"),
        ("+dpo.trainer.learning_rate=0.1", r"dpo.trainer.learning_rate: .*looper sets it"),
        ("+dpo.trainer.output_dir=x", r"dpo.trainer.output_dir: .*looper sets it"),
        ("+sft.trainer.activation_checkpointing=true", r"sft.trainer.activation_checkpointing: .*looper sets it"),
    ],
)
def test_the_passthrough_is_checked_against_trl_at_start(override, message):
    with pytest.raises(ValueError, match=message):
        preflight.check(compose("logger=none", "stage=sft", override))


@pytest.mark.parametrize(
    "override, message",
    [
        ("dpo.loss_type=not_a_loss", r"dpo.loss_type: got 'not_a_loss'; allowed: sigmoid, hinge, ipo"),
        ("dpo.optim=x", r"dpo.optim: got 'x'; allowed: .*adamw_torch"),
        ("sft.optim=x", r"sft.optim: got 'x'"),
        ("sft.lr_scheduler_type=x", r"sft.lr_scheduler_type: got 'x'; allowed: .*cosine"),
        ("eval.targets=[]", r"eval.targets: empty"),
        ("+dpo.trainer.loss_weights=[1.0,2.0]", r"dpo: TRL's DPOConfig refuses these settings: .*loss_weights"),
    ],
)
def test_a_trainer_or_eval_value_that_would_fail_hours_in_fails_at_start(override, message):
    with pytest.raises(ValueError, match=message):
        preflight.check(compose("logger=none", override))


@pytest.mark.parametrize(
    "override, message",
    [
        ("dpo.beta=1e308", r"dpo.beta: must be at most 100, got 1e\+308"),
        ("dpo.max_length=1", r"dpo.max_length: .*got 1"),
        ("dpo.compile=true dpo.use_liger_kernel=true", r"dpo.compile: not together with dpo.use_liger_kernel=true"),
    ],
)
def test_absurd_dpo_values_fail_at_start_naming_the_key(override, message):
    with pytest.raises(Exception, match=message):
        compose(*override.split())


@pytest.mark.parametrize("seed", ["-1", str(2**70)])
def test_a_seed_outside_the_generators_range_fails_naming_it(seed):
    with pytest.raises(Exception, match=r"seed: must be in \[0, 2\*\*32\)"):
        compose(f"seed={seed}")


def test_the_open_places_accept_new_keys():
    cfg = compose("+reward.scorer.window=3", "+dpo.trainer.label_smoothing=0.1")
    assert cfg.reward.scorer["window"] == 3 and cfg.dpo.trainer == {"label_smoothing": 0.1}


@pytest.mark.slow
def test_the_cli_refuses_an_added_key_before_running(tmp_path):
    result = looper_cli("+reward.alpah=1", "logger=none", f"paths.artifacts={tmp_path}", cwd=tmp_path, timeout=120)
    assert result.returncode != 0
    assert "reward.alpah: not a config key (did you mean reward.alpha?)" in result.stderr
    assert not (tmp_path / "sft").exists()  # nothing was built


KILLED = """
import os, signal, sys
from pathlib import Path
from transformers import TrainerCallback
from tests.conftest import compose
from looper import pipeline
from looper.stages import dpo, sft
from looper.artifacts import ArtifactStore

stage, kill_at, up, out, *overrides = sys.argv[1:]


def logged(rows):  # (sft under W&B) wait until the job's records up to here are on disk: W&B's writer is another
    import time  # process, and a preemption comes long after a run's start, not seconds after it

    from tests.wandb_files import records

    deadline = time.time() + 120
    while time.time() < deadline:
        for path in Path(out).glob("wandb/offline-run-*/run-*.wandb"):
            try:
                if sum(r.WhichOneof("record_type") == "history" for r in records(path)) >= rows:
                    return
            except Exception:  # a record being written: read again
                pass
        time.sleep(0.2)


class Kill(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == int(kill_at):
            if stage == "sft" and "logger=wandb" in overrides:
                logged(state.global_step // args.logging_steps - 1)  # (this step's log comes after on_step_end)
            os.kill(os.getpid(), signal.SIGKILL)


def attach(trainer):
    if not kill_at.startswith("saving:"):
        trainer.add_callback(Kill())
        return trainer
    # killed while writing a checkpoint: after its weights, before its optimizer and trainer_state.json
    original = trainer._save_optimizer_and_scheduler

    def torn(output_dir):
        if trainer.state.global_step == int(kill_at.split(":")[1]):
            os.kill(os.getpid(), signal.SIGKILL)
        return original(output_dir)

    trainer._save_optimizer_and_scheduler = torn
    return trainer


module = {"sft": sft, "dpo": dpo}[stage]
make_trainer = module.make_trainer
module.make_trainer = lambda *a, **k: attach(make_trainer(*a, **k))
cfg = compose(*overrides)
if stage == "sft":  # as a job: in its W&B run (out: the job's directory)
    from looper import tracking

    with tracking.job_run(cfg, Path(out)):
        pipeline.artifact(cfg, ArtifactStore(Path(cfg.paths.artifacts)), "sft")
else:
    dpo.build(cfg, {"sft": up, "preferences": up + "-pairs"}, Path(out))
"""


def _killed(stage: str, kill_at, up: str, out, overrides: list[str]) -> None:
    env = {  # (not this process's W&B service: a killed job's runs die with it, as another command's would)
        **{k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"},
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        "HF_HUB_OFFLINE": "1",
    }
    result = subprocess.run(
        [sys.executable, "-c", KILLED, stage, str(kill_at), up, str(out), *overrides],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == -9, result.stderr[-3000:]  # SIGKILLed where the callback said


def _weights(directory) -> dict:
    name = "adapter_model.safetensors" if (directory / "adapter_model.safetensors").exists() else "model.safetensors"
    return load_file(directory / name)


def _same(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def test_a_killed_sft_resumes_from_its_last_checkpoint_in_the_same_wandb_run(fast_cfg, tiny_sft, tmp_path, caplog):
    from looper import tracking
    from tests.wandb_files import Run

    settings = ("sft.max_steps=40", "sft.save_steps=10", "sft.logging_steps=5", "logger=wandb", "logger.mode=offline")
    cfg, store = fast_cfg(*settings), ArtifactStore(tiny_sft[1].root)
    overrides = [f"paths.artifacts={cfg.paths.artifacts}", *FAST, *settings]
    for job in ("killed", "resumed", "whole"):
        (tmp_path / job).mkdir()
    _killed("sft", 25, "", tmp_path / "killed", overrides)
    with caplog.at_level(logging.INFO, logger="looper.training"), tracking.job_run(cfg, tmp_path / "resumed"):
        resumed = pipeline.artifact(cfg, store, "sft")
    assert "sft: resuming from" in caplog.text and "checkpoint-20 (step 20)" in caplog.text
    assert not list((resumed / "trainer").glob("checkpoint-*"))  # the finished artifact keeps the model only
    with tracking.job_run(cfg, tmp_path / "whole"):  # the same command again, after it finished: a new run
        sft.build(cfg, {"base": tiny_sft[2]}, tmp_path / "whole")
    assert _same(_weights(resumed), _weights(tmp_path / "whole")) == 0.0  # step for step the uninterrupted run

    killed, again, whole = (
        Run(next((tmp_path / j / "wandb").glob("offline-run-*"))) for j in ("killed", "resumed", "whole")
    )
    assert killed.run.run_id == again.run.run_id != whole.run.run_id  # one run, continued
    curve = {row["sft/step"]: row["sft/loss"] for part in (killed, again) for row in part.history if "sft/loss" in row}
    assert sorted(curve) == list(range(5, 45, 5))  # every logged step, before and after the kill
    uninterrupted = {row["sft/step"]: row["sft/loss"] for row in whole.history if "sft/loss" in row}
    assert curve == pytest.approx(uninterrupted, rel=1e-5)
    # the final loss is the whole run's (a resumed trainer's own covers the steps since its checkpoint only)
    assert again.summary["sft/train_loss"] == pytest.approx(whole.summary["sft/train_loss"], rel=1e-5)
    assert again.summary["sft/train_loss"] == pytest.approx(sum(curve.values()) / len(curve), rel=1e-5)


@pytest.mark.parametrize(
    "kill_at, left, resumed_from",
    [
        ("5", ["checkpoint-2", "checkpoint-4"], "checkpoint-4 (step 4)"),
        ("saving:4", ["checkpoint-2", "checkpoint-4"], "checkpoint-2 (step 2)"),
    ],
)
def test_a_killed_dpo_resumes_from_its_last_checkpoint(
    fast_cfg, tiny_sft, tmp_path, caplog, kill_at, left, resumed_from
):
    settings = ("dpo.max_steps=6", "dpo.save_steps=2", "dpo.logging_steps=1")
    cfg = fast_cfg(*settings)
    up = str(tiny_sft[3])
    (tmp_path / "pairs").mkdir()
    pairs = _pairs_dir(cfg, up, tmp_path / "pairs")
    killed = tmp_path / "killed"
    killed.mkdir()
    (tmp_path / "up").symlink_to(up)
    (tmp_path / "up-pairs").symlink_to(pairs)
    overrides = [f"paths.artifacts={cfg.paths.artifacts}", *FAST, *settings]
    _killed("dpo", kill_at, str(tmp_path / "up"), killed, overrides)
    assert sorted(p.name for p in (killed / "trainer").glob("checkpoint-*")) == left
    with caplog.at_level(logging.INFO, logger="looper.training"):
        dpo.build(cfg, {"sft": up, "preferences": pairs}, killed)
    assert "dpo: resuming from" in caplog.text and resumed_from in caplog.text
    if kill_at.startswith("saving:"):  # torn: weights written, no trainer_state.json
        assert "checkpoint-4 was not completely written" in caplog.text
    whole = tmp_path / "whole"
    whole.mkdir()
    dpo.build(cfg, {"sft": up, "preferences": pairs}, whole)
    assert _same(_weights(killed), _weights(whole)) == 0.0
    first = [json.loads((d / "reference_check.json").read_text())["first_step_train_mode"] for d in (killed, whole)]
    assert first[0]["step"] == 1 and first[0] == first[1]  # step 1's figures, though the resumed run began at 5


ARGUMENTS_ON_EACH_RANK = """
import json, sys
from pathlib import Path
from trl import DPOConfig, SFTConfig
from looper import distributed, training
from looper.stages import dpo, sft
from tests.conftest import FAST, compose
distributed.init()
cfg = compose(*FAST)
for name, args_class, module in (("sft", SFTConfig, sft), ("dpo", DPOConfig, dpo)):
    section, derived = getattr(cfg, name), module.looper_arguments(cfg, Path(sys.argv[1]))
    args = training.trainer_arguments(section, name, args_class, derived)
    print("ARGS", json.dumps([name, args.process_index, args.world_size, args.should_save]), flush=True)
"""


def test_on_two_cpu_processes_the_trainers_are_distributed_and_rank_0_alone_saves(tmp_path):
    script = tmp_path / "arguments.py"
    script.write_text(ARGUMENTS_ON_EACH_RANK)
    result = on_two_processes(str(script), str(tmp_path))
    assert result.returncode == 0, each_rank(result)
    seen = sorted(json.loads(line.split("ARGS ", 1)[1]) for line in result.stdout.splitlines() if "ARGS " in line)
    # (without `use_cpu` transformers made each process a world of one: both trained on everything and both saved)
    assert seen == [[name, rank, 2, rank == 0] for name in ("dpo", "sft") for rank in (0, 1)]


GLOBAL_BATCH_ON_EACH_RANK = """
import json, sys
from pathlib import Path
from trl import DPOConfig, SFTConfig
from looper import distributed, training
from looper.stages import dpo, sft
from tests.conftest import FAST, compose
distributed.init()
cfg = compose(*FAST, "sft.batch_size=2", "sft.global_batch_size=8", "dpo.batch_size=1", "dpo.global_batch_size=4")
for name, args_class, module in (("sft", SFTConfig, sft), ("dpo", DPOConfig, dpo)):
    args = training.trainer_arguments(
        getattr(cfg, name), name, args_class, module.looper_arguments(cfg, Path(sys.argv[1]))
    )
    effective = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
    print("BATCH", json.dumps([name, args.world_size, args.gradient_accumulation_steps, effective]), flush=True)
    print("LOGGED", json.dumps(training.effective_batch(getattr(cfg, name), name)), flush=True)
"""


def test_a_global_batch_is_the_effective_batch_on_one_process_and_on_two(tmp_path):
    script = tmp_path / "batch.py"
    script.write_text(GLOBAL_BATCH_ON_EACH_RANK)
    seen = []
    for result in (
        subprocess.run(
            [sys.executable, str(script), str(tmp_path)],
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            capture_output=True,
            text=True,
            timeout=300,
        ),
        on_two_processes(str(script), str(tmp_path)),
    ):
        assert result.returncode == 0, each_rank(result)
        seen += [json.loads(line.split("BATCH ", 1)[1]) for line in result.stdout.splitlines() if "BATCH " in line]
    # sft: 8 sequences a step = 2 a device x 4 accumulation x 1, or x 2 accumulation x 2; dpo: 4 pairs
    assert sorted(map(tuple, seen)) == sorted(
        [("sft", 1, 4, 8), ("dpo", 1, 4, 4)] + [("sft", 2, 2, 8), ("dpo", 2, 2, 4)] * 2
    )
    logged = [json.loads(line.split("LOGGED ", 1)[1]) for line in result.stdout.splitlines() if "LOGGED " in line]
    assert {(row.get("sft/effective_batch_size"), row.get("sft/processes")) for row in logged} >= {(8, 2)}


def test_a_global_batch_the_devices_do_not_divide_fails_at_start_naming_it(fast_cfg):
    cfg = fast_cfg("dpo.batch_size=4", "dpo.global_batch_size=6")
    with pytest.raises(ValueError, match=r"dpo.global_batch_size=6 is not a multiple of dpo.batch_size=4"):
        preflight.check(cfg)
    assert training.accumulation_steps(fast_cfg("sft.gradient_accumulation_steps=3").sft, "sft") == 3  # no global


def test_a_two_process_sft_with_checkpoints_finishes(tiny_sft, tmp_path):
    cache = cache_sharing_models(tiny_sft[1].root, tmp_path / "cache")
    settings = ["sft.max_steps=6", "sft.save_steps=2", "sft.save_total_limit=1"]  # a new SFT key: trained here
    result = on_two_processes(
        "-m", "looper", f"paths.artifacts={cache}", f"hydra.run.dir={tmp_path / 'run'}", *FAST, *settings, "stage=sft"
    )
    assert result.returncode == 0, each_rank(result)
    (made,) = [p for p in (cache / "sft").iterdir() if p.is_dir() and not p.is_symlink()]
    assert (made / "DONE").is_file() and not list((made / "trainer").glob("checkpoint-*"))


def test_a_dpo_eval_split_holds_out_whole_questions(fast_cfg, tiny_sft, tmp_path):
    rows = [{"question_id": q, "i": i} for q in range(10) for i in range(2)]
    train, held = dpo.split_pairs(rows, 0.3, seed=0)
    assert len(held) == 6 and {r["question_id"] for r in train}.isdisjoint({r["question_id"] for r in held})
    assert dpo.split_pairs(rows, 0.3, seed=0) == (train, held) and dpo.split_pairs(rows, 0.0, 0) == (rows, [])
    cfg = fast_cfg("dpo.eval_fraction=0.25", "dpo.eval_steps=1", "dpo.max_steps=2")
    pairs = _pairs_dir(cfg, str(tiny_sft[3]), tmp_path)
    lines = (pairs / "pairs.jsonl").read_text().splitlines()
    (pairs / "pairs.jsonl").write_text(
        "".join(json.dumps({**json.loads(line), "question_id": i}) + "\n" for i, line in enumerate(lines))
    )
    trainer = dpo.make_trainer(cfg, tiny_sft[3], pairs, tmp_path)
    assert (len(trainer.train_dataset), len(trainer.eval_dataset)) == (6, 2)
    trainer.train()
    evals = [e for e in trainer.state.log_history if "eval_loss" in e]
    assert len(evals) == 2 and all(torch.isfinite(torch.tensor(e["eval_loss"])) for e in evals)
    assert "eval_rewards/margins" in evals[0]


def test_an_sft_eval_on_dev_problems_logs_its_loss_and_leaves_the_weights_alone(fast_cfg, tiny_sft, tmp_path):
    settings = ("sft.max_steps=6", "sft.save_steps=0")
    plain = sft.make_trainer(fast_cfg(*settings), tiny_sft[2], tmp_path / "plain")
    assert plain.eval_dataset is None and plain.args.eval_strategy == "no"
    plain.train()  # (before the next trainer's arguments reset accelerate's state)
    held = sft.make_trainer(fast_cfg(*settings, "sft.eval_examples=8", "sft.eval_steps=3"), tiny_sft[2], tmp_path / "e")
    assert len(held.eval_dataset) == 8
    held.train()
    evals = [e for e in held.state.log_history if "eval_loss" in e]
    assert [e["step"] for e in evals] == [3, 6] and all(torch.isfinite(torch.tensor(e["eval_loss"])) for e in evals)
    ours, theirs = plain.model.state_dict(), held.model.state_dict()
    assert max((ours[k] - theirs[k]).abs().max().item() for k in ours) == 0.0  # so it stays out of the key


def test_looper_sets_the_trainers_arguments_without_deprecation_warnings(fast_cfg):
    import warnings

    cfg = fast_cfg()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _sft_args(cfg)
        training.trainer_arguments(cfg.dpo, "dpo", DPOConfig, dpo.looper_arguments(cfg, ROOT))
    assert [str(w.message) for w in caught if issubclass(w.category, (DeprecationWarning, FutureWarning))] == []


def test_a_checkpoint_torn_by_a_kill_is_deleted_and_the_one_before_it_resumes(tmp_path, caplog):
    trainer = tmp_path / "trainer"
    for step in (2, 4, 6):
        (trainer / f"checkpoint-{step}").mkdir(parents=True)
        (trainer / f"checkpoint-{step}" / "optimizer.pt").write_bytes(b"")
    (trainer / "checkpoint-2" / "trainer_state.json").write_text("{}")
    (trainer / "checkpoint-4" / "trainer_state.json").write_text("{}")  # checkpoint-6: killed while saving
    with caplog.at_level(logging.INFO, logger="looper.training"):
        assert training.last_checkpoint(trainer, "dpo") == str(trainer / "checkpoint-4")
    assert "checkpoint-6 was not completely written" in caplog.text and not (trainer / "checkpoint-6").exists()
    assert training.last_checkpoint(tmp_path / "nothing", "sft") is None


@pytest.mark.parametrize("section", ["sft", "dpo"])
def test_compile_compiles_the_decoder_layers_and_trains_as_before(fast_cfg, tiny_sft, tmp_path, monkeypatch, section):
    from torch._dynamo.utils import counters

    from looper.engine.kernels import fused

    monkeypatch.setattr(fused, "COMPILE_BACKEND", "eager")  # dynamo traces the layers; no C++ build on a CPU
    losses = {}
    for compiled in (False, True):
        cfg = fast_cfg(f"{section}.max_steps=2", f"{section}.save_steps=0", f"{section}.compile={compiled}")
        out = tmp_path / str(compiled)
        out.mkdir()
        if section == "sft":
            trainer = sft.make_trainer(cfg, tiny_sft[2], out)
        else:
            trainer = dpo.make_trainer(cfg, tiny_sft[3], _pairs_dir(cfg, str(tiny_sft[3]), out), out)
        layers = [m for m in trainer.model.modules() if type(m).__name__ == "LlamaDecoderLayer"]
        assert layers and all((m._compiled_call_impl is not None) == compiled for m in layers)
        traced = counters["stats"]["unique_graphs"]
        losses[compiled] = trainer.train().training_loss
        assert (counters["stats"]["unique_graphs"] > traced) == compiled
    assert losses[True] == pytest.approx(losses[False], rel=1e-4)


def test_compile_leaves_a_quantized_base_uncompiled(tiny_sft, monkeypatch, caplog):
    from looper import models

    cfg, _, base, _ = tiny_sft
    model = models.load_causal_lm(str(base), cfg.model, cfg.lora)
    monkeypatch.setattr(model.config, "quantization_config", {"quant_method": "bitsandbytes"}, raising=False)
    training.compile_layers(model, "sft")
    assert "sft.compile: not for a quantized base" in caplog.text
    assert all(m._compiled_call_impl is None for m in model.modules())
