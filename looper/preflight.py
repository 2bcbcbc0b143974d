"""Everything a run will read and every limit it will meet, checked before the first expensive stage.

Owns the checks that need more than one config group or the data: every data file the run will read (training,
dev, test, GSM8K-Platinum) parsed in full, counts asked for against the data they draw from (`*.num_questions`,
`sft.num_examples`, `eval.shots`), token limits against the model's context, the trainers' pass-through arguments
against TRL's dataclasses and their global batches against the number of processes. Value checks of one group live
in its schema (looper/config/). Nothing here loads model weights: a run that would fail at evaluation, hours in,
fails here in seconds.
"""

import json
import logging
from pathlib import Path
from typing import Optional

from looper.config import Config
from looper.data import load_splits

log = logging.getLogger(__name__)

TINY_CONTEXT = 1024  # looper/tiny.py builds the tiny model with this many positions


def model_context(cfg: Config) -> Optional[int]:
    """The base model's context (max_position_embeddings) from its config, without loading weights; None where the
    config cannot be read here (a hub model not in the local cache: its loading will say why)."""
    if cfg.model.name_or_path is None:
        return TINY_CONTEXT
    path = Path(cfg.model.name_or_path)
    try:
        if path.is_dir():
            config = json.loads((path / "config.json").read_text())
        else:
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(
                cfg.model.name_or_path, revision=cfg.model.revision, trust_remote_code=cfg.model.trust_remote_code
            ).to_dict()
    except Exception as error:  # unreadable here; the stage that loads the model reports it
        log.info("preflight: the context of %s is not known yet (%s)", cfg.model.name_or_path, error)
        return None
    config = config.get("text_config", config)
    return config.get("max_position_embeddings")


def _limits(cfg: Config, context: int) -> None:
    limits = {
        "rollout.max_new_tokens": cfg.rollout.max_new_tokens,
        "eval.max_new_tokens": cfg.eval.max_new_tokens,
        "model.max_new_tokens": cfg.model.max_new_tokens,
        "sft.max_length": cfg.sft.max_length,
        "dpo.max_length": cfg.dpo.max_length,
    }
    for key, value in limits.items():
        if value is not None and value > context:
            raise ValueError(
                f"{key}: {value} tokens exceed the model's context of {context} positions "
                f"({cfg.model.name_or_path or 'the tiny model'}); lower it"
            )


def _counts(cfg: Config, splits: dict, evaluated: dict) -> None:
    train = len(splits["train"])
    for key, value in (
        ("rollout.num_questions", cfg.rollout.num_questions),
        ("sft.num_examples", cfg.sft.num_examples),
    ):
        if value is not None and value > train:
            raise ValueError(f"{key}={value}, but the training split has {train} problems")
    # eval.num_questions caps each dataset: beyond the largest it can only be a mistake
    largest = max((len(rows) for rows in evaluated.values()), default=None)
    if cfg.eval.num_questions is not None and largest is not None and cfg.eval.num_questions > largest:
        raise ValueError(
            f"eval.num_questions={cfg.eval.num_questions}, but the largest dataset evaluated "
            f"({', '.join(evaluated)}) has {largest} problems"
        )
    if cfg.eval.shots and evaluated:
        from looper.stages.evaluation import shot_pool_source

        for dataset in evaluated:
            pool = len(shot_pool_source(dataset, cfg))
            if cfg.eval.shots + 1 > pool:
                raise ValueError(
                    f"eval.shots={cfg.eval.shots}: the examples come from a training split of {pool} "
                    f"problems ({dataset}); at most {pool - 1}"
                )


def _passthrough(cfg: Config) -> None:
    """The trainers' pass-through arguments (`sft.trainer`, `dpo.trainer`, `grpo.trainer`) against TRL's
    dataclasses, now rather than when the trainer is built (DPO's comes after the rollout)."""
    if not (cfg.sft.trainer or cfg.dpo.trainer or cfg.grpo.trainer):
        return
    import trl

    from looper.stages import dpo, grpo, sft
    from looper.training import check_passthrough

    check_passthrough(cfg.sft, "sft", trl.SFTConfig, tuple(sft.looper_arguments(cfg, Path("."))))
    check_passthrough(cfg.dpo, "dpo", trl.DPOConfig, tuple(dpo.looper_arguments(cfg, Path("."))))
    check_passthrough(cfg.grpo, "grpo", trl.GRPOConfig, tuple(grpo.looper_arguments(cfg, Path("."))))


def _trainer_values(cfg: Config) -> None:
    """The trainers' named choices against what transformers and TRL accept (their own checks run only when the
    trainer is built: DPO's after the rollout)."""
    import dataclasses
    import re

    from transformers.trainer_utils import SchedulerType
    from transformers.training_args import OptimizerNames
    from trl import DPOConfig

    for name in ("sft", "dpo", "grpo"):
        section = getattr(cfg, name)
        for key, allowed in (
            ("optim", [o.value for o in OptimizerNames]),
            ("lr_scheduler_type", [s.value for s in SchedulerType]),
        ):
            value = getattr(section, key)
            if value not in allowed:
                raise ValueError(f"{name}.{key}: got {value!r}; allowed: {', '.join(allowed)}")
    field = next(f for f in dataclasses.fields(DPOConfig) if f.name == "loss_type")
    losses = re.findall(r"`'(\w+)'`", field.metadata.get("help", ""))
    if losses and cfg.dpo.loss_type not in losses:  # (TRL's help lists them; a release without the list is not checked)
        raise ValueError(f"dpo.loss_type: got {cfg.dpo.loss_type!r}; allowed: {', '.join(losses)}")


def _trainer_configs(cfg: Config) -> None:
    """Build TRL's SFTConfig, DPOConfig and GRPOConfig as the stages will, so whatever their own checks refuse (a
    combination of arguments, a pass-through value) fails now, naming the section; deriving them also checks the
    global batches against the number of processes (`training.accumulation_steps`)."""
    import tempfile

    import trl

    from looper.stages import dpo, grpo, sft
    from looper.training import trainer_arguments

    with tempfile.TemporaryDirectory() as scratch:
        for name, args_class, derived in (
            ("sft", trl.SFTConfig, sft.looper_arguments(cfg, Path(scratch))),
            ("dpo", trl.DPOConfig, dpo.looper_arguments(cfg, Path(scratch), evaluate=cfg.dpo.eval_fraction > 0)),
            ("grpo", trl.GRPOConfig, grpo.looper_arguments(cfg, Path(scratch))),
        ):
            try:
                trainer_arguments(getattr(cfg, name), name, args_class, derived)
            except (ValueError, TypeError) as error:
                raise ValueError(f"{name}: TRL's {args_class.__name__} refuses these settings: {error}") from None


def check(cfg: Config) -> None:
    """Fail now, naming the key or the file, for anything the run would fail on later: unreadable or empty data
    files (every one the run will read, the Platinum file included), counts beyond the data, token limits beyond the
    model's context."""
    from looper.engine import BACKENDS
    from looper.stages.evaluation import eval_problems, objective_dataset

    if cfg.generation.backend not in ("auto", *BACKENDS):  # (registered backends included: looper/engine/__init__.py)
        allowed = ", ".join(("auto", *BACKENDS))
        raise ValueError(f"generation.backend: got {cfg.generation.backend!r}; allowed: {allowed}")
    splits = load_splits(cfg.data)
    if not objective_dataset(cfg).endswith("_dev"):
        log.warning(
            "eval.select_on=%s is a test set: a sweep that selects on it reports a biased figure for it",
            objective_dataset(cfg),
        )
    evaluated = {}
    if cfg.stage.name in ("pipeline", "eval") and not cfg.eval.targets:
        raise ValueError("eval.targets: empty; name at least one of base, sft, dpo or a model directory")
    if cfg.stage.name in ("pipeline", "eval"):
        for dataset in dict.fromkeys([*cfg.eval.datasets, objective_dataset(cfg)]):
            rows = eval_problems(dataset, cfg, limit=False)
            if not rows:
                raise ValueError(f"eval.datasets: {dataset} holds no problems")
            evaluated[dataset] = rows
    if "gsm8k_platinum" in evaluated and cfg.data.name == "gsm8k":
        from looper.data import check_overlap

        check_overlap(
            splits["train"] + splits["dev"], evaluated["gsm8k_platinum"], "GSM8K-Platinum", cfg.data.allow_overlap
        )
    _counts(cfg, splits, evaluated)
    _passthrough(cfg)
    _trainer_values(cfg)
    _trainer_configs(cfg)
    context = model_context(cfg)
    if context is not None:
        _limits(cfg, context)
