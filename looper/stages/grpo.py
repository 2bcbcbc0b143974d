"""Stage `grpo`: online RL from the SFT policy with TRL's GRPOTrainer, sampling through looper's engine, the arm-set
as the group.

TRL owns the objective (`GRPOConfig`: loss type, clipping, KL, advantage scaling, ...; any argument through
`+grpo.trainer.<arg>=...`); looper owns what it samples and how it is rewarded:

- **Generation** is TRL's `rollout_func` hook: each batch's completions come from looper's engine (`looper.engine`,
  the `generation.*` backend) on the live policy in this process (no weight copy or sync; the LoRA unmerged), with
  the prompt ids as training sees them (one BOS), the completion ids and each sampled token's log-prob. Each row's
  seed is drawn from the run seed, the question, the arm, the sample and the optimizer step (`seeds.row_seed`), so a
  step's samples are reproducible and a resumed run samples what an uninterrupted one would.
- **The group** (the completions GRPO normalises advantages over) is the arm-set with `grpo.group=arms`: each arm
  samples its `samples` completions of the question with its own system prompt, style and temperature, as a
  rollout would; with `grpo.group=samples`, `grpo.num_generations` completions of the model's own prompt.
- **The reward** is looper's: the group is scored as a rollout's question is (`scoring.score_together`: the
  configured scorer, s_cf continuations from the same policy), then `reward.alpha * correct + reward.beta * s_wm -
  reward.length_penalty * num_tokens / reward.length_unit`, passed to TRL as three reward functions with those
  weights, so TRL logs each component (`grpo/rewards/correct/mean`, ...) and sums them into the reward
  (`coherence.reward_of`); a scorer in the plans' shape (`reward.scorer_returns=reward`) gives the reward itself.

Artifact: the trained adapter and tokenizer (like DPO's), `stats.json` (steps, the reward at the start and the end,
generation figures: looper/throughput.py).
"""

import json
import logging
import os
from collections import Counter
from pathlib import Path
from typing import Optional

from hydra.utils import instantiate

from looper import coherence, distributed, throughput, tracking, training
from looper.config import ArmConfig, Config
from looper.data import load_splits
from looper.models import SERVED_MODEL, TRAINED_MODEL, adapter_reads, known_warnings, served_reads
from looper.scoring import Sampler, score_together, trajectory_records
from looper.seeds import row_seed

log = logging.getLogger(__name__)

OWN_PROMPT = "model"  # the arm name of grpo.group=samples: the model's own prompt


def group(cfg: Config) -> list[tuple[str, int, ArmConfig]]:
    """A question's group, in order: (arm name, sample index, arm) per completion."""
    if cfg.grpo.group == "samples":
        arm = ArmConfig(temperature=cfg.grpo.temperature, top_p=cfg.grpo.top_p)
        return [(OWN_PROMPT, k, arm) for k in range(cfg.grpo.num_generations)]
    return [(name, k, arm) for name, arm in cfg.arms.items() for k in range(arm.samples)]


def reward_functions(cfg: Config) -> tuple[list, list[float]]:
    """(TRL reward functions, their weights): looper's reward as a weighted sum TRL computes and logs term by term;
    each function reads a field the rollout function scored (`Rollouts`)."""

    def correct(completions, correct, **_):
        return [float(c) for c in correct]

    def s_wm(completions, s_wm, **_):
        return [float(s) for s in s_wm]

    def length(completions, num_tokens, **_):
        return [-n / cfg.reward.length_unit for n in num_tokens]

    def reward(completions, reward, **_):
        return [float(r) for r in reward]

    if cfg.reward.scorer_returns == "reward":
        return [reward], [1.0]
    return [correct, s_wm, length], [cfg.reward.alpha, cfg.reward.beta, cfg.reward.length_penalty]


class Rollouts:
    """TRL's `rollout_func`: a batch's prompts (each question's text, repeated once per member of its group) in,
    completions from the engine and their scored fields out."""

    def __init__(self, cfg: Config, problems: list[dict], figures: Path):
        self.cfg, self.figures = cfg, figures
        self.problems = {p["question"]: p for p in problems}
        self.group = group(cfg)
        self.sampler: Optional[Sampler] = None
        self.scorer = instantiate(cfg.reward.scorer, _partial_=True)

    def __call__(self, prompts: list[str], trainer) -> dict:
        model = trainer.accelerator.unwrap_model(trainer.model)
        if self.sampler is None:  # (one engine for the run: it serves the live weights)
            arms = {name: arm for name, _, arm in self.group}
            tokenizer, limit = trainer.processing_class, self.cfg.grpo.max_new_tokens
            self.sampler = Sampler(self.cfg, model, tokenizer, self.figures, len(prompts), limit, arms)
        self.sampler.generator.batch_size = len(prompts)  # every row TRL asks for at once decodes together
        step, seen, keys = trainer.state.global_step, Counter(), []
        for text in prompts:
            problem, n = self.problems[text], seen[text]
            seen[text] += 1
            name, k, arm = self.group[n % len(self.group)]
            keys.append((problem, name, arm, k, row_seed(self.cfg.seed, problem["id"], name, k, "grpo", step, n)))
        was_training = model.training
        model.eval()  # (dropout off while sampling)
        try:
            jobs = [(self.sampler.prompt(p["question"], arm), arm, seed) for p, _, arm, _, seed in keys]
            outputs = self.sampler.run(jobs, logprobs=True)
            records = self._score(keys, outputs)
        finally:
            model.train(was_training)
        return {
            "prompt_ids": [o.prompt_ids for o in outputs],
            "completion_ids": [o.token_ids for o in outputs],
            "logprobs": [o.logprobs for o in outputs],
            "arm": [r["arm"] for r in records],
            "correct": [r["correct"] for r in records],
            "s_wm": [coherence.weighted(r, self.cfg.reward) or 0.0 for r in records],
            "num_tokens": [r["num_tokens"] for r in records],
            "reward": [coherence.reward_of(r, self.cfg.reward) for r in records],
        }

    def _score(self, keys: list, outputs: list) -> list[dict]:
        """The records of the batch's completions, in batch order: each question's group scored together."""
        order, members = [], {}
        for i, (problem, *_) in enumerate(keys):
            if problem["id"] not in members:
                order.append(problem)
                members[problem["id"]] = []
            members[problem["id"]].append(i)
        trajectories = [
            trajectory_records(
                self.cfg, p, [((keys[i][1], keys[i][2], keys[i][3], keys[i][4]), outputs[i]) for i in members[p["id"]]]
            )
            for p in order
        ]
        scored = score_together(self.cfg, self.sampler, self.scorer, order, trajectories)
        records = [None] * len(keys)
        for problem, group_records in zip(order, scored):
            for i, record in zip(members[problem["id"]], group_records):
                records[i] = record
        return records


def looper_arguments(cfg: Config, out: Path) -> dict:
    """The GRPOConfig arguments looper derives from the schema (training.trainer_arguments adds the named keys, the
    checkpoints and the pass-through)."""
    size = len(group(cfg))
    return dict(
        output_dir=str(out / "trainer"),
        num_generations=size,
        per_device_train_batch_size=size * cfg.grpo.questions_per_batch,
        gradient_accumulation_steps=cfg.grpo.gradient_accumulation_steps,
        max_completion_length=cfg.grpo.max_new_tokens or cfg.model.max_new_tokens,
        temperature=cfg.grpo.temperature,
        learning_rate=cfg.grpo.learning_rate,
        max_steps=cfg.grpo.max_steps,
        beta=cfg.grpo.beta,
        loss_type=cfg.grpo.loss_type,
        epsilon=cfg.grpo.epsilon,
        num_iterations=cfg.grpo.num_iterations,
        scale_rewards=cfg.grpo.scale_rewards,
        mask_truncated_completions=cfg.grpo.mask_truncated_completions,
        warmup_steps=cfg.grpo.warmup_ratio,  # a float below 1: a share of the steps
        gradient_checkpointing=cfg.grpo.gradient_checkpointing,
        logging_steps=cfg.grpo.logging_steps,
        reward_weights=reward_functions(cfg)[1],
        report_to="none",  # the job's W&B run gets the curves through training.trainer_callbacks
        seed=cfg.seed,
        **training.trainer_device(cfg),
    )


def make_trainer(cfg: Config, sft_dir: Path, out: Path):
    """The configured GRPOTrainer: the SFT policy made trainable, looper's engine as its sampler and looper's reward."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    problems = load_splits(cfg.data)["train"][: cfg.grpo.num_questions]
    model, tokenizer, peft_config = training.trainable_policy(cfg, sft_dir, cfg.grpo.fresh_lora)
    tokenizer.padding_side = "left"
    funcs, _ = reward_functions(cfg)
    args = training.trainer_arguments(cfg.grpo, "grpo", GRPOConfig, looper_arguments(cfg, out))
    dataset = Dataset.from_list([{"prompt": p["question"]} for p in problems])
    rollouts = Rollouts(cfg, problems, out / f"generation.rank{distributed.rank()}.jsonl")
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # (rollout_func is TRL's documented hook)
    with known_warnings():
        return GRPOTrainer(
            model=model,
            reward_funcs=funcs,
            args=args,
            train_dataset=dataset,
            processing_class=tokenizer,
            peft_config=peft_config,
            rollout_func=rollouts,
        )


def _train(cfg: Config, sft_dir: Path, out: Path) -> None:
    tracker = tracking.current()  # the job's W&B run (looper/__main__.py opens it)
    trainer = make_trainer(cfg, sft_dir, out)
    for callback in training.trainer_callbacks("grpo"):  # the curves, into the job's run
        trainer.add_callback(callback)
    per_step = cfg.grpo.questions_per_batch * cfg.grpo.gradient_accumulation_steps * distributed.world_size()
    log.info(
        "grpo: %d questions an optimizer step (%d per device x %d accumulation x %d processes), groups of %d (%s)",
        per_step,
        cfg.grpo.questions_per_batch,
        cfg.grpo.gradient_accumulation_steps,
        distributed.world_size(),
        len(group(cfg)),
        cfg.grpo.group,
    )
    tracker.config({"grpo/questions_per_step": per_step, "grpo/group_size": len(group(cfg))})
    with known_warnings():
        result = trainer.train(resume_from_checkpoint=training.last_checkpoint(out / "trainer", "grpo"))
    training.ensure_finite("grpo", trainer, result.training_loss, "grpo.learning_rate")
    rewards = [entry["reward"] for entry in trainer.state.log_history if "reward" in entry]
    stats = {
        "steps": trainer.state.global_step,
        "group": cfg.grpo.group,
        "group_size": len(group(cfg)),
        "reward_first": rewards[0] if rewards else None,
        "reward_last": rewards[-1] if rewards else None,
        "train_loss": training.whole_run_loss(trainer.state.log_history),
    }
    if distributed.is_main_process():
        training.drop_checkpoints(out / "trainer")
        stats["generation"] = throughput.summary(out)
        (out / "stats.json").write_text(json.dumps(stats, indent=2))
        training.save_policy(cfg, trainer, out)
    tracker.summary({f"grpo/{k}": v for k, v in stats.items() if isinstance(v, (int, float))})
    log.info(
        "grpo: %d steps, group %s of %d, mean reward %s -> %s",
        stats["steps"],
        cfg.grpo.group,
        stats["group_size"],
        stats["reward_first"],
        stats["reward_last"],
    )


NEEDS = ("sft",)  # the artifacts this stage builds on (looper/pipeline.py resolves them)
ENSURE = {"collective": True, "resumable": True}  # every process trains; a crash resumes from the last checkpoint


def READS(cfg: Config) -> tuple:
    """The config GRPO reads: its section (less the plain group's keys under grpo.group=arms), the problems, the
    group's arms (grpo.group=arms), the reward and its scorer, how answers are read, the prompt format and the adapter,
    and how the policy is served."""
    arms = cfg.grpo.group == "arms"
    return (
        "seed",
        "data",
        "grpo",
        *(("arms", "-grpo.num_generations", "-grpo.top_p") if arms else ()),
        "reward",
        "rollout.answer_scorer",
        *TRAINED_MODEL,
        *SERVED_MODEL,
        *adapter_reads(cfg),
        *served_reads(cfg),
    )


def build(cfg: Config, up: dict, out: Path) -> None:
    """Train the SFT policy online on the training questions into `out` (the policy adapter and the tokenizer)."""
    _train(cfg, Path(up["sft"]), out)
