"""What the SFT and DPO trainers share: the LoRA config, mixed-precision flags and the divergence check.

Owns nothing a stage builds; must never import a stage.
"""

import math

import torch

from looper import models
from looper.config import Config, LoraSettings


def peft_config(lora: LoraSettings):
    """PEFT's LoraConfig for `lora` settings."""
    from peft import LoraConfig

    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        task_type="CAUSAL_LM",
    )


def trainer_precision(cfg: Config) -> dict:
    """bf16/fp16 mixed precision flags matching the model dtype."""
    dtype = models.resolve_dtype(cfg.model.dtype)
    return {"bf16": str(dtype) == "torch.bfloat16", "fp16": str(dtype) == "torch.float16"}


def ensure_finite(stage: str, trainer, final_loss: float, learning_rate_key: str) -> None:
    """Fail (so the artifact is never marked DONE) when training diverged: a non-finite logged loss or weight."""
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry] + [final_loss]
    bad = [name for name, p in trainer.model.named_parameters() if p.requires_grad and not torch.isfinite(p).all()]
    if bad or not all(math.isfinite(loss) for loss in losses):
        raise RuntimeError(
            f"{stage}: training diverged (losses {losses[-3:]}, {len(bad)} weight tensors with NaN or "
            f"inf{', e.g. ' + bad[0] if bad else ''}); nothing was saved. Lower {learning_rate_key} "
            f"(or check the data)"
        )
