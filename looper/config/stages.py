"""The schemas of the stages: what runs, SFT, rollouts, preferences, DPO, evaluation and the shared generation path."""

from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from looper.config.fields import EVAL_DATASETS, SCORERS, STAGES, _check, _choice, _fraction, _positive, doc
from looper.config.model import LoraSettings


@dataclass
class StageConfig:
    name: str = doc(
        "What runs: sft, rollout, preferences, dpo, eval, pipeline (all, then a table) or export (a standalone model).",
        "pipeline",
    )

    def __post_init__(self):
        _choice(self.name, "stage", STAGES)


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
        "Any other argument of TRL's `SFTConfig` (sft) or `DPOConfig` (dpo), passed through as given "
        "(`+sft.trainer.<arg>=value`, `+dpo.trainer.<arg>=value`); checked against TRL's dataclass at start, so a "
        "misspelt argument fails naming it.",
        factory=dict,
    )

    def check_trainer(self, name: str) -> None:
        """The checks of these fields (TRL's own dataclass checks the pass-through: looper/training.py)."""
        _check(self.weight_decay >= 0, f"{name}.weight_decay", f"must be >= 0, got {self.weight_decay}")
        _positive(self.max_grad_norm, f"{name}.max_grad_norm")
        _positive(self.global_batch_size, f"{name}.global_batch_size")
        _check(self.save_steps >= 0, f"{name}.save_steps", f"must be >= 0, got {self.save_steps}")
        _positive(self.save_total_limit, f"{name}.save_total_limit")


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
    precompute_ref_log_probs: bool = doc(
        "Compute the reference log-probs once before training (no reference forward in each step).", True
    )
    gradient_checkpointing: bool = doc("Recompute activations in backward.", False)
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


@dataclass
class ExportConfig:
    source: str = doc("What `stage=export` merges into its base: the `dpo` policy or the `sft` model.", "dpo")
    dtype: str = doc("Weights of the exported model: bfloat16, float16 or float32.", "bfloat16")
    quantized: str = doc(
        "Also write a bitsandbytes-quantized copy under `quantized-<bits>/`: none, 8bit or 4bit (needs CUDA and "
        "`looper[qlora]`).",
        "none",
    )

    def __post_init__(self):
        _choice(self.source, "export.source", ("dpo", "sft"))
        _choice(self.dtype, "export.dtype", ("bfloat16", "float16", "float32"))
        _choice(self.quantized, "export.quantized", ("none", "8bit", "4bit"))


@dataclass
class EvalConfig:
    targets: List[str] = doc(
        "What to evaluate: base, sft, dpo, or an adapter/model directory.",
        factory=lambda: ["base", "sft", "dpo"],
        identity=False,
    )
    datasets: List[str] = doc(
        f"Held-out sets: {', '.join(EVAL_DATASETS)}.", factory=lambda: ["synthetic_test"], identity=False
    )
    scorers: List[str] = doc(
        "Answer scorers reported side by side (see looper.answers).",
        factory=lambda: ["strict", "flexible", "platinum"],
        identity=False,
    )
    primary_scorer: str = doc("Scorer of the headline accuracy.", "strict", identity=False)
    batch_size: int = doc("Prompts decoding together (slots, refilled as rows end; greedy).", 32, identity=False)
    num_questions: Optional[int] = doc("Evaluate only the first N questions of each dataset (null: all).", None)
    max_new_tokens: Optional[int] = doc("Generation limit (null: model.max_new_tokens).", None)
    platinum_path: Optional[str] = doc(
        "Local GSM8K-Platinum JSONL (null: the hub's madrylab/gsm8k-platinum).", None, identity=False
    )
    prompt: str = doc(
        "`model` (each model's own format) or `platinum` (the benchmark's official prompt inside the "
        "model's format; for reasoning models its variant without 'Think step-by-step.').",
        "model",
    )
    temperature: float = doc(
        "0: greedy (the study's protocol); > 0 samples `eval.samples` answers per question with "
        "per-row seeds (the benchmark harness's sampled protocol; it uses 0.5).",
        0.0,
    )
    top_p: float = doc("Nucleus sampling mass when eval.temperature > 0.", 1.0)
    samples: int = doc(
        "Answers per question; accuracy is their mean, with an interval over questions. More than 1 "
        "needs eval.temperature > 0.",
        1,
    )
    select_on: Optional[str] = doc(
        "Dataset a sweep's objective is read from (null: the dev split of the data, "
        "synthetic_dev or gsm8k_dev, evaluated for the last target even when eval.datasets "
        "does not list it). A test set needs eval.select_on_test=true.",
        None,
        identity=False,
    )
    select_on_test: bool = doc(
        "Allow eval.select_on to name a test set (gsm8k_test, gsm8k_platinum, "
        "synthetic_test); logs a warning: selecting on a test set biases what it reports.",
        False,
        identity=False,
    )
    shots: int = doc("Solved examples from the training split before each question (never the question itself).", 0)
    shots_seed: int = doc("Seed that picks the k-shot examples.", 0)
    check_batch_consistency: int = doc("Decode this many prompts one at a time and batched; report any difference.", 0)

    def __post_init__(self):
        for target in self.targets:
            _check(
                target in ("base", "sft", "dpo") or "/" in target or target.startswith("."),
                "eval.targets",
                f"{target!r} is not base, sft, dpo or a path",
            )
        for name in self.datasets:
            _choice(name, "eval.datasets", EVAL_DATASETS)
        for name in self.scorers:
            _choice(name, "eval.scorers", SCORERS)
        _check(
            self.primary_scorer in self.scorers, "eval.primary_scorer", f"must be one of eval.scorers {self.scorers}"
        )
        _positive(self.batch_size, "eval.batch_size")
        _positive(self.num_questions, "eval.num_questions")
        _positive(self.max_new_tokens, "eval.max_new_tokens")
        _choice(self.prompt, "eval.prompt", ("model", "platinum"))
        _check(self.temperature >= 0, "eval.temperature", f"must be >= 0, got {self.temperature}")
        _check(0 < self.top_p <= 1, "eval.top_p", f"must be in (0, 1], got {self.top_p}")
        _positive(self.samples, "eval.samples")
        _check(
            self.samples == 1 or self.temperature > 0,
            "eval.samples",
            "several samples of greedy decoding are all the same answer; set eval.temperature > 0",
        )
        if self.select_on is not None:
            _choice(self.select_on, "eval.select_on", EVAL_DATASETS)
            _check(
                self.select_on.endswith("_dev") or self.select_on_test,
                "eval.select_on",
                f"{self.select_on} is a test set: selecting on it biases what it reports; choose a dev split, or "
                "set eval.select_on_test=true to do it anyway",
            )
        _check(self.shots >= 0, "eval.shots", "must be >= 0")
        _check(self.check_batch_consistency >= 0, "eval.check_batch_consistency", "must be >= 0")


@dataclass
class GenerationSettings:
    backend: str = doc(
        "`auto` (paged where the model passes its start-up checks, else hf; the log says which and "
        "why), `paged` (looper's engine) or `hf` (transformers' generate: the reference, any model, "
        "slower; its samples differ from paged's). See looper/engine/__init__.py.",
        "auto",
    )
    refill_at: float = doc(
        "Share of the decoding slots (rollout/eval `batch_size`) that must be free before they are "
        "refilled with new prompts in one prefill: lower refills sooner (fewer idle slots, more "
        "prefill passes). Speed only; outputs do not depend on it.",
        0.125,
        identity=False,
    )
    dequantize: str = doc(
        "How rollouts and evaluation serve an adapter over a 4- or 8-bit base (lora.quantization): `auto` dequantizes "
        "the base once into the model dtype where that computes exactly what its quantized layers do (4bit: they "
        "dequantize and run a bf16 matmul), many times faster, and keeps the quantized layers where it does not "
        "(8bit: LLM.int8 also rounds the activations to 8 bits); `always` dequantizes 8bit too (fast, an "
        "approximation of the trained model's arithmetic: docs/performance.md); `never` keeps the quantized layers. "
        "A dequantized copy that does not fit in GPU memory falls back to the quantized layers, saying so.",
        "auto",
    )
    compile: bool = doc(
        "Run each decode step's model forward, and the prefills' MLPs, through torch.compile "
        "(inductor fuses their small kernels), for a compilation once per process. With looper's "
        "Triton norm and rotary kernels in the uncompiled path it gains little on Llama-shaped models "
        "(docs/performance.md); it helps models those kernels do not serve. In bfloat16 the fused "
        "arithmetic rounds differently, so samples differ from the uncompiled path's (float32 greedy "
        "outputs are the same).",
        False,
    )

    def __post_init__(self):
        # (generation.backend is checked against the engine's registered backends at start: looper/preflight.py)
        _choice(self.dequantize, "generation.dequantize", ("auto", "always", "never"))
        _check(0 < self.refill_at <= 1, "generation.refill_at", f"must be in (0, 1], got {self.refill_at}")
