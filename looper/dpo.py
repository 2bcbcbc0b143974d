"""Stage `dpo`: TRL's DPOTrainer on the preference pairs, with the SFT policy as the reference.

- LoRA SFT: `PeftModel.from_pretrained(base, sft_adapter, is_trainable=True)` with `ref_model=None`; TRL copies the
  adapter into a frozen `ref` adapter, so the reference is the SFT policy and the base weights exist once.
- Full-FT SFT (the tiny model): a fresh LoRA (`dpo.fresh_lora`) on the SFT model; with adapters disabled the model is
  the SFT model, which TRL uses as the reference.
At the first step the policy equals the reference, so the implicit reward margins must be ~0; the logged value is
saved in `reference_check.json`. The exported adapter holds the policy only (no `ref/` copy).
"""

import json
import logging
from pathlib import Path

from transformers import TrainerCallback

from looper import distributed, models, preferences, sft
from looper.artifacts import ArtifactStore
from looper.config import Config
from looper.tracking import stage_run

log = logging.getLogger(__name__)

REFERENCE_TOLERANCE = 1e-3  # |margin| at step 1 above this means the reference is not the SFT policy


class FirstStepCheck(TrainerCallback):
    """Keeps the metrics TRL logs at the first step (`logging_first_step`)."""

    def __init__(self):
        self.first: dict = {}

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not self.first and logs and "rewards/margins" in logs:
            self.first = {"step": state.global_step, **{k: logs[k] for k in logs if k.startswith(("rewards/",
                                                                                                  "loss"))}}


def _policy(cfg: Config, sft_dir: Path):
    """(model, tokenizer, peft_config for the trainer): the SFT adapter made trainable, or the SFT model + fresh LoRA."""
    if models.is_adapter(str(sft_dir)):
        model, tokenizer = models.load_target(str(sft_dir), cfg.model, cfg.lora, trainable=True)
        return model, tokenizer, None
    model, tokenizer = models.load_target(str(sft_dir), cfg.model, trainable=True)
    return model, tokenizer, sft.peft_config(cfg.dpo.fresh_lora)


def _on_disk(rows: list[dict], where: Path):
    """The pairs as a dataset saved by the main process and loaded from disk by every process. TRL writes the
    precomputed reference log-probs next to the dataset's files and reads them back on every rank; an in-memory
    dataset's files go to a per-process temporary directory that the other ranks cannot see (FileNotFoundError on
    rank 1 under DDP, measured on 2 GPUs)."""
    from datasets import Dataset, load_from_disk

    if distributed.is_main_process():
        Dataset.from_list(rows).save_to_disk(str(where))
    distributed.barrier()
    return load_from_disk(str(where))


def make_trainer(cfg: Config, sft_dir: Path, pairs_dir: Path, out: Path, report_to: str = "none"):
    """The configured DPOTrainer: policy = the SFT policy made trainable, reference = the frozen SFT policy."""
    from trl import DPOConfig, DPOTrainer

    model, tokenizer, peft_config = _policy(cfg, sft_dir)
    tokenizer.padding_side = "right"
    with open(pairs_dir / "pairs.jsonl") as handle:
        rows = [json.loads(line) for line in handle if line.strip()]
    dataset = _on_disk([{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]} for r in rows],
                       out / "trainer" / "pairs")
    args = DPOConfig(
        output_dir=str(out / "trainer"), beta=cfg.dpo.beta, loss_type=[cfg.dpo.loss_type],
        learning_rate=cfg.dpo.learning_rate, num_train_epochs=cfg.dpo.epochs, max_steps=cfg.dpo.max_steps,
        per_device_train_batch_size=cfg.dpo.batch_size, gradient_accumulation_steps=cfg.dpo.gradient_accumulation_steps,
        max_length=cfg.dpo.max_length, precompute_ref_log_probs=cfg.dpo.precompute_ref_log_probs,
        gradient_checkpointing=cfg.dpo.gradient_checkpointing, logging_steps=cfg.dpo.logging_steps,
        logging_first_step=True, save_strategy="no", report_to=report_to, seed=cfg.seed,
        **sft.trainer_precision(cfg))
    return DPOTrainer(model=model, ref_model=None, args=args, train_dataset=dataset, processing_class=tokenizer,
                      peft_config=peft_config, callbacks=[FirstStepCheck()])


def _train(cfg: Config, sft_dir: Path, pairs_dir: Path, out: Path) -> None:
    with stage_run(cfg, "dpo") as tracker:
        trainer = make_trainer(cfg, sft_dir, pairs_dir, out, tracker.report_to)
        check = next(c for c in trainer.callback_handler.callbacks if isinstance(c, FirstStepCheck))
        result = trainer.train()
        margin = check.first.get("rewards/margins")
        check.first["ok"] = margin is not None and abs(margin) < REFERENCE_TOLERANCE
        tracker.summary({"dpo/train_loss": result.training_loss, "dpo/first_step_margin": margin,
                         "dpo/reference_check_ok": check.first["ok"]})
    if not check.first["ok"]:
        log.warning("dpo: first-step reward margin %s is not ~0: the reference may not be the SFT policy", margin)
    if distributed.is_main_process():
        (out / "reference_check.json").write_text(json.dumps(check.first, indent=2))
        trainer.accelerator.unwrap_model(trainer.model).save_pretrained(str(out), selected_adapters=["default"])
        tokenizer = trainer.processing_class
        tokenizer.padding_side = "left"
        tokenizer.save_pretrained(str(out))
    log.info("dpo: %d pairs, final loss %.4f, first-step margin %s", len(trainer.train_dataset),
             result.training_loss, margin)


def run(cfg: Config, store: ArtifactStore) -> Path:
    """Train the SFT policy on the preference pairs; returns the artifact (policy adapter + tokenizer)."""
    pairs_dir = preferences.run(cfg, store)
    sft_dir = sft.run(cfg, store)
    spec = {"sft": sft_dir.name, "preferences": pairs_dir.name, "dpo": cfg.dpo, "lora": cfg.lora,
            "model": cfg.model, "seed": cfg.seed}
    return store.ensure("dpo", spec, lambda out: _train(cfg, sft_dir, pairs_dir, out), collective=True)
