"""The schemas of what generates and what is written out: evaluation, export, and the generation path rollouts and
evaluation share."""

from dataclasses import dataclass
from typing import List, Optional

from looper.config.fields import EVAL_DATASETS, SCORERS, _check, _choice, _positive, doc


@dataclass
class ExportConfig:
    source: str = doc("What `stage=export` merges into its base: the `dpo` or `grpo` policy or the `sft` model.", "dpo")
    dtype: str = doc("Weights of the exported model: bfloat16, float16 or float32.", "bfloat16")
    quantized: str = doc(
        "Also write a bitsandbytes-quantized copy under `quantized-<bits>/`: none, 8bit or 4bit (needs CUDA and "
        "`looper[qlora]`).",
        "none",
    )

    def __post_init__(self):
        _choice(self.source, "export.source", ("dpo", "grpo", "sft"))
        _choice(self.dtype, "export.dtype", ("bfloat16", "float16", "float32"))
        _choice(self.quantized, "export.quantized", ("none", "8bit", "4bit"))


@dataclass
class EvalConfig:
    targets: List[str] = doc(
        "What to evaluate: base, sft, dpo, grpo, or an adapter/model directory.",
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
                target in ("base", "sft", "dpo", "grpo") or "/" in target or target.startswith("."),
                "eval.targets",
                f"{target!r} is not base, sft, dpo, grpo or a path",
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
