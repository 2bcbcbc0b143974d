"""Typed schemas for every config group, registered in Hydra's ConfigStore.

Hydra merges the YAML under `conf/` into these dataclasses, so an unknown key or a wrong type fails at start with the
key's name. Value checks (ranges, known names) live in each class's `__post_init__`, which runs when `__main__`
turns the composed config into objects with `OmegaConf.to_object`. Every field carries a one-line `help`.
"""

import math
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from typing import Any, Dict, List, Optional, Union, get_args, get_origin

from hydra.core.config_store import ConfigStore

from looper.answers import SCORERS

STAGES = ("sft", "rollout", "preferences", "dpo", "eval", "pipeline")
EVAL_DATASETS = ("synthetic_test", "synthetic_dev", "gsm8k_test", "gsm8k_dev", "gsm8k_platinum")


def doc(help: str, default: Any = MISSING, factory: Any = MISSING) -> Any:
    """A dataclass field with its one-line documentation."""
    return field(default=default, default_factory=factory, metadata={"help": help})


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ValueError(f"{key}: {message}")


def _choice(value: Any, key: str, allowed: tuple) -> None:
    _check(value in allowed, key, f"got {value!r}; allowed: {', '.join(map(str, allowed))}")


def _positive(value: Optional[float], key: str) -> None:
    _check(value is None or value > 0, key, f"must be positive, got {value}")


def _fraction(value: float, key: str) -> None:
    _check(0.0 <= value <= 1.0, key, f"must be in [0, 1], got {value}")


# ---------------------------------------------------------------------------------------------------------- model


@dataclass
class TinyModelConfig:
    """A small Llama built and pretrained locally on the synthetic corpus (see looper/tiny.py)."""

    hidden_size: int = doc("Hidden width.", 96)
    intermediate_size: int = doc("MLP width.", 256)
    num_layers: int = doc("Decoder layers.", 3)
    num_heads: int = doc("Attention heads.", 4)
    vocab_size: int = doc("Target BPE vocabulary size of the locally trained tokenizer (digits are single tokens).", 512)
    corpus_size: int = doc("Synthetic problems in the pretraining corpus.", 20000)
    pretrain_steps: int = doc("AdamW steps of next-token pretraining.", 900)
    pretrain_batch_size: int = doc("Sequences per pretraining step.", 24)
    pretrain_lr: float = doc("Peak pretraining learning rate (cosine decay, short warmup).", 3e-3)
    block_size: int = doc("Tokens per pretraining sequence (documents packed with EOS between them).", 128)

    def __post_init__(self):
        for name in ("hidden_size", "intermediate_size", "num_layers", "num_heads", "vocab_size", "corpus_size",
                     "pretrain_steps", "pretrain_batch_size", "pretrain_lr", "block_size"):
            _positive(getattr(self, name), f"model.tiny.{name}")
        _check(self.hidden_size % self.num_heads == 0, "model.tiny.num_heads", "must divide model.tiny.hidden_size")


@dataclass
class ModelConfig:
    name: str = doc("Short name, used as a W&B tag and in each run's summary.json.", "tiny")
    name_or_path: Optional[str] = doc("Hub id or local directory; null builds the tiny model from `model.tiny`.", None)
    revision: Optional[str] = doc("Hub revision (branch, tag or commit) of a hub model (null: main); resolved to a "
                                  "commit (local hub cache, else the hub) and recorded in each spec.json.", None)
    tiny: Optional[TinyModelConfig] = doc("Settings of the locally built tiny model (used when name_or_path is null).",
                                          factory=TinyModelConfig)
    prompt_format: str = doc("`template` (fill prompt_template) or `chat` (the tokenizer's chat template).", "template")
    prompt_template: str = doc("Prompt for template models; `{question}` is replaced.", "Question:\n{question}\nAnswer:\n")
    system_template: str = doc("How a template model sees an arm's system prompt; `{system}` is replaced.",
                               "{system}\n\n")
    completion_template: str = doc("How a GSM8K solution is written as an SFT completion: `{solution}` (all of it), "
                                   "or `{reasoning}` (its worked steps) and `{answer}` (its final number).",
                                   "{solution}")
    reasoning: str = doc("`none`, or `think` for reasoning models (R1-distill): answers are read only after the last "
                         "`think_close`; a trace that never closes its think block or hits its token limit is "
                         "unanswered; SFT completions must close the block (completion_template).", "none")
    think_open: str = doc("Tag that opens a reasoning model's think block (added before an SFT completion when the "
                          "prompt does not end with it).", "<think>")
    think_close: str = doc("Tag that closes a reasoning model's think block.", "</think>")
    system_prompt: str = doc("Where an arm's system prompt goes: `system` (a system turn / system_template) or `user` "
                             "(before the question in the user turn, for models that advise against system prompts).",
                             "system")
    max_new_tokens: int = doc("Generation limit for rollouts and evaluation (each overridable: rollout.max_new_tokens, "
                              "eval.max_new_tokens).", 512)
    dtype: str = doc("`auto` (bf16 if supported, else fp16 on CUDA, fp32 on CPU), bfloat16, float16 or float32.",
                     "auto")
    attn_implementation: str = doc("`auto` (flash_attention_2 when flash_attn imports, else sdpa), sdpa, eager, "
                                   "flash_attention_2.", "auto")
    trust_remote_code: bool = doc("Allow code from the model repository to run.", False)

    def __post_init__(self):
        _choice(self.prompt_format, "model.prompt_format", ("template", "chat"))
        _check("{question}" in self.prompt_template, "model.prompt_template", "must contain {question}")
        _check("{solution}" in self.completion_template or "{reasoning}" in self.completion_template,
               "model.completion_template", "must contain {solution} or {reasoning}")
        _choice(self.reasoning, "model.reasoning", ("none", "think"))
        _choice(self.system_prompt, "model.system_prompt", ("system", "user"))
        _check(self.reasoning == "none" or (self.think_open and self.think_close), "model.think_close",
               "a reasoning model needs both think tags")
        _check(self.reasoning == "none" or self.think_close in self.completion_template.replace("{{", "{"),
               "model.completion_template", f"with model.reasoning=think it must close the think block "
               f"({self.think_close!r}) before the final answer")
        _choice(self.dtype, "model.dtype", ("auto", "bfloat16", "float16", "float32"))
        _choice(self.attn_implementation, "model.attn_implementation", ("auto", "sdpa", "eager", "flash_attention_2"))
        _positive(self.max_new_tokens, "model.max_new_tokens")
        _check(self.name_or_path is not None or self.tiny is not None, "model.name_or_path",
               "set a hub id or path, or give `model.tiny` settings to build the tiny model")

    def answer_after(self) -> Optional[str]:
        """The tag after which answers are read (think_close for a reasoning model), or None: the whole text."""
        return self.think_close if self.reasoning == "think" else None


@dataclass
class LoraSettings:
    enabled: bool = doc("Train a LoRA adapter; false means full fine-tuning (`lora=none`).", True)
    r: int = doc("LoRA rank.", 64)
    alpha: int = doc("LoRA scaling numerator (lora_alpha).", 16)
    dropout: float = doc("Dropout on the LoRA path.", 0.05)
    target_modules: List[str] = doc("Module names that get adapters.",
                                    factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    quantization: str = doc("Base weights: `none` (model dtype), `4bit` (NF4, QLoRA) or `8bit` (bitsandbytes).", "none")

    def __post_init__(self):
        _positive(self.r, "lora.r")
        _fraction(self.dropout, "lora.dropout")
        _choice(self.quantization, "lora.quantization", ("none", "4bit", "8bit"))
        _check(self.enabled or self.quantization == "none", "lora.quantization",
               "a quantized base needs LoRA (lora.enabled=true)")


# ---------------------------------------------------------------------------------------------------------- rollout


@dataclass
class ArmConfig:
    family: str = doc("`compute` or `reflective`.", "compute")
    system_prompt: str = doc("System prompt of this reasoning path ('' for none).", "")
    style: str = doc("Instruction appended to the question ('' for none).", "")
    temperature: float = doc("Sampling temperature.", 1.0)
    top_p: float = doc("Nucleus sampling mass.", 1.0)
    samples: int = doc("Trajectories per question from this arm.", 1)

    def check(self, name: str) -> None:
        """Value checks, naming the arm (run by Config, which knows the names)."""
        _choice(self.family, f"arms.{name}.family", ("compute", "reflective"))
        _check(self.temperature > 0, f"arms.{name}.temperature", f"must be > 0, got {self.temperature}")
        _check(0 < self.top_p <= 1, f"arms.{name}.top_p", f"must be in (0, 1], got {self.top_p}")
        _positive(self.samples, f"arms.{name}.samples")


@dataclass
class RewardConfig:
    alpha: float = doc("Weight of correctness in the reward.", 1.0)
    beta: float = doc("Weight of the coherence metric s_wm in the reward.", 0.5)
    length_penalty: float = doc("Reward subtracted per `length_unit` generated tokens.", 0.01)
    length_unit: int = doc("Tokens per unit of length penalty.", 100)
    w_end: float = doc("Weight of s_end (final-answer agreement) in s_wm.", 1.0)
    w_path: float = doc("Weight of s_path (arithmetic validity x shared intermediate results) in s_wm.", 1.0)
    w_cf: float = doc("Weight of s_cf (counterfactual robustness) in s_wm.", 1.0)
    cf_cut: float = doc("s_cf cuts each trajectory at this fraction of its reasoning and resamples from there.", 0.5)
    cf_samples: int = doc("Continuations resampled per trajectory for s_cf; 0 turns s_cf off (w_cf drops out).", 2)
    scorer: Dict[str, Any] = doc("The coherence scorer: `_target_` names the function (see looper/coherence.py), "
                                 "other keys are passed to it.",
                                 factory=lambda: {"_target_": "looper.coherence.reference_scorer"})

    def __post_init__(self):
        _positive(self.length_unit, "reward.length_unit")
        _check(0 < self.cf_cut < 1, "reward.cf_cut", f"must be in (0, 1), got {self.cf_cut}")
        _check(self.cf_samples >= 0, "reward.cf_samples", "must be >= 0")
        _check("_target_" in self.scorer, "reward.scorer._target_", "name the scoring function")
        for name in ("alpha", "beta", "w_end", "w_path", "w_cf", "length_penalty"):
            _check(getattr(self, name) >= 0, f"reward.{name}", f"must be >= 0, got {getattr(self, name)}")


# ---------------------------------------------------------------------------------------------------------- stages


@dataclass
class StageConfig:
    name: str = doc("What runs: sft, rollout, preferences, dpo, eval or pipeline (all, then a table).", "pipeline")

    def __post_init__(self):
        _choice(self.name, "stage", STAGES)


@dataclass
class SFTConfig:
    learning_rate: float = doc("Peak learning rate.", 2e-4)
    epochs: float = doc("Passes over the training problems (ignored when max_steps > 0).", 3.0)
    max_steps: int = doc("Optimizer steps; -1 means use `epochs`.", -1)
    batch_size: int = doc("Sequences per device per step.", 8)
    gradient_accumulation_steps: int = doc("Micro-batches per optimizer step.", 1)
    max_length: int = doc("Tokens per prompt+completion; longer examples are left out (and counted in the log).", 1024)
    padding_free: bool = doc("Concatenate each batch's sequences into one row without padding (position ids mark "
                             "the boundaries; sdpa, eager and flash_attention_2 all keep sequences apart; a model "
                             "loaded with sdpa trains through FlashAttention-2 varlen on a GPU). Same loss as padded "
                             "batches, no compute spent on padding.", True)
    warmup_ratio: float = doc("Share of steps with linear warmup.", 0.03)
    gradient_checkpointing: bool = doc("Recompute activations in backward (less memory, ~30% slower).", False)
    group_by_length: bool = doc("Batch sequences of similar length together: less padding, but batches of one "
                                "difficulty (on the tiny demo: 33% faster SFT, 75% -> 43% accuracy).", False)
    num_examples: Optional[int] = doc("Use only the first N training problems (null: all).", None)
    logging_steps: int = doc("Log the loss every N steps.", 10)

    def __post_init__(self):
        for name in ("learning_rate", "epochs", "batch_size", "gradient_accumulation_steps", "max_length",
                     "num_examples", "logging_steps"):
            _positive(getattr(self, name), f"sft.{name}")
        _check(self.learning_rate <= 1, "sft.learning_rate", f"must be at most 1, got {self.learning_rate}")
        _check(self.max_steps == -1 or self.max_steps > 0, "sft.max_steps", "must be -1 or positive")
        _fraction(self.warmup_ratio, "sft.warmup_ratio")


@dataclass
class RolloutConfig:
    num_questions: Optional[int] = doc("Training problems to roll out (the first N; null: all).", None)
    batch_size: int = doc("Sequences decoding together (slots; their KV pages are handed out as rows grow).", 64)
    batches_per_call: int = doc("Batches' worth of whole questions per generate call, the unit of resuming: more "
                                "means fewer drains (the slots empty at the end of a call; 16 rather than 8 made a "
                                "7B rollout 5% faster on an H100) and more work redone after a crash.", 16)
    max_new_tokens: Optional[int] = doc("Generation limit (null: model.max_new_tokens).", None)
    answer_scorer: str = doc("Scorer that decides `correct` (see looper.answers).", "strict")
    scorer_timeout_s: float = doc("Seconds a question's coherence scorer may compute (waiting for continuations not "
                                  "counted) before the run fails naming the question.", 600.0)

    def __post_init__(self):
        _positive(self.num_questions, "rollout.num_questions")
        _positive(self.scorer_timeout_s, "rollout.scorer_timeout_s")
        _positive(self.batch_size, "rollout.batch_size")
        _positive(self.batches_per_call, "rollout.batches_per_call")
        _positive(self.max_new_tokens, "rollout.max_new_tokens")
        _choice(self.answer_scorer, "rollout.answer_scorer", SCORERS)


@dataclass
class PreferencesConfig:
    strategy: str = doc("`correctness_first` (correct vs incorrect, then coherent vs incoherent among correct) or "
                        "`reward_extremes` (highest vs lowest reward).", "correctness_first")
    margin: float = doc("correctness_first: least s_wm gap of a coherence pair; reward_extremes: least reward gap.",
                        0.1)
    max_pairs_per_question: int = doc("At most this many pairs of each type per question.", 1)

    def __post_init__(self):
        _choice(self.strategy, "preferences.strategy", ("correctness_first", "reward_extremes"))
        _check(self.margin >= 0, "preferences.margin", "must be >= 0")
        _positive(self.max_pairs_per_question, "preferences.max_pairs_per_question")


@dataclass
class DPOConfig:
    beta: float = doc("DPO temperature: how far the policy may move from the reference.", 0.1)
    loss_type: str = doc("TRL loss name (sigmoid, ipo, hinge, robust, ...).", "sigmoid")
    learning_rate: float = doc("Peak learning rate.", 5e-6)
    epochs: float = doc("Passes over the pairs (ignored when max_steps > 0).", 1.0)
    max_steps: int = doc("Optimizer steps; -1 means use `epochs`.", -1)
    batch_size: int = doc("Pairs per device per step.", 4)
    gradient_accumulation_steps: int = doc("Micro-batches per optimizer step.", 4)
    max_length: int = doc("Tokens per prompt+completion; longer ones are truncated.", 1024)
    precompute_ref_log_probs: bool = doc("Compute the reference log-probs once before training (no reference "
                                         "forward in each step).", True)
    gradient_checkpointing: bool = doc("Recompute activations in backward.", False)
    logging_steps: int = doc("Log every N steps.", 10)
    reference_check: str = doc("Before training, the policy's and the reference's log-probs of the first batch are "
                               "compared with dropout off (they must agree: the policy starts as the reference); "
                               "`error` stops the stage when the implicit reward margin exceeds "
                               "dpo.reference_tolerance, `warn` logs it and trains on.", "error")
    reference_tolerance: float = doc("Largest |first-batch reward margin| the reference check accepts (numerical "
                                     "noise of the model dtype; docs/performance.md has the measurement).", 1e-3)
    fresh_lora: LoraSettings = doc("The adapter DPO trains when SFT was full fine-tuning (`lora=none`).",
                                   factory=lambda: LoraSettings(r=16, alpha=32, dropout=0.0))

    def __post_init__(self):
        for name in ("beta", "learning_rate", "epochs", "batch_size", "gradient_accumulation_steps", "max_length",
                     "logging_steps"):
            _positive(getattr(self, name), f"dpo.{name}")
        _check(self.learning_rate <= 1, "dpo.learning_rate", f"must be at most 1, got {self.learning_rate}")
        _check(self.max_steps == -1 or self.max_steps > 0, "dpo.max_steps", "must be -1 or positive")
        _choice(self.reference_check, "dpo.reference_check", ("error", "warn"))
        _check(self.reference_tolerance >= 0, "dpo.reference_tolerance", "must be >= 0")


@dataclass
class EvalConfig:
    targets: List[str] = doc("What to evaluate: base, sft, dpo, or an adapter/model directory.",
                             factory=lambda: ["base", "sft", "dpo"])
    datasets: List[str] = doc(f"Held-out sets: {', '.join(EVAL_DATASETS)}.", factory=lambda: ["synthetic_test"])
    scorers: List[str] = doc("Answer scorers reported side by side (see looper.answers).",
                             factory=lambda: ["strict", "flexible", "platinum"])
    primary_scorer: str = doc("Scorer of the headline accuracy.", "strict")
    batch_size: int = doc("Prompts decoding together (slots, refilled as rows end; greedy).", 32)
    num_questions: Optional[int] = doc("Evaluate only the first N questions of each dataset (null: all).", None)
    max_new_tokens: Optional[int] = doc("Generation limit (null: model.max_new_tokens).", None)
    platinum_path: Optional[str] = doc("Local GSM8K-Platinum JSONL (null: the hub's madrylab/gsm8k-platinum).", None)
    prompt: str = doc("`model` (each model's own format) or `platinum` (the benchmark's official prompt inside the "
                      "model's format; for reasoning models its variant without 'Think step-by-step.').", "model")
    temperature: float = doc("0: greedy (the study's protocol); > 0 samples `eval.samples` answers per question with "
                             "per-row seeds (the benchmark harness's sampled protocol; it uses 0.5).", 0.0)
    top_p: float = doc("Nucleus sampling mass when eval.temperature > 0.", 1.0)
    samples: int = doc("Answers per question; accuracy is their mean, with an interval over questions. More than 1 "
                       "needs eval.temperature > 0.", 1)
    select_on: Optional[str] = doc("Dataset a sweep's objective is read from (null: the dev split of the data, "
                                   "synthetic_dev or gsm8k_dev, evaluated for the last target even when eval.datasets "
                                   "does not list it). A test set needs eval.select_on_test=true.", None)
    select_on_test: bool = doc("Allow eval.select_on to name a test set (gsm8k_test, gsm8k_platinum, "
                               "synthetic_test); logs a warning: selecting on a test set biases what it reports.",
                               False)
    shots: int = doc("Solved examples from the training split before each question (never the question itself).", 0)
    shots_seed: int = doc("Seed that picks the k-shot examples.", 0)
    check_batch_consistency: int = doc("Decode this many prompts one at a time and batched; report any difference.",
                                       0)

    def __post_init__(self):
        for target in self.targets:
            _check(target in ("base", "sft", "dpo") or "/" in target or target.startswith("."), "eval.targets",
                   f"{target!r} is not base, sft, dpo or a path")
        for name in self.datasets:
            _choice(name, "eval.datasets", EVAL_DATASETS)
        for name in self.scorers:
            _choice(name, "eval.scorers", SCORERS)
        _check(self.primary_scorer in self.scorers, "eval.primary_scorer", f"must be one of eval.scorers {self.scorers}")
        _positive(self.batch_size, "eval.batch_size")
        _positive(self.num_questions, "eval.num_questions")
        _positive(self.max_new_tokens, "eval.max_new_tokens")
        _choice(self.prompt, "eval.prompt", ("model", "platinum"))
        _check(self.temperature >= 0, "eval.temperature", f"must be >= 0, got {self.temperature}")
        _check(0 < self.top_p <= 1, "eval.top_p", f"must be in (0, 1], got {self.top_p}")
        _positive(self.samples, "eval.samples")
        _check(self.samples == 1 or self.temperature > 0, "eval.samples",
               "several samples of greedy decoding are all the same answer; set eval.temperature > 0")
        if self.select_on is not None:
            _choice(self.select_on, "eval.select_on", EVAL_DATASETS)
            _check(self.select_on.endswith("_dev") or self.select_on_test, "eval.select_on",
                   f"{self.select_on} is a test set: selecting on it biases what it reports; choose a dev split, or "
                   "set eval.select_on_test=true to do it anyway")
        _check(self.shots >= 0, "eval.shots", "must be >= 0")
        _check(self.check_batch_consistency >= 0, "eval.check_batch_consistency", "must be >= 0")


@dataclass
class GenerationSettings:
    backend: str = doc("`auto` (paged where the model passes its start-up checks, else hf; the log says which and "
                       "why), `paged` (looper's engine) or `hf` (transformers' generate: the reference, any model, "
                       "slower; its samples differ from paged's). See looper/engine/__init__.py.", "auto")
    refill_at: float = doc("Share of the decoding slots (rollout/eval `batch_size`) that must be free before they are "
                           "refilled with new prompts in one prefill: lower refills sooner (fewer idle slots, more "
                           "prefill passes). Speed only; outputs do not depend on it.", 0.125)
    compile: bool = doc("Run each decode step's model forward, and the prefills' MLPs, through torch.compile "
                        "(inductor fuses their small kernels), for a compilation once per process (~100 s cold, ~60 s "
                        "with inductor's on-disk cache warm). With looper's Triton norm and rotary kernels in the "
                        "uncompiled path it gains little for a Llama-shaped 7B model on an H100 (a decode step 4% "
                        "faster, rollouts and evaluation within noise); it helps models those kernels do not serve. "
                        "In bfloat16 the fused arithmetic rounds differently, so samples differ from the uncompiled "
                        "path's (float32 greedy outputs are the same).", False)

    def __post_init__(self):
        from looper.engine import BACKENDS

        _choice(self.backend, "generation.backend", ("auto", *BACKENDS))
        _check(0 < self.refill_at <= 1, "generation.refill_at", f"must be in (0, 1], got {self.refill_at}")


# ---------------------------------------------------------------------------------------------------------- data, logs


@dataclass
class DataConfig:
    name: str = doc("`synthetic` (generated here, offline) or `gsm8k`.", "synthetic")
    synthetic_train: int = doc("Synthetic training problems.", 2000)
    synthetic_dev: int = doc("Synthetic dev problems.", 200)
    synthetic_test: int = doc("Synthetic test problems.", 200)
    synthetic_seed: int = doc("Seed of the synthetic generator.", 1234)
    max_steps: int = doc("Synthetic problems take 1..max_steps arithmetic steps.", 3)
    max_number: int = doc("Largest operand in synthetic problems.", 20)
    path: Optional[str] = doc("GSM8K: a directory with train.jsonl and test.jsonl (null: the hub's openai/gsm8k).",
                              None)
    dev_fraction: float = doc("GSM8K: share of train held out as the dev split.", 0.2)
    split_seed: int = doc("GSM8K: seed of the train/dev split.", 0)

    def __post_init__(self):
        _choice(self.name, "data.name", ("synthetic", "gsm8k"))
        for name in ("synthetic_train", "synthetic_dev", "synthetic_test", "max_steps"):
            _positive(getattr(self, name), f"data.{name}")
        _check(self.max_number >= 2, "data.max_number", "must be >= 2")
        _check(0 < self.dev_fraction < 1, "data.dev_fraction", f"must be in (0, 1), got {self.dev_fraction}")


@dataclass
class LoggerConfig:
    name: str = doc("`wandb` or `none`.", "wandb")
    project: str = doc("W&B project.", "looper")
    entity: Optional[str] = doc("W&B entity (team or user; null: your default).", None)
    mode: str = doc("online, offline or disabled; `auto` is online when an API key is set up, else offline.", "auto")
    group: Optional[str] = doc("W&B group (null: the experiment name, or the sweep directory in multirun).", None)

    def __post_init__(self):
        _choice(self.name, "logger.name", ("wandb", "none"))
        _choice(self.mode, "logger.mode", ("auto", "online", "offline", "disabled"))


@dataclass
class PathsConfig:
    artifacts: str = doc("Where stage artifacts are cached, shared by runs and sweeps.", "outputs/artifacts")
    verify: str = doc("What reusing a cached artifact checks against its manifest: `quick` (every file's size and "
                      "JSONL line count, the hashes of files up to 256 MiB) or `full` (every hash).", "quick")

    def __post_init__(self):
        _choice(self.verify, "paths.verify", ("quick", "full"))


@dataclass
class Config:
    experiment: str = doc("Name of this setup (W&B group for single runs).", "default")
    seed: int = doc("Seed of everything random: training order, sampling, LoRA init.", 0)
    model: ModelConfig = doc("The model and its prompt format (conf/model/).", factory=ModelConfig)
    lora: LoraSettings = doc("Adapter and quantization settings (conf/lora/).", factory=LoraSettings)
    arms: Dict[str, ArmConfig] = doc("The arm-set: reasoning paths rollouts sample from (conf/arms/).", factory=dict)
    reward: RewardConfig = doc("Reward and coherence weights (conf/reward/).", factory=RewardConfig)
    stage: StageConfig = doc("What runs (conf/stage/).", factory=StageConfig)
    sft: SFTConfig = doc("Supervised fine-tuning.", factory=SFTConfig)
    rollout: RolloutConfig = doc("Trajectory sampling.", factory=RolloutConfig)
    preferences: PreferencesConfig = doc("Pair construction.", factory=PreferencesConfig)
    dpo: DPOConfig = doc("Direct preference optimisation.", factory=DPOConfig)
    eval: EvalConfig = doc("Evaluation.", factory=EvalConfig)
    generation: GenerationSettings = doc("The shared decoding path of rollouts and evaluation.",
                                         factory=GenerationSettings)
    data: DataConfig = doc("Training and evaluation problems (conf/data/).", factory=DataConfig)
    logger: LoggerConfig = doc("Experiment tracking (conf/logger/).", factory=LoggerConfig)
    paths: PathsConfig = doc("Where things go.", factory=PathsConfig)

    def __post_init__(self):
        _check(len(self.arms) > 0, "arms", "the arm-set is empty; choose arms=regime_w or arms=single")
        for name, arm in self.arms.items():
            arm.check(name)
        for key, value in _numbers(self):
            _check(math.isfinite(value), key, f"must be a finite number, got {value}")
        _check(self.data.path is None or self.data.name == "gsm8k", "data.path",
               f"is set ({self.data.path}) but data={self.data.name} does not read files; use data=gsm8k")


def _numbers(node: Any, prefix: str = ""):
    """(dotted key, value) of every float in a config tree."""
    items = ((f.name, getattr(node, f.name)) for f in fields(node)) if is_dataclass(node) else \
        node.items() if isinstance(node, dict) else ()
    for name, value in items:
        key = f"{prefix}{name}"
        if isinstance(value, float):
            yield key, value
        elif is_dataclass(value) or isinstance(value, dict):
            yield from _numbers(value, key + ".")


def register_configs() -> None:
    """Register the schema so that `conf/config.yaml` can extend it (`defaults: [schema, ...]`)."""
    ConfigStore.instance().store(name="schema", node=Config)


def iter_docs(node: Any = Config, prefix: str = ""):
    """(dotted key, help) for every field of the schema, recursing into nested schemas (arms as `arms.<arm>.`)."""
    for item in fields(node):
        key = f"{prefix}{item.name}"
        yield key, item.metadata.get("help")
        inner = item.type
        if get_origin(inner) is Union:  # Optional[X]
            inner = next(arg for arg in get_args(inner) if arg is not type(None))
        if get_origin(inner) is dict:
            inner, key = get_args(inner)[1], f"{key}.<name>"
        if is_dataclass(inner):
            yield from iter_docs(inner, key + ".")


def reference_markdown() -> str:
    """The config reference (docs/config.md): every key with its one-line doc and schema default."""
    rows = ["| key | what it does |", "| --- | --- |"]
    rows += [f"| `{key}` | {help} |" for key, help in iter_docs()]
    return "# Config reference\n\nGenerated from `looper/config.py` by `python -m looper.config > docs/config.md`; " \
           "the group files under `conf/` set the values of each option.\n\n" + "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(reference_markdown(), end="")
