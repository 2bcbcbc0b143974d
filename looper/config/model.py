"""The schemas of what is trained and how it is rewarded: the model and its prompt format, the adapter, the arms and
the reward.
"""

from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from looper.config.fields import _check, _choice, _fraction, _positive, doc


@dataclass
class TinyModelConfig:
    """A small Llama built and pretrained locally on the synthetic corpus (see looper/tiny.py)."""

    hidden_size: int = doc("Hidden width.", 96)
    intermediate_size: int = doc("MLP width.", 256)
    num_layers: int = doc("Decoder layers.", 3)
    num_heads: int = doc("Attention heads.", 4)
    vocab_size: int = doc(
        "Target BPE vocabulary size of the locally trained tokenizer (digits are single tokens).", 512
    )
    corpus_size: int = doc("Synthetic problems in the pretraining corpus.", 20000)
    pretrain_steps: int = doc("AdamW steps of next-token pretraining.", 900)
    pretrain_batch_size: int = doc("Sequences per pretraining step.", 24)
    pretrain_lr: float = doc("Peak pretraining learning rate (cosine decay, short warmup).", 3e-3)
    block_size: int = doc("Tokens per pretraining sequence (documents packed with EOS between them).", 128)

    def __post_init__(self):
        for name in (
            "hidden_size",
            "intermediate_size",
            "num_layers",
            "num_heads",
            "vocab_size",
            "corpus_size",
            "pretrain_steps",
            "pretrain_batch_size",
            "pretrain_lr",
            "block_size",
        ):
            _positive(getattr(self, name), f"model.tiny.{name}")
        _check(self.hidden_size % self.num_heads == 0, "model.tiny.num_heads", "must divide model.tiny.hidden_size")


@dataclass
class ModelConfig:
    name: str = doc("Short name, used as a W&B tag and in each run's summary.json.", "tiny", identity=False)
    name_or_path: Optional[str] = doc("Hub id or local directory; null builds the tiny model from `model.tiny`.", None)
    revision: Optional[str] = doc(
        "Hub revision (branch, tag or commit) of a hub model (null: main); resolved to a "
        "commit (local hub cache, else the hub) and recorded in each spec.json.",
        None,
    )
    tiny: Optional[TinyModelConfig] = doc(
        "Settings of the locally built tiny model (used when name_or_path is null).", factory=TinyModelConfig
    )
    prompt_format: str = doc("`template` (fill prompt_template) or `chat` (the tokenizer's chat template).", "template")
    prompt_template: str = doc(
        "Prompt for template models; `{question}` is replaced.", "Question:\n{question}\nAnswer:\n"
    )
    system_template: str = doc(
        "How a template model sees an arm's system prompt; `{system}` is replaced.", "{system}\n\n"
    )
    completion_template: str = doc(
        "How a GSM8K solution is written as an SFT completion: `{solution}` (all of it), "
        "or `{reasoning}` (its worked steps) and `{answer}` (its final number).",
        "{solution}",
    )
    reasoning: str = doc(
        "`none`, or `think` for reasoning models (R1-distill): answers are read only after the last "
        "`think_close`; a trace that never closes its think block or hits its token limit is "
        "unanswered; SFT completions must close the block (completion_template).",
        "none",
    )
    think_open: str = doc(
        "Tag that opens a reasoning model's think block (added before an SFT completion when the "
        "prompt does not end with it).",
        "<think>",
    )
    think_close: str = doc("Tag that closes a reasoning model's think block.", "</think>")
    system_prompt: str = doc(
        "Where an arm's system prompt goes: `system` (a system turn / system_template) or `user` "
        "(before the question in the user turn, for models that advise against system prompts).",
        "system",
    )
    max_new_tokens: int = doc(
        "Generation limit for rollouts and evaluation (each overridable: rollout.max_new_tokens, eval.max_new_tokens).",
        512,
    )
    dtype: str = doc(
        "`auto` (bf16 if supported, else fp16 on CUDA, fp32 on CPU), bfloat16, float16 or float32.", "auto"
    )
    attn_implementation: str = doc(
        "`auto` (flash_attention_2 when flash_attn imports, else sdpa), sdpa, eager, flash_attention_2.", "auto"
    )
    trust_remote_code: bool = doc("Allow code from the model repository to run.", False)

    def __post_init__(self):
        _choice(self.prompt_format, "model.prompt_format", ("template", "chat"))
        _check("{question}" in self.prompt_template, "model.prompt_template", "must contain {question}")
        _check(
            "{solution}" in self.completion_template or "{reasoning}" in self.completion_template,
            "model.completion_template",
            "must contain {solution} or {reasoning}",
        )
        _choice(self.reasoning, "model.reasoning", ("none", "think"))
        _choice(self.system_prompt, "model.system_prompt", ("system", "user"))
        _check(
            self.reasoning == "none" or (self.think_open and self.think_close),
            "model.think_close",
            "a reasoning model needs both think tags",
        )
        _check(
            self.reasoning == "none" or self.think_close in self.completion_template.replace("{{", "{"),
            "model.completion_template",
            f"with model.reasoning=think it must close the think block ({self.think_close!r}) before the final answer",
        )
        _choice(self.dtype, "model.dtype", ("auto", "bfloat16", "float16", "float32"))
        _choice(self.attn_implementation, "model.attn_implementation", ("auto", "sdpa", "eager", "flash_attention_2"))
        _positive(self.max_new_tokens, "model.max_new_tokens")
        _check(
            self.name_or_path is not None or self.tiny is not None,
            "model.name_or_path",
            "set a hub id or path, or give `model.tiny` settings to build the tiny model",
        )

    def answer_after(self) -> Optional[str]:
        """The tag after which answers are read (think_close for a reasoning model), or None: the whole text."""
        return self.think_close if self.reasoning == "think" else None


@dataclass
class LoraSettings:
    enabled: bool = doc("Train a LoRA adapter; false means full fine-tuning (`lora=none`).", True)
    r: int = doc("LoRA rank.", 64)
    alpha: int = doc("LoRA scaling numerator (lora_alpha).", 16)
    dropout: float = doc("Dropout on the LoRA path.", 0.05)
    target_modules: List[str] = doc(
        "Module names that get adapters.", factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"]
    )
    quantization: str = doc("Base weights: `none` (model dtype), `4bit` (NF4, QLoRA) or `8bit` (bitsandbytes).", "none")

    def __post_init__(self):
        _positive(self.r, "lora.r")
        _fraction(self.dropout, "lora.dropout")
        _choice(self.quantization, "lora.quantization", ("none", "4bit", "8bit"))
        _check(
            self.enabled or self.quantization == "none",
            "lora.quantization",
            "a quantized base needs LoRA (lora.enabled=true)",
        )


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
    scorer: Dict[str, Any] = doc(
        "The coherence scorer: `_target_` names the function (see looper/coherence.py), other keys are passed to it.",
        factory=lambda: {"_target_": "looper.coherence.reference_scorer"},
    )
    scorer_returns: str = doc(
        "What reward.scorer returns per trajectory: `components` (s_end, s_path, s_cf; looper computes s_wm and the "
        "reward from reward.*) or `reward` (the plans' shape: `fn(question, trajectories, gold)` returns one reward "
        "per trajectory, a number or a dict with `reward` and optionally `s_wm`; pairing, credit and the bandit use "
        "it as it is, and alpha, beta, the length penalty and w_* do not apply).",
        "components",
    )

    def __post_init__(self):
        _positive(self.length_unit, "reward.length_unit")
        _check(0 < self.cf_cut < 1, "reward.cf_cut", f"must be in (0, 1), got {self.cf_cut}")
        _check(self.cf_samples >= 0, "reward.cf_samples", "must be >= 0")
        _check("_target_" in self.scorer, "reward.scorer._target_", "name the scoring function")
        _choice(self.scorer_returns, "reward.scorer_returns", ("components", "reward"))
        for name in ("alpha", "beta", "w_end", "w_path", "w_cf", "length_penalty"):
            _check(getattr(self, name) >= 0, f"reward.{name}", f"must be >= 0, got {getattr(self, name)}")
