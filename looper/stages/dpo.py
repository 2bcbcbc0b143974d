"""Stage `dpo`: TRL's DPOTrainer on the preference pairs, with the SFT policy as the reference.

- LoRA SFT: `PeftModel.from_pretrained(base, sft_adapter, is_trainable=True)` with `ref_model=None`; TRL copies the
  adapter into a frozen `ref` adapter, so the reference is the SFT policy and the base weights exist once.
- Full-FT SFT (the tiny model): a fresh LoRA (`dpo.fresh_lora`) on the SFT model; with adapters disabled the model is
  the SFT model, which TRL uses as the reference.
Before training the policy equals the reference, so their log-probs must agree. `reference_check` measures that
on the first batch with dropout off (TRL's own first-step margin is computed in training mode, where LoRA dropout
alone moves it), saves it in `reference_check.json`, and stops the stage when the implicit reward margin exceeds
`dpo.reference_tolerance` (`dpo.reference_check=warn`: log and train on). Pairs are tokenized by looper
(prompts.encode_prompt / encode_completion), so DPO sees the prompt ids generation saw, with one BOS. The exported
adapter holds the policy only (no `ref/` copy).
"""

import json
import logging
import random
import shutil
from pathlib import Path

import torch

from looper import distributed, engine, prompts, tracking, training
from looper.artifacts import PAIRS, read_jsonl
from looper.config import Config
from looper.models import TRAINED_MODEL, adapter_reads, known_warnings
from looper.training import (
    accumulation_steps,
    drop_checkpoints,
    ensure_finite,
    last_checkpoint,
    log_effective_batch,
    save_policy,
    trainable_policy,
    trainer_arguments,
    trainer_device,
)

log = logging.getLogger(__name__)


def first_step(log_history: list[dict]) -> dict:
    """The metrics TRL logged at the first step (`logging_first_step`), from the trainer's log history, which a
    resumed run restores from its checkpoint: step 1's figures stay step 1's across a resume."""
    first = next((entry for entry in log_history if "rewards/margins" in entry), {})
    return (
        {"step": first["step"], **{k: v for k, v in first.items() if k.startswith(("rewards/", "loss"))}}
        if first
        else {}
    )


def _on_disk(rows: list[dict], where: Path):
    """The pairs as a dataset saved by the main process and loaded from disk by every process. TRL writes the
    precomputed reference log-probs next to the dataset's files and reads them back on every rank; an in-memory
    dataset's files go to a per-process temporary directory that the other ranks cannot see (FileNotFoundError on
    rank 1 under DDP, measured on 2 GPUs)."""
    from datasets import Dataset, load_from_disk

    if distributed.is_main_process():
        shutil.rmtree(where, ignore_errors=True)  # a killed build's copy (its reference log-probs included)
        Dataset.from_list(rows).save_to_disk(str(where))
    distributed.barrier()
    return load_from_disk(str(where))


def encode_pair(example: dict, tokenizer) -> dict:
    """A pair's token ids: the prompt as generation sees it, each completion followed by EOS."""
    return {
        "prompt_ids": prompts.encode_prompt(tokenizer, example["prompt"]),
        "chosen_ids": prompts.encode_completion(tokenizer, example["chosen"]),
        "rejected_ids": prompts.encode_completion(tokenizer, example["rejected"]),
    }


def _trainer_class():
    from trl import DPOTrainer

    class Trainer(DPOTrainer):
        """TRL's DPOTrainer with looper's tokenization of the pairs (TRL's would tokenize the prompt with the
        tokenizer's special tokens on top of a chat template's BOS)."""

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            tokenizer = getattr(processing_class, "tokenizer", processing_class)
            dataset = dataset.map(encode_pair, fn_kwargs={"tokenizer": tokenizer}, desc=f"Tokenizing {dataset_name}")
            if args.max_length is not None and args.truncation_mode == "keep_start":  # as TRL: no completion left
                dataset = dataset.filter(lambda example: len(example["prompt_ids"]) < args.max_length)
            return dataset

    return Trainer


def reference_margin(trainer, dropout: bool = False) -> dict:
    """The policy's and the reference's log-probs of the first training batch and the implicit reward margins
    beta * ((policy - ref)_chosen - (policy - ref)_rejected): 0 up to the dtype's rounding when the reference is the
    policy's starting point. The reference is always computed as TRL computes it; the policy with dropout off, or
    on (`dropout=True`: what TRL's first training step sees, for comparison)."""
    model = trainer.model
    was_training = model.training
    model.eval()
    try:
        batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
        reference_chosen, reference_rejected = trainer.compute_ref_log_probs(model, batch)
        kwargs = {
            k: v for k, v in batch.items() if k not in ("completion_mask", "ref_chosen_logps", "ref_rejected_logps")
        }
        labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
        model.train(dropout)
        with torch.no_grad(), trainer.accelerator.autocast():
            log_probs = model(**kwargs, labels=labels, use_cache=False, fused_lm_head=True).log_probs
        policy_chosen, policy_rejected = log_probs[:, -(batch["completion_mask"].size(1) - 1) :].sum(dim=1).chunk(2)
    finally:
        model.train(was_training)
    margins = trainer.beta * ((policy_chosen - reference_chosen) - (policy_rejected - reference_rejected))
    return {
        "margin": margins.float().mean().item(),
        "max_abs_margin": margins.float().abs().max().item(),
        "max_abs_logp_difference": torch.cat([policy_chosen - reference_chosen, policy_rejected - reference_rejected])
        .float()
        .abs()
        .max()
        .item(),
        "pairs": int(margins.numel()),
    }


def looper_arguments(cfg: Config, out: Path, evaluate: bool = False) -> dict:
    """The DPOConfig arguments looper derives from the schema (training.trainer_arguments adds the named keys, the
    checkpoints and the pass-through); `evaluate`: a held-out split is evaluated every dpo.eval_steps."""
    return dict(
        output_dir=str(out / "trainer"),
        beta=cfg.dpo.beta,
        loss_type=[cfg.dpo.loss_type],
        learning_rate=cfg.dpo.learning_rate,
        num_train_epochs=cfg.dpo.epochs,
        max_steps=cfg.dpo.max_steps,
        per_device_train_batch_size=cfg.dpo.batch_size,
        per_device_eval_batch_size=cfg.dpo.batch_size,
        gradient_accumulation_steps=accumulation_steps(cfg.dpo, "dpo"),
        max_length=cfg.dpo.max_length,
        precompute_ref_log_probs=cfg.dpo.precompute_ref_log_probs,
        gradient_checkpointing=cfg.dpo.gradient_checkpointing,
        warmup_steps=cfg.dpo.warmup_ratio,  # a float below 1: a share of the steps
        logging_steps=cfg.dpo.logging_steps,
        logging_first_step=True,
        eval_strategy="steps" if evaluate else "no",
        eval_steps=(cfg.dpo.eval_steps or cfg.dpo.logging_steps) if evaluate else None,
        report_to="none",  # the job's W&B run gets the curves through training.trainer_callbacks
        seed=cfg.seed,
        **trainer_device(cfg),
    )


def split_pairs(rows: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, held out): the pairs of a seeded `fraction` of the questions are held out, so no question has pairs
    on both sides. Without a fraction, every pair trains."""
    if not fraction:
        return rows, []
    questions = sorted({row["question_id"] for row in rows}, key=str)
    held = set(random.Random(seed).sample(questions, max(1, round(fraction * len(questions)))))
    if len(held) == len(questions):
        raise ValueError(f"dpo.eval_fraction={fraction} holds out every one of the {len(questions)} questions")
    return [r for r in rows if r["question_id"] not in held], [r for r in rows if r["question_id"] in held]


def make_trainer(cfg: Config, sft_dir: Path, pairs_dir: Path, out: Path):
    """The configured DPOTrainer: policy = the SFT policy made trainable, reference = the frozen SFT policy."""
    from trl import DPOConfig

    model, tokenizer, peft_config = trainable_policy(cfg, sft_dir, cfg.dpo.fresh_lora)
    if cfg.dpo.padding_free:  # (before TRL's constructor: its reference log-probs are computed there)
        if model.config._attn_implementation == "sdpa":
            engine.attend_padding_free(model)
        engine.pack_backbone(model)
    tokenizer.padding_side = "right"
    train, held_out = split_pairs(read_jsonl(pairs_dir / PAIRS), cfg.dpo.eval_fraction, cfg.seed)
    fields = ("prompt", "chosen", "rejected")
    dataset = _on_disk([{k: r[k] for k in fields} for r in train], out / "trainer" / "pairs")
    held_out = (
        _on_disk([{k: r[k] for k in fields} for r in held_out], out / "trainer" / "eval_pairs") if held_out else None
    )
    args = trainer_arguments(cfg.dpo, "dpo", DPOConfig, looper_arguments(cfg, out, held_out is not None))
    with known_warnings():  # (TRL's constructor also asks the model about gradient checkpointing)
        trainer = _trainer_class()(
            model=model,
            ref_model=None,
            args=args,
            train_dataset=dataset,
            eval_dataset=held_out,
            processing_class=tokenizer,
            peft_config=peft_config,
        )
    if cfg.dpo.compile:
        training.compile_layers(trainer.model, "dpo")
    return trainer


def _check_reference(cfg: Config, trainer) -> dict:
    with known_warnings():
        measured = reference_margin(trainer)
    measured["tolerance"] = cfg.dpo.reference_tolerance
    measured["ok"] = measured["max_abs_margin"] <= cfg.dpo.reference_tolerance
    if not measured["ok"]:
        message = (
            f"dpo: before training, the policy and the reference disagree on the first batch (dropout off): "
            f"reward margins up to {measured['max_abs_margin']:.3g} > dpo.reference_tolerance="
            f"{cfg.dpo.reference_tolerance}; the reference is not the SFT policy DPO starts from"
        )
        if cfg.dpo.reference_check == "error":
            raise RuntimeError(message + " (dpo.reference_check=warn trains anyway)")
        log.warning(message)
    return measured


def _train(cfg: Config, sft_dir: Path, pairs_dir: Path, out: Path) -> None:
    tracker = tracking.current()  # the job's W&B run (looper/__main__.py opens it)
    trainer = make_trainer(cfg, sft_dir, pairs_dir, out)
    for callback in training.trainer_callbacks("dpo"):  # the curves, into the job's run
        trainer.add_callback(callback)
    log_effective_batch(cfg.dpo, "dpo", tracker)
    measured = _check_reference(cfg, trainer)
    with known_warnings():
        result = trainer.train(resume_from_checkpoint=last_checkpoint(out / "trainer", "dpo"))
    ensure_finite("dpo", trainer, result.training_loss, "dpo.learning_rate")
    first = first_step(trainer.state.log_history)
    margin = first.get("rewards/margins")
    loss = training.whole_run_loss(trainer.state.log_history) or result.training_loss  # (a resumed run's too)
    tracker.summary(
        {
            "dpo/first_step_margin": margin,
            "dpo/reference_margin": measured["max_abs_margin"],
            "dpo/reference_check_ok": measured["ok"],
        }
    )
    if distributed.is_main_process():
        drop_checkpoints(out / "trainer")
        record = {**measured, "first_step_train_mode": first}
        (out / "reference_check.json").write_text(json.dumps(record, indent=2))
        save_policy(cfg, trainer, out)
    log.info(
        "dpo: %d pairs, mean train loss %.4f, reference check margin %.3g (dropout off), first-step margin %s "
        "(training mode)",
        len(trainer.train_dataset),
        loss,
        measured["max_abs_margin"],
        margin,
    )


NEEDS = ("preferences", "sft")  # the artifacts this stage builds on (looper/pipeline.py resolves them)
ENSURE = {"collective": True, "resumable": True}  # every process trains; a crash resumes from the last checkpoint


def READS(cfg: Config) -> tuple:
    """The config DPO reads: its section, the prompt format and the adapter (pairs and policy come as artifacts)."""
    return ("seed", "dpo", *TRAINED_MODEL, *adapter_reads(cfg))


def build(cfg: Config, up: dict, out: Path) -> None:
    """Train the SFT policy on the preference pairs into `out` (the policy adapter and the tokenizer)."""
    _train(cfg, Path(up["sft"]), Path(up["preferences"]), out)
