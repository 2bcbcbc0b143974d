"""The schema of the `grpo` stage: online RL from the SFT policy with TRL's GRPOTrainer (looper/stages/grpo.py)."""

from dataclasses import dataclass
from typing import Optional

from looper.config.fields import _check, _choice, _fraction, _positive, doc
from looper.config.model import LoraSettings
from looper.config.stages import TrainerSettings

GROUPS = ("arms", "samples")


@dataclass
class GRPOSettings(TrainerSettings):
    group: str = doc(
        "What a question's group (the completions GRPO normalises its advantages over) is: `arms` (each arm samples "
        "its `samples` completions with its own prompt and temperature, as a rollout of the question would) or "
        "`samples` (grpo.num_generations completions of the model's own prompt at grpo.temperature: plain GRPO).",
        "arms",
    )
    num_generations: int = doc("Completions in a group (grpo.group=samples).", 8)
    temperature: float = doc(
        "Sampling temperature with grpo.group=samples; with either group, the temperature TRL divides the logits by "
        "when it computes the policy's log-probs (arms sample at their own).",
        1.0,
    )
    top_p: float = doc("Nucleus sampling mass with grpo.group=samples.", 1.0)
    questions_per_batch: int = doc(
        "Questions per device per micro-batch (each brings its whole group: TRL's per_device_train_batch_size is "
        "this x the group size).",
        2,
    )
    gradient_accumulation_steps: int = doc("Micro-batches per optimizer step.", 1)
    learning_rate: float = doc("Peak learning rate.", 1e-5)
    max_steps: int = doc("Optimizer steps.", 200)
    max_new_tokens: Optional[int] = doc("Completion limit (null: model.max_new_tokens).", None)
    num_questions: Optional[int] = doc("Train on the first N training questions only (null: all).", None)
    beta: float = doc("KL coefficient against the SFT policy (0: no reference model, TRL's default).", 0.0)
    loss_type: str = doc("TRL's loss (grpo, dr_grpo, dapo, bnpo, cispo, ...; TRL checks the name).", "dapo")
    epsilon: float = doc("Clipping range of the importance ratio.", 0.2)
    num_iterations: int = doc("Updates per generated batch (TRL's mu).", 1)
    scale_rewards: str = doc(
        "How advantages are scaled: `group` (by the group's std), `batch` or `none` (Dr. GRPO).", "group"
    )
    mask_truncated_completions: bool = doc("Leave completions that hit the limit out of the loss.", False)
    warmup_ratio: float = doc("Share of steps with linear warmup.", 0.0)
    lr_scheduler_type: str = doc("Learning-rate schedule (transformers' SchedulerType).", "constant")
    gradient_checkpointing: bool = doc("Recompute activations in backward.", False)
    logging_steps: int = doc("Log every N steps.", 1, identity=False)
    save_steps: int = doc(
        "Save a checkpoint every N optimizer steps into the artifact's `.partial/trainer/`; a killed run resumes "
        "from the last one (its samples are seeded by step, so it continues as if uninterrupted). 0: none.",
        20,
        identity=False,
    )

    fresh_lora: LoraSettings = doc(
        "The adapter GRPO trains when SFT was full fine-tuning (`lora=none`).",
        factory=lambda: LoraSettings(r=16, alpha=32, dropout=0.0),
    )

    def __post_init__(self):
        _choice(self.group, "grpo.group", GROUPS)
        for name in (
            "num_generations",
            "temperature",
            "questions_per_batch",
            "gradient_accumulation_steps",
            "learning_rate",
            "max_steps",
            "max_new_tokens",
            "num_questions",
            "num_iterations",
            "logging_steps",
        ):
            _positive(getattr(self, name), f"grpo.{name}")
        _check(self.num_generations >= 2, "grpo.num_generations", "a group needs at least 2 completions")
        _check(0 < self.top_p <= 1, "grpo.top_p", f"must be in (0, 1], got {self.top_p}")
        _check(self.beta >= 0, "grpo.beta", f"must be >= 0, got {self.beta}")
        _check(self.learning_rate <= 1, "grpo.learning_rate", f"must be at most 1, got {self.learning_rate}")
        _choice(self.scale_rewards, "grpo.scale_rewards", ("group", "batch", "none"))
        _positive(self.epsilon, "grpo.epsilon")
        _fraction(self.warmup_ratio, "grpo.warmup_ratio")
        _check(
            self.global_batch_size is None,
            "grpo.global_batch_size",
            "not used by grpo: set grpo.questions_per_batch and grpo.gradient_accumulation_steps",
        )
        self.check_trainer("grpo")
