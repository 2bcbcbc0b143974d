"""What the SFT and DPO trainers share: the LoRA config, the device flags, the trainer arguments (named keys,
the TRL pass-through, checkpoints), resuming from a checkpoint, the divergence check, and the callback that logs a
trainer into the job's W&B run, and compiling a model's decoder layers (`compile_layers`).

Owns nothing a stage builds; must never import a stage.
"""

import dataclasses
import difflib
import logging
import math
import shutil
from pathlib import Path
from typing import Any, Optional

import torch

from looper import distributed, models, tracking
from looper.config import Config, LoraSettings

log = logging.getLogger(__name__)


# the common trainer arguments the SFT and DPO sections name and document (looper/config/stages.py)
NAMED = ("weight_decay", "lr_scheduler_type", "optim", "max_grad_norm", "use_liger_kernel")
# transformers' new names for arguments looper sets, used where the installed release has them (the old ones warn)
RENAMED = {"gradient_checkpointing": "activation_checkpointing"}
# looper's own: the pass-through may not set them (the schema's keys or looper's mechanics decide them)
RESERVED = ("output_dir", "report_to", "save_strategy", "save_steps", "save_total_limit", "resume_from_checkpoint")


def check_passthrough(section: Any, name: str, args_class: Any, looper_sets: tuple = ()) -> None:
    """Fail naming the key when `<name>.trainer` holds an argument TRL's `args_class` does not have (with the closest
    one), or one that looper sets itself (a named key of the section, or what the stage derives from the schema)."""
    known = {f.name for f in dataclasses.fields(args_class)}
    owned = set(looper_sets) | {RENAMED[key] for key in looper_sets if key in RENAMED}
    for key in section.trainer:
        if key in NAMED or key in RESERVED or key in owned:
            where = f"set {name}.{key}" if key in NAMED else f"looper sets it (the {name}.* keys: docs/config.md)"
            raise ValueError(f"{name}.trainer.{key}: not a pass-through argument; {where}")
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ValueError(f"{name}.trainer.{key}: not an argument of TRL's {args_class.__name__}{hint}")


def trainer_arguments(section: Any, name: str, args_class: Any, looper_sets: dict) -> Any:
    """TRL's `args_class` built from what the stage sets (`looper_sets`), the section's named keys, its checkpoint
    settings and its pass-through (`<name>.trainer`), after `check_passthrough`."""
    check_passthrough(section, name, args_class, tuple(looper_sets))
    known = {f.name for f in dataclasses.fields(args_class)}
    looper_sets = {RENAMED.get(k, k) if RENAMED.get(k) in known else k: v for k, v in looper_sets.items()}
    saving = (
        {"save_strategy": "steps", "save_steps": section.save_steps, "save_total_limit": section.save_total_limit}
        if section.save_steps
        else {"save_strategy": "no"}
    )
    return args_class(**looper_sets, **{key: getattr(section, key) for key in NAMED}, **saving, **section.trainer)


def accumulation_steps(section: Any, name: str) -> int:
    """Gradient accumulation steps of a trainer section: `global_batch_size / (batch_size x processes)` when a global
    batch is set (failing, naming the key, when it does not divide), else `gradient_accumulation_steps`."""
    if section.global_batch_size is None:
        return section.gradient_accumulation_steps
    per_step = section.batch_size * distributed.world_size()
    if section.global_batch_size % per_step:
        raise ValueError(
            f"{name}.global_batch_size={section.global_batch_size} is not a multiple of {name}.batch_size="
            f"{section.batch_size} x {distributed.world_size()} processes = {per_step}; change either"
        )
    return section.global_batch_size // per_step


def effective_batch(section: Any, name: str) -> dict:
    """The batch a trainer section trains with, for the log and the W&B config: per device, accumulation,
    processes and their product."""
    accumulation = accumulation_steps(section, name)
    world = distributed.world_size()
    return {
        f"{name}/per_device_batch_size": section.batch_size,
        f"{name}/gradient_accumulation_steps": accumulation,
        f"{name}/processes": world,
        f"{name}/effective_batch_size": section.batch_size * accumulation * world,
    }


def log_effective_batch(section: Any, name: str, tracker) -> None:
    """Say in the log, and in the stage's W&B config, what batch the optimizer steps on."""
    batch = effective_batch(section, name)
    log.info(
        "%s: effective batch %d = %d per device x %d accumulation x %d processes",
        name,
        batch[f"{name}/effective_batch_size"],
        batch[f"{name}/per_device_batch_size"],
        batch[f"{name}/gradient_accumulation_steps"],
        batch[f"{name}/processes"],
    )
    tracker.config(batch)


def last_checkpoint(trainer_dir: Path, stage: str) -> Optional[str]:
    """The newest complete checkpoint a crashed or killed build left in `trainer_dir` (None: start from step 0). A
    checkpoint without `trainer_state.json` (the Trainer writes it last) was torn by the kill: it is deleted, with a
    warning, and the one before it is used."""
    checkpoints = sorted(
        (p for p in trainer_dir.glob("checkpoint-*") if p.is_dir() and p.name.rsplit("-", 1)[-1].isdigit()),
        key=lambda p: int(p.name.rsplit("-", 1)[-1]),
        reverse=True,
    )
    for checkpoint in checkpoints:
        if (checkpoint / "trainer_state.json").is_file():
            log.info("%s: resuming from %s (step %s)", stage, checkpoint, checkpoint.name.rsplit("-", 1)[-1])
            return str(checkpoint)
        log.warning("%s: %s was not completely written (killed while saving); deleting it", stage, checkpoint)
        if distributed.is_main_process():
            shutil.rmtree(checkpoint, ignore_errors=True)
    return None


def drop_checkpoints(trainer_dir: Path) -> None:
    """Delete the checkpoints once the model is saved: they insure a build, the artifact is the model."""
    for checkpoint in trainer_dir.glob("checkpoint-*"):
        shutil.rmtree(checkpoint, ignore_errors=True)


def compile_layers(model, name: str) -> None:
    """`<name>.compile`: torch.compile each decoder layer of `model` (regional compilation: the layers share one
    compiled code, traced once with dynamic shapes), so a LoRA step launches a few fused kernels a layer instead of
    hundreds of small ones (RMSNorm, rotary embedding, SiLU, the adapters' dropout, scaling and adds). The layers
    are those of the class transformers keeps whole (`_no_split_modules`); what is saved does not change. A
    quantized base trains uncompiled (bitsandbytes layers are not compiled here)."""
    from looper.engine.interface import is_quantized
    from looper.engine.kernels import fused

    if is_quantized(model):
        log.warning("%s.compile: not for a quantized base; training uncompiled", name)
        return
    base = getattr(model, "get_base_model", lambda: model)()
    kinds = set(getattr(base, "_no_split_modules", None) or ())
    layers = [module for module in model.modules() if type(module).__name__ in kinds]
    if not layers:
        raise ValueError(f"{name}.compile: {type(base).__name__} names no decoder layer class (_no_split_modules)")
    for layer in layers:
        layer.compile(backend=fused.COMPILE_BACKEND, dynamic=True)
    log.info("%s: %d %s compiled (the first steps pay the compilation)", name, len(layers), type(layers[0]).__name__)


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


def trainable_policy(cfg: Config, sft_dir: Path, fresh_lora: LoraSettings):
    """(model, tokenizer, peft_config for the trainer) of a stage that goes on from the SFT policy: the SFT adapter
    made trainable, or the SFT model (full fine-tuning) and a fresh LoRA with `fresh_lora`."""
    if models.is_adapter(str(sft_dir)):
        model, tokenizer = models.load_target(str(sft_dir), cfg.model, cfg.lora, trainable=True)
        return model, tokenizer, None
    model, tokenizer = models.load_target(str(sft_dir), cfg.model, trainable=True)
    return model, tokenizer, peft_config(fresh_lora)


def save_policy(cfg: Config, trainer, out: Path) -> None:
    """Save a preference or RL trainer's policy into `out` (main process): the trained adapter alone (not TRL's
    `ref` copy), portable, and the tokenizer padded on the left as generation uses it."""
    trainer.accelerator.unwrap_model(trainer.model).save_pretrained(str(out), selected_adapters=["default"])
    models.portable_adapter(out, Path(cfg.paths.artifacts))
    tokenizer = trainer.processing_class
    tokenizer.padding_side = "left"
    tokenizer.save_pretrained(str(out))


def trainer_device(cfg: Config) -> dict:
    """The trainer's device flags: bf16/fp16 mixed precision matching the model dtype, and `use_cpu` under a
    multi-process launch without CUDA (transformers' TrainingArguments resets accelerate's state and, unless told
    the job runs on the CPU, makes a non-distributed one: every process would train on all the data and write the
    same checkpoints)."""
    dtype = models.resolve_dtype(cfg.model.dtype)
    flags = {"bf16": str(dtype) == "torch.bfloat16", "fp16": str(dtype) == "torch.float16"}
    flags["dataloader_pin_memory"] = torch.cuda.is_available()  # pinned host memory only serves a GPU
    if distributed.world_size() > 1 and not torch.cuda.is_available():
        flags["use_cpu"] = True
    return flags


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


def whole_run_loss(log_history: list[dict]) -> Optional[float]:
    """The mean training loss over every step of a run, from the trainer's log history (each logged `loss` is the mean
    since the previous log, weighted by its steps). A resumed trainer's own `training_loss` covers only the steps since
    the checkpoint; its history, restored from the checkpoint, covers them all."""
    total, previous = 0.0, 0
    for entry in log_history:
        if "loss" in entry and "step" in entry:
            total += entry["loss"] * (entry["step"] - previous)
            previous = entry["step"]
    return total / previous if previous else None


FINAL = ("train_loss", "train_runtime", "train_samples_per_second", "train_steps_per_second", "total_flos")


def trainer_callbacks(stage: str) -> list:
    """The callbacks that log a TRL/transformers trainer into the job's run (none without a run): its curves as
    `<stage>/<key>` over `<stage>/step` (the optimizer step, which a resumed trainer continues), its arguments in the
    run's config under `<stage>_trainer`, and at the end `<stage>/train_loss` over the whole run (`whole_run_loss`)."""
    tracker = tracking.current()
    if tracker.run is None:
        return []
    from transformers import TrainerCallback

    class TrainerLog(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            def define():
                tracker.run.define_metric(f"{stage}/step")
                tracker.run.define_metric(f"{stage}/*", step_metric=f"{stage}/step")

            tracker._call("define_metric", define)
            tracker.config({f"{stage}_trainer": args.to_sanitized_dict()})

        def on_log(self, args, state, control, logs=None, **kwargs):
            numbers = {k: v for k, v in (logs or {}).items() if isinstance(v, (int, float)) and k not in FINAL}
            if numbers:
                tracker.log({**{f"{stage}/{k}": v for k, v in numbers.items()}, f"{stage}/step": state.global_step})

        def on_train_end(self, args, state, control, **kwargs):
            loss = whole_run_loss(state.log_history)
            tracker.summary({f"{stage}/train_loss": loss, f"{stage}/steps": state.global_step})

    return [TrainerLog()]
