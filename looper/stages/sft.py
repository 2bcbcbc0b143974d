"""Stage `sft`: TRL's SFTTrainer on prompt/completion pairs (loss on the completion only), LoRA, QLoRA or full.

Artifact: the adapter (or the full model) and the tokenizer.
"""

import dataclasses
import logging
from pathlib import Path
from typing import Optional

from looper import distributed, engine, models, prompts, tracking, training
from looper.config import Config
from looper.data import load_splits
from looper.models import TRAINED_MODEL, adapter_reads, known_warnings
from looper.training import (
    accumulation_steps,
    drop_checkpoints,
    ensure_finite,
    last_checkpoint,
    log_effective_batch,
    peft_config,
    trainer_arguments,
    trainer_device,
)

log = logging.getLogger(__name__)


def _length_grouping(args_class, enabled: bool) -> dict:
    """Length-grouped batching under the name this transformers version uses (`train_sampling_strategy` in newer
    releases, `group_by_length` before)."""
    names = {f.name for f in dataclasses.fields(args_class)}
    if "train_sampling_strategy" in names:
        return {"train_sampling_strategy": "group_by_length" if enabled else "random"}
    return {"group_by_length": enabled}


def training_examples(cfg: Config, tokenizer, split: str = "train") -> list[dict]:
    """SFT rows: the model's own prompt for each training question and its GSM8K solution as the completion (in
    the model's format: prompts.build_completion). `split="dev"`: the first sft.eval_examples dev problems instead,
    the eval rows."""
    limit = cfg.sft.num_examples if split == "train" else cfg.sft.eval_examples
    rows = []
    for row in load_splits(cfg.data)[split][:limit]:
        prompt = prompts.build_prompt(cfg.model, tokenizer, row["question"])
        rows.append({"prompt": prompt, "completion": prompts.build_completion(cfg.model, row["answer"], prompt)})
    return rows


def tokenize_examples(tokenizer, examples: list[dict]) -> list[dict]:
    """Prompt/completion rows as the token ids SFT trains on: the prompt's ids exactly as generation sees them (one
    BOS: prompts.encode_prompt), then the completion's and EOS, with the loss on the completion only
    (`completion_mask`). TRL takes such rows as they are."""
    rows = []
    for example in examples:
        prompt = prompts.encode_prompt(tokenizer, example["prompt"])
        completion = prompts.encode_completion(tokenizer, example["completion"])
        rows.append({"input_ids": prompt + completion, "completion_mask": [0] * len(prompt) + [1] * len(completion)})
    return rows


def looper_arguments(cfg: Config, out: Path) -> dict:
    """The SFTConfig arguments looper derives from the schema (training.trainer_arguments adds the named keys, the
    checkpoints and the pass-through)."""
    from trl import SFTConfig

    return dict(
        output_dir=str(out / "trainer"),
        learning_rate=cfg.sft.learning_rate,
        num_train_epochs=cfg.sft.epochs,
        max_steps=cfg.sft.max_steps,
        per_device_train_batch_size=cfg.sft.batch_size,
        per_device_eval_batch_size=cfg.sft.batch_size,
        gradient_accumulation_steps=accumulation_steps(cfg.sft, "sft"),
        max_length=None,
        padding_free=cfg.sft.padding_free,
        # a flattened batch is padded to a multiple of 64 tokens: few distinct shapes, so per-shape work is reused
        # (kernel choices; on the sdpa path cuDNN builds a plan per shape, ~2.5 ms of host time per layer)
        pad_to_multiple_of=64 if cfg.sft.padding_free else None,
        warmup_steps=cfg.sft.warmup_ratio,  # a float below 1: a share of the steps
        gradient_checkpointing=cfg.sft.gradient_checkpointing,
        completion_only_loss=True,
        **_length_grouping(SFTConfig, cfg.sft.group_by_length),
        logging_steps=cfg.sft.logging_steps,
        eval_strategy="steps" if cfg.sft.eval_examples else "no",
        eval_steps=(cfg.sft.eval_steps or cfg.sft.logging_steps) if cfg.sft.eval_examples else None,
        report_to="none",  # the job's W&B run gets the curves through training.trainer_callbacks
        seed=cfg.seed,
        dataloader_num_workers=0,
        **trainer_device(cfg),
    )


def make_trainer(cfg: Config, base: str, out: Path, examples: Optional[list[dict]] = None):
    """The configured SFTTrainer over the base model (LoRA/QLoRA adapter or full fine-tuning); `examples`
    (prompt/completion dicts) replace the training split (the GPU benchmark uses this)."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    model = models.load_causal_lm(base, cfg.model, cfg.lora)
    if cfg.sft.padding_free and model.config._attn_implementation == "sdpa":
        engine.attend_padding_free(model)  # flattened batches: FlashAttention-2 varlen on a GPU
    tokenizer = models.load_tokenizer(base, cfg.model)
    tokenizer.padding_side = "right"  # training pads on the right; generation loads it left-padded again
    dataset = Dataset.from_list(
        tokenize_examples(tokenizer, examples if examples is not None else training_examples(cfg, tokenizer))
    )
    held_out = training_examples(cfg, tokenizer, "dev") if cfg.sft.eval_examples else []
    if cfg.sft.eval_examples and not held_out:
        raise ValueError(f"sft.eval_examples={cfg.sft.eval_examples}: data {cfg.data.name!r} has no dev problems")
    args = trainer_arguments(cfg.sft, "sft", SFTConfig, looper_arguments(cfg, out))
    with known_warnings():  # (PEFT's wrapping asks the model about gradient checkpointing)
        trainer = SFTTrainer(
            model=model,
            args=args,
            train_dataset=dataset,
            eval_dataset=Dataset.from_list(tokenize_examples(tokenizer, held_out)) if held_out else None,
            processing_class=tokenizer,
            peft_config=peft_config(cfg.lora) if cfg.lora.enabled else None,
        )
    # TRL does not truncate in padding-free mode; in both modes an over-long example is left out rather than cut
    # (a cut solution loses its final answer).
    tokenized = trainer.train_dataset
    trainer.train_dataset = tokenized.filter(lambda row: len(row["input_ids"]) <= cfg.sft.max_length)
    if len(trainer.train_dataset) < len(tokenized):
        log.warning(
            "sft: %d of %d examples are longer than sft.max_length=%d tokens and are left out",
            len(tokenized) - len(trainer.train_dataset),
            len(tokenized),
            cfg.sft.max_length,
        )
    if len(trainer.train_dataset) == 0:
        raise ValueError(f"sft: every example is longer than sft.max_length={cfg.sft.max_length} tokens")
    if trainer.eval_dataset is not None:
        trainer.eval_dataset = trainer.eval_dataset.filter(lambda row: len(row["input_ids"]) <= cfg.sft.max_length)
    if cfg.sft.compile:
        training.compile_layers(trainer.model, "sft")
    return trainer


def _train(cfg: Config, base: str, out: Path) -> None:
    tracker = tracking.current()  # the job's W&B run (looper/__main__.py opens it)
    trainer = make_trainer(cfg, base, out)
    for callback in training.trainer_callbacks("sft"):  # the curves, into the job's run
        trainer.add_callback(callback)
    log_effective_batch(cfg.sft, "sft", tracker)
    with known_warnings():
        result = trainer.train(resume_from_checkpoint=last_checkpoint(out / "trainer", "sft"))
    ensure_finite("sft", trainer, result.training_loss, "sft.learning_rate")
    loss = training.whole_run_loss(trainer.state.log_history) or result.training_loss  # (a resumed run's too)
    engine.restore_attention(trainer.model)  # (a saved full model names its attention)
    trainer.save_model(str(out))  # on the main process only
    if distributed.is_main_process():
        models.portable_adapter(out, Path(cfg.paths.artifacts))
        drop_checkpoints(out / "trainer")
        tokenizer = trainer.processing_class
        tokenizer.padding_side = "left"
        tokenizer.save_pretrained(str(out))
    log.info("sft: %d examples, mean train loss %.4f", len(trainer.train_dataset), loss)


NEEDS = ("base",)  # the artifacts this stage builds on (looper/pipeline.py resolves them)
ENSURE = {"collective": True, "resumable": True}  # every process trains; a crash resumes from the last checkpoint


def READS(cfg: Config) -> tuple:
    """The config SFT reads: its section, the problems, the prompt format and the adapter."""
    return ("seed", "data", "sft", *TRAINED_MODEL, *adapter_reads(cfg))


def build(cfg: Config, up: dict, out: Path) -> None:
    """Fine-tune the base model on the training split into `out` (adapter or full model, and the tokenizer)."""
    _train(cfg, up["base"], out)
