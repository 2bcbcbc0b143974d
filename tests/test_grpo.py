"""The `grpo` stage: the group is the arm-set, the reward TRL sums is looper's, a killed run resumes to the same
adapter, and the stage reads only what its identity holds."""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from safetensors.torch import load_file

from looper import coherence, pipeline, prompts
from looper.artifacts import ArtifactStore
from looper.data import synthetic_splits
from looper.stages import grpo
from tests.conftest import FAST, ROOT, compose
from tests.test_identity import build_recorded, check

GRPO = ["grpo.max_steps=4", "grpo.save_steps=2", "grpo.num_questions=8", "grpo.max_new_tokens=24"]


def _trainer(model, tokenizer, step: int = 0):
    """What `Rollouts` asks of TRL's trainer."""
    return SimpleNamespace(
        model=model,
        processing_class=tokenizer,
        state=SimpleNamespace(global_step=step),
        accelerator=SimpleNamespace(unwrap_model=lambda m: m),
    )


def test_a_group_of_arms_is_one_completion_per_arm_with_its_prompt_and_temperature(fixed_model, tmp_path):
    _, model, tokenizer = fixed_model
    cfg = compose("debug=fast", "arms=regime_w", "grpo.max_new_tokens=12", "reward.cf_samples=1")
    problems = synthetic_splits(cfg.data)["train"][:2]
    rollouts = grpo.Rollouts(cfg, problems, tmp_path / "generation.rank0.jsonl")
    jobs = []
    run = grpo.Sampler.run

    def spy(self, batch, on_result=None, logprobs=False):
        jobs.extend(batch if logprobs else [])  # (the group's completions; continuations for s_cf come unlogged)
        return run(self, batch, on_result, logprobs)

    size = len(cfg.arms)
    texts = [p["question"] for p in problems for _ in range(size)]  # TRL repeats each prompt once per member
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(grpo.Sampler, "run", spy)
        out = rollouts(texts, _trainer(model, tokenizer, step=3))
    assert out["arm"] == list(cfg.arms) * 2  # each question: every arm once, in order
    for i, (prompt, arm, _) in enumerate(jobs):
        name = list(cfg.arms)[i % size]
        assert arm is cfg.arms[name] and arm.temperature == cfg.arms[name].temperature
        assert prompt == prompts.build_prompt(cfg.model, tokenizer, problems[i // size]["question"], cfg.arms[name])
        assert out["prompt_ids"][i] == prompts.encode_prompt(tokenizer, prompt)  # one BOS, as training sees it
    assert len({a.temperature for _, a, _ in jobs}) > 1  # (regime_w's arms sample at several temperatures)
    assert len({seed for *_, seed in jobs}) == len(jobs)
    again = rollouts(texts, _trainer(model, tokenizer, step=3))
    assert again["completion_ids"] == out["completion_ids"]  # a step's samples are reproducible
    later = rollouts(texts, _trainer(model, tokenizer, step=4))
    assert later["completion_ids"] != out["completion_ids"]  # and the next step's are new
    assert all(len(c) == len(lp) for c, lp in zip(out["completion_ids"], out["logprobs"]))


def test_group_samples_is_plain_grpo_over_the_models_own_prompt(fixed_model, tmp_path):
    _, model, tokenizer = fixed_model
    cfg = compose("debug=fast", "grpo.group=samples", "grpo.num_generations=4", "grpo.temperature=0.8")
    assert [(name, k) for name, k, _ in grpo.group(cfg)] == [("model", k) for k in range(4)]
    question = synthetic_splits(cfg.data)["train"][0]["question"]
    out = grpo.Rollouts(cfg, synthetic_splits(cfg.data)["train"][:1], tmp_path / "g.jsonl")(
        [question] * 4, _trainer(model, tokenizer)
    )
    assert len(set(map(tuple, out["prompt_ids"]))) == 1
    own = prompts.build_prompt(cfg.model, tokenizer, question)  # no arm: no system prompt, no style
    assert out["prompt_ids"][0] == prompts.encode_prompt(tokenizer, own)


@pytest.mark.parametrize("scorer_returns", ["components", "reward"])
def test_the_reward_trl_sums_is_looppers_reward_of_the_same_records(scorer_returns):
    cfg = compose(
        "debug=fast",
        "reward.alpha=1.0",
        "reward.beta=0.7",
        "reward.length_penalty=0.3",
        f"reward.scorer_returns={scorer_returns}",
    )
    records = [
        {"correct": True, "s_end": 0.5, "s_path": 1.0, "s_cf": None, "num_tokens": 40},
        {"correct": False, "s_end": 0.25, "s_path": 0.0, "s_cf": 0.5, "num_tokens": 250},
    ]
    if scorer_returns == "reward":
        records = [{**r, "reward": value} for r, value in zip(records, (0.9, -0.2))]
    fields = {  # what `Rollouts` hands TRL for these records
        "correct": [r["correct"] for r in records],
        "s_wm": [coherence.weighted(r, cfg.reward) or 0.0 for r in records],
        "num_tokens": [r["num_tokens"] for r in records],
        "reward": [coherence.reward_of(r, cfg.reward) for r in records],
    }
    funcs, weights = grpo.reward_functions(cfg)
    # TRL: reward = sum over functions of weight x function(completions, **fields) (sum_then_normalize)
    summed = [sum(w * f(completions=["", ""], **fields)[i] for f, w in zip(funcs, weights)) for i in range(2)]
    assert summed == pytest.approx([coherence.reward_of(r, cfg.reward) for r in records])
    assert len(funcs) == (1 if scorer_returns == "reward" else 3)


KILLED = """
import os, signal, sys
from pathlib import Path
from transformers import TrainerCallback
from tests.conftest import compose
from looper import pipeline
from looper.artifacts import ArtifactStore
from looper.stages import grpo

kill_at, *overrides = sys.argv[1:]


class Kill(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == int(kill_at):
            os.kill(os.getpid(), signal.SIGKILL)


make_trainer = grpo.make_trainer
grpo.make_trainer = lambda *a, **k: (lambda t: t.add_callback(Kill()) or t)(make_trainer(*a, **k))
cfg = compose(*overrides)
pipeline.artifact(cfg, ArtifactStore(Path(cfg.paths.artifacts)), "grpo")
"""


def test_a_killed_grpo_run_resumes_from_its_checkpoint_to_the_same_adapter(fast_cfg, tiny_sft, tmp_path, caplog):
    cfg = fast_cfg(*GRPO)
    store = ArtifactStore(tiny_sft[1].root)
    overrides = [f"paths.artifacts={cfg.paths.artifacts}", *FAST, *GRPO]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    killed = subprocess.run(
        [sys.executable, "-c", KILLED, "3", *overrides], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900
    )
    assert killed.returncode == -9, killed.stderr[-3000:]  # SIGKILLed after step 3, checkpoint-2 on disk
    with caplog.at_level("INFO", logger="looper.training"):
        resumed = pipeline.artifact(cfg, store, "grpo")
    assert "grpo: resuming from" in caplog.text and "checkpoint-2 (step 2)" in caplog.text
    whole = tmp_path / "whole"
    whole.mkdir()
    grpo.build(cfg, {"sft": tiny_sft[3]}, whole)
    a, b = (load_file(d / "adapter_model.safetensors") for d in (resumed, whole))
    assert a.keys() == b.keys() and all((a[k] - b[k]).abs().max().item() == 0.0 for k in a)
    stats = json.loads((resumed / "stats.json").read_text())
    assert stats["steps"] == 4 and stats["group_size"] == 8 and stats["reward_first"] is not None
    # TRL's logged reward is looper's: alpha x correct + beta x s_wm - length penalty, term by term
    assert stats == json.loads((whole / "stats.json").read_text()) | {"generation": stats["generation"]}


def test_grpo_reads_only_what_its_identity_holds(fast_cfg, tiny_sft, tmp_path):
    for group in ("arms", "samples"):
        cfg = fast_cfg("grpo.max_steps=1", "grpo.num_questions=2", "grpo.max_new_tokens=8", f"grpo.group={group}")
        reads, declared = build_recorded(grpo, cfg, {"sft": tiny_sft[3]}, tmp_path / group)
        print(group, "declared, never read:", check("grpo", cfg, reads, declared))
        assert ("arms" in reads) is (group == "arms")
    assert Path(tmp_path / "arms" / "adapter_model.safetensors").exists()


def test_stage_grpo_from_the_command_line_is_evaluated_logged_and_exported(artifacts, tiny_sft, tmp_path):
    from looper.artifacts import read_jsonl
    from tests.conftest import looper_cli
    from tests.wandb_files import Run

    settings = [f"paths.artifacts={artifacts}", *FAST, "grpo.max_steps=2", "grpo.num_questions=4"]
    result = looper_cli(
        *settings,
        f"hydra.run.dir={tmp_path / 'eval'}",
        "stage=eval",
        "eval.targets=[sft,grpo]",
        "logger=wandb",
        "logger.mode=offline",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    table = (tmp_path / "eval" / "eval_table.md").read_text()
    assert "| synthetic_test | grpo |" in table and "| synthetic_test | sft |" in table
    assert "| sft → grpo | strict | 16 |" in (tmp_path / "eval" / "report.md").read_text()  # paired, as DPO is
    built = {r["stage"] for r in read_jsonl(tmp_path / "eval" / "artifacts.jsonl") if r["status"] == "made"}
    assert "grpo" in built
    run = Run(next((tmp_path / "eval" / "wandb").glob("offline-run-*")))
    rows = [row for row in run.history if "grpo/rewards/correct/mean" in row]
    assert [row["grpo/step"] for row in rows] == [1, 2] and "eval/synthetic_test/grpo/acc_strict" in run.summary
    cfg = compose(*FAST)  # TRL's logged reward is its weighted sum of looper's terms: alpha, beta, length penalty
    for row in rows:
        terms = [row[f"grpo/rewards/{name}/mean"] for name in ("correct", "s_wm", "length")]
        weights = (cfg.reward.alpha, cfg.reward.beta, cfg.reward.length_penalty)
        assert row["grpo/reward"] == pytest.approx(sum(w * t for w, t in zip(weights, terms)), abs=1e-5)
    assert any(a.name.startswith("grpo-") for a in run.logged)
    exported = looper_cli(
        *settings, f"hydra.run.dir={tmp_path / 'export'}", "stage=export", "export.source=grpo", "logger=none"
    )
    assert exported.returncode == 0, exported.stderr[-3000:]
    made = [r for r in read_jsonl(tmp_path / "export" / "artifacts.jsonl") if r["stage"] == "export"]
    assert (Path(made[0]["path"]) / "model.safetensors").exists()
