"""The schemas of the stages that build artifacts: what runs, SFT, rollouts, preferences and DPO (evaluation, export and
generation: `evaluation.py`)."""

from dataclasses import dataclass
from typing import Any, Dict, Optional

from looper.config.fields import SCORERS, STAGES, _check, _choice, _fraction, _positive, doc
from looper.config.model import LoraSettings


@dataclass
class StageConfig:
    name: str = doc(
        "What runs: sft, rollout, preferences, dpo, grpo (online RL), eval, pipeline (sft to dpo, then a table) or "
        "export (a standalone model).",
        "pipeline",
    )

    def __post_init__(self):
        _choice(self.name, "stage", STAGES)


COMPILE = (
    "torch.compile each decoder layer (one compiled code serves them all): a LoRA step's hundreds of small kernels "
    "become a few fused ones a layer. The first steps pay the compilation (minutes for a 7B model), so it is for "
    "runs of many steps; on a CPU it needs a C++ compiler. A quantized base trains uncompiled. Not together with "
    "use_liger_kernel."
)


@dataclass
class TrainerSettings:
    """The TRL arguments SFT and DPO both name (looper/training.py passes them on), their checkpoints and the
    pass-through of any other argument."""

    weight_decay: float = doc("AdamW weight decay.", 0.0)
    lr_scheduler_type: str = doc(
        "Learning-rate schedule (transformers' SchedulerType: linear, cosine, constant, ...).", "cosine"
    )
    optim: str = doc(
        "Optimizer (transformers' OptimizerNames: adamw_torch_fused, adamw_torch, adamw_8bit, ...).",
        "adamw_torch_fused",
    )
    max_grad_norm: float = doc("Gradient clipping norm.", 1.0)
    use_liger_kernel: bool = doc("Liger's fused Triton kernels (needs `liger-kernel`; GPU).", False)
    global_batch_size: Optional[int] = doc(
        "Examples (sft: sequences, dpo: pairs) per optimizer step over all processes: gradient accumulation follows "
        "as global_batch_size / (batch_size x processes), so a run means the same on one GPU or several (the log and "
        "the W&B config give the effective batch). null: batch_size x gradient_accumulation_steps x processes.",
        None,
    )
    save_steps: int = doc(
        "Save a checkpoint every N optimizer steps into the artifact's `.partial/trainer/`; a crashed or killed run "
        "resumes from the last one. 0: no checkpoints. The finished artifact keeps the model only.",
        200,
        identity=False,
    )
    save_total_limit: int = doc("Checkpoints kept while training (the oldest are deleted).", 2, identity=False)
    trainer: Dict[str, Any] = doc(
        "Any other argument of TRL's `SFTConfig` (sft), `DPOConfig` (dpo) or `GRPOConfig` (grpo), passed through as "
        "given (`+sft.trainer.<arg>=value`, ...); checked against TRL's dataclass at start, so a misspelt argument "
        "fails naming it.",
        factory=dict,
    )

    def check_trainer(self, name: str) -> None:
        """The checks of these fields (TRL's own dataclass checks the pass-through: looper/training.py)."""
        _check(self.weight_decay >= 0, f"{name}.weight_decay", f"must be >= 0, got {self.weight_decay}")
        _positive(self.max_grad_norm, f"{name}.max_grad_norm")
        _positive(self.global_batch_size, f"{name}.global_batch_size")
        _check(self.save_steps >= 0, f"{name}.save_steps", f"must be >= 0, got {self.save_steps}")
        _positive(self.save_total_limit, f"{name}.save_total_limit")
        if getattr(self, "compile", False) and self.use_liger_kernel:  # (sft and dpo have `compile`)
            raise ValueError(
                f"{name}.compile: not together with {name}.use_liger_kernel=true: Liger's kernels here are the "
                "layers' norms, rotary embedding and SwiGLU (TRL keeps its own fused LM head), which compiling "
                "fuses itself, and torch.compile fails on Liger's RMSNorm; set one of them to false"
            )


@dataclass
class SFTConfig(TrainerSettings):
    learning_rate: float = doc("Peak learning rate.", 2e-4)
    epochs: float = doc("Passes over the training problems (ignored when max_steps > 0).", 3.0)
    max_steps: int = doc("Optimizer steps; -1 means use `epochs`.", -1)
    batch_size: int = doc("Sequences per device per step.", 8)
    gradient_accumulation_steps: int = doc(
        "Micro-batches per optimizer step (ignored when sft.global_batch_size is set: it follows from that).", 1
    )
    max_length: int = doc("Tokens per prompt+completion; longer examples are left out (and counted in the log).", 1024)
    padding_free: bool = doc(
        "Concatenate each batch's sequences into one row without padding (position ids mark "
        "the boundaries; sdpa, eager and flash_attention_2 all keep sequences apart; a model "
        "loaded with sdpa trains through FlashAttention-2 varlen on a GPU). Same loss as padded "
        "batches, no compute spent on padding.",
        True,
    )
    warmup_ratio: float = doc("Share of steps with linear warmup.", 0.03)
    gradient_checkpointing: bool = doc("Recompute activations in backward (less memory, ~30% slower).", False)
    compile: bool = doc(COMPILE, False)
    group_by_length: bool = doc(
        "Batch sequences of similar length together: less padding, but batches of one "
        "difficulty (faster, but on the tiny demo it cost accuracy).",
        False,
    )
    num_examples: Optional[int] = doc("Use only the first N training problems (null: all).", None)
    logging_steps: int = doc("Log the loss every N steps.", 10, identity=False)
    eval_examples: int = doc(
        "Dev-split problems whose gold solutions give an eval loss every sft.eval_steps (logged as eval/loss; the "
        "trained weights do not change); 0: no eval.",
        0,
        identity=False,
    )
    eval_steps: Optional[int] = doc(
        "Evaluate the sft.eval_examples every N steps (null: sft.logging_steps).", None, identity=False
    )

    def __post_init__(self):
        for name in (
            "learning_rate",
            "epochs",
            "batch_size",
            "gradient_accumulation_steps",
            "max_length",
            "num_examples",
            "logging_steps",
            "eval_steps",
        ):
            _positive(getattr(self, name), f"sft.{name}")
        _check(self.eval_examples >= 0, "sft.eval_examples", f"must be >= 0, got {self.eval_examples}")
        _check(self.learning_rate <= 1, "sft.learning_rate", f"must be at most 1, got {self.learning_rate}")
        _check(self.max_steps == -1 or self.max_steps > 0, "sft.max_steps", "must be -1 or positive")
        _fraction(self.warmup_ratio, "sft.warmup_ratio")
        self.check_trainer("sft")


@dataclass
class RolloutConfig:
    num_questions: Optional[int] = doc("Training problems to roll out (the first N; null: all).", None)
    batch_size: int = doc(
        "Sequences decoding together (slots; their KV pages are handed out as rows grow).", 64, identity=False
    )
    batches_per_call: int = doc(
        "Batches' worth of whole questions per generate call, the unit of resuming: more "
        "means fewer drains (the slots empty at the end of a call) and more work redone after a "
        "crash.",
        16,
        identity=False,
    )
    max_new_tokens: Optional[int] = doc("Generation limit (null: model.max_new_tokens).", None)
    answer_scorer: str = doc("Scorer that decides `correct` (see looper.answers).", "strict")
    scorer_timeout_s: float = doc(
        "Seconds a question's coherence scorer may compute (waiting for continuations not "
        "counted) before the run fails naming the question.",
        600.0,
        identity=False,
    )
    allocation: str = doc(
        "How each question's samples are spread over the arms: `uniform` (every arm its `arms.<arm>.samples`), "
        "`thompson` (a bandit: `rollout.budget` samples a question, spent in `rollout.rounds` rounds, each round's "
        "going where Thompson sampling on the arms' reward posteriors sends them) or `thompson_sequential` (the "
        "questions in waves: a warm-up spreads evenly, then each question's whole budget goes to arms drawn from the "
        "posteriors pooled over the earlier waves; any budget, 8 samples over 8 arms included). looper/bandit.py.",
        "uniform",
    )
    budget: Optional[int] = doc("Samples per question under a bandit (null: the arms' samples, summed).", None)
    rounds: int = doc("Rounds a bandit spends each question's budget in (the first gives every arm its floor).", 4)
    floor: int = doc("Samples every arm gets per question in a bandit's first round, before it has data.", 1)
    warmup: float = doc(
        "thompson_sequential: share of the questions (the first ones, at least one) whose budget spreads evenly over "
        "the arms before the bandit has data.",
        0.1,
    )
    waves: int = doc(
        "thompson_sequential: waves the questions after the warm-up are split into; the posteriors are updated "
        "between waves (every process finishes a wave before the next).",
        8,
    )
    bandit_stats: str = doc(
        "What a bandit's arm posteriors pool: `pooled` (each arm's rewards over all questions: the arm's quality) or "
        "`question` (the question's own rewards, with the pooled mean as prior).",
        "pooled",
    )

    def __post_init__(self):
        _choice(self.allocation, "rollout.allocation", ("uniform", "thompson", "thompson_sequential"))
        _check(0 < self.warmup < 1, "rollout.warmup", f"must be in (0, 1), got {self.warmup}")
        _positive(self.waves, "rollout.waves")
        _check(
            self.bandit_stats == "pooled" or self.allocation != "thompson_sequential",
            "rollout.bandit_stats",
            "thompson_sequential gives each question its budget at once, so only pooled statistics exist; use "
            "rollout.allocation=thompson for per-question statistics",
        )
        _choice(self.bandit_stats, "rollout.bandit_stats", ("pooled", "question"))
        _positive(self.budget, "rollout.budget")
        _check(
            self.rounds >= 2,
            "rollout.rounds",
            f"must be at least 2 (a floor round, then the bandit's), got {self.rounds}",
        )
        _check(self.floor >= 1, "rollout.floor", f"must be at least 1, got {self.floor}")
        _positive(self.num_questions, "rollout.num_questions")
        _positive(self.scorer_timeout_s, "rollout.scorer_timeout_s")
        _positive(self.batch_size, "rollout.batch_size")
        _positive(self.batches_per_call, "rollout.batches_per_call")
        _positive(self.max_new_tokens, "rollout.max_new_tokens")
        _choice(self.answer_scorer, "rollout.answer_scorer", SCORERS)


@dataclass
class PreferencesConfig:
    strategy: str = doc(
        "`correctness_first` (correct vs incorrect, then coherent vs incoherent among correct) or "
        "`reward_extremes` (highest vs lowest reward).",
        "correctness_first",
    )
    margin: float = doc(
        "correctness_first: least s_wm gap of a coherence pair; reward_extremes: least reward gap.", 0.1
    )
    max_pairs_per_question: int = doc("At most this many pairs of each type per question.", 1)

    def __post_init__(self):
        _choice(self.strategy, "preferences.strategy", ("correctness_first", "reward_extremes"))
        _check(self.margin >= 0, "preferences.margin", "must be >= 0")
        _positive(self.max_pairs_per_question, "preferences.max_pairs_per_question")


@dataclass
class DPOConfig(TrainerSettings):
    beta: float = doc("DPO temperature: how far the policy may move from the reference.", 0.1)
    loss_type: str = doc("TRL loss name (sigmoid, ipo, hinge, robust, ...).", "sigmoid")
    learning_rate: float = doc("Peak learning rate.", 5e-6)
    epochs: float = doc("Passes over the pairs (ignored when max_steps > 0).", 1.0)
    max_steps: int = doc("Optimizer steps; -1 means use `epochs`.", -1)
    batch_size: int = doc("Pairs per device per step.", 4)
    gradient_accumulation_steps: int = doc(
        "Micro-batches per optimizer step (ignored when dpo.global_batch_size is set: it follows from that).", 4
    )
    max_length: int = doc("Tokens per prompt+completion; longer ones are truncated.", 1024)
    padding_free: bool = doc(
        "Run each batch's chosen and rejected sequences packed into one row without padding through the model's "
        "layers (FlashAttention-2 varlen on a GPU; TRL's own DPO padding_free is off in TRL 1.16). Same loss as "
        "padded batches, no compute spent on padding.",
        True,
    )
    precompute_ref_log_probs: bool = doc(
        "Compute the reference log-probs once before training (no reference forward in each step).", True
    )
    gradient_checkpointing: bool = doc("Recompute activations in backward.", False)
    compile: bool = doc(COMPILE, False)
    logging_steps: int = doc("Log every N steps.", 10, identity=False)
    reference_check: str = doc(
        "Before training, the policy's and the reference's log-probs of the first batch are "
        "compared with dropout off (they must agree: the policy starts as the reference); "
        "`error` stops the stage when the implicit reward margin exceeds "
        "dpo.reference_tolerance, `warn` logs it and trains on.",
        "error",
        identity=False,
    )
    reference_tolerance: float = doc(
        "Largest |first-batch reward margin| the reference check accepts (numerical "
        "noise of the model dtype; docs/performance.md has the measurement).",
        1e-3,
        identity=False,
    )
    warmup_ratio: float = doc("Share of steps with linear warmup.", 0.0)
    lr_scheduler_type: str = doc(
        "Learning-rate schedule (transformers' SchedulerType: linear, cosine, constant, ...).", "linear"
    )
    eval_fraction: float = doc(
        "Share of the questions whose pairs are held out as a DPO eval split (its loss and reward curves are logged "
        "every dpo.eval_steps); 0: train on every pair.",
        0.0,
    )
    eval_steps: Optional[int] = doc(
        "Evaluate the held-out pairs every N steps (null: dpo.logging_steps).", None, identity=False
    )
    fresh_lora: LoraSettings = doc(
        "The adapter DPO trains when SFT was full fine-tuning (`lora=none`).",
        factory=lambda: LoraSettings(r=16, alpha=32, dropout=0.0),
    )

    def __post_init__(self):
        for name in (
            "beta",
            "learning_rate",
            "epochs",
            "batch_size",
            "gradient_accumulation_steps",
            "max_length",
            "logging_steps",
        ):
            _positive(getattr(self, name), f"dpo.{name}")
        _check(self.learning_rate <= 1, "dpo.learning_rate", f"must be at most 1, got {self.learning_rate}")
        # beta scales log-probability ratios (typical 0.01-0.5): beyond 100 the loss saturates or overflows
        _check(self.beta <= 100, "dpo.beta", f"must be at most 100, got {self.beta:g}")
        _check(
            self.max_length >= 16,
            "dpo.max_length",
            f"must be at least 16 tokens (a prompt and the start of both completions), got {self.max_length}",
        )
        _check(self.max_steps == -1 or self.max_steps > 0, "dpo.max_steps", "must be -1 or positive")
        _choice(self.reference_check, "dpo.reference_check", ("error", "warn"))
        _check(self.reference_tolerance >= 0, "dpo.reference_tolerance", "must be >= 0")
        _fraction(self.warmup_ratio, "dpo.warmup_ratio")
        _check(0 <= self.eval_fraction < 1, "dpo.eval_fraction", f"must be in [0, 1), got {self.eval_fraction}")
        _positive(self.eval_steps, "dpo.eval_steps")
        self.check_trainer("dpo")
