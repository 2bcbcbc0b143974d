"""Stage `export`: the final adapter merged into its base, written as a standalone model directory.

Artifact: a model directory that plain `AutoModelForCausalLM.from_pretrained` loads (weights in `export.dtype`), its
tokenizer, `README.md` (a model card: the base, the adapter merged, the looper config, the source's evaluation results)
and `looper_config.yaml`; with `export.quantized`, a bitsandbytes-quantized copy in `quantized-<bits>/`. It can be
evaluated like any directory (`eval.targets=[<dir>]`).

The adapter (`export.source`: the DPO policy or the SFT model) is merged into full-precision base weights. Over a
quantized base (QLoRA) that means the base's original weights, which the 4- or 8-bit ones quantize: the standard way to
deploy a QLoRA adapter; the merged model then differs from the quantized one the adapter was trained over by the
base's quantization error. A full fine-tuned SFT model is written as it is.
"""

import dataclasses
import json
import logging
from pathlib import Path

import torch

from looper import models
from looper.config import Config, identity

log = logging.getLogger(__name__)


def NEEDS(cfg: Config) -> tuple:  # noqa: N802 - the stage interface's name (a tuple in the other stages)
    """The artifact this stage exports (looper/pipeline.py resolves it)."""
    return (cfg.export.source,)


ENSURE: dict = {}


def spec(cfg: Config, up: dict, store=None) -> dict:
    """What identifies the export: the source artifact and the export settings."""
    return {
        cfg.export.source: Path(up[cfg.export.source]).name,
        "export": identity(cfg.export),
        "model": identity(cfg.model),
    }


def build(cfg: Config, up: dict, out: Path) -> None:
    """Merge, save and describe the source model in `out` (`up["evaluations"]`: the source's eval summaries)."""
    source = str(up[cfg.export.source])
    full_precision = dataclasses.replace(cfg.lora, quantization="none")  # (a quantized base: its original weights)
    model, tokenizer = models.load_target(source, cfg.model, full_precision)
    model = model.to(getattr(torch, cfg.export.dtype))
    if model.config._attn_implementation.startswith("looper"):
        model.set_attn_implementation("sdpa")
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    (out / "looper_config.yaml").write_text(_config_yaml(cfg))
    base = models.adapter_base(source) if models.is_adapter(source) else source
    (out / "README.md").write_text(model_card(cfg, source, base, up.get("evaluations", [])))
    if cfg.export.quantized != "none":
        _quantized_copy(cfg, out)
    log.info("export: %s merged into %s, written to %s (%s)", source, base, out, cfg.export.dtype)


def _config_yaml(cfg: Config) -> str:
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def model_card(cfg: Config, source: str, base: str, evaluations: list[dict]) -> str:
    """The exported model's README: what it is, what it was built from, and how it scored."""
    rows = [
        f"| {e['dataset']} | {e['n']} | "
        + " | ".join(f"{100 * e[f'acc_{s}']:.1f}%" for s in cfg.eval.scorers if f"acc_{s}" in e)
        + f" | {100 * (e.get('truncated') or 0):.1f}% |"
        for e in evaluations
    ]
    scorers = [s for s in cfg.eval.scorers if evaluations and f"acc_{s}" in evaluations[0]]
    table = (
        "\n".join(
            [
                "| dataset | n | " + " | ".join(f"acc_{s}" for s in scorers) + " | truncated |",
                "| --- | --- | " + " | ".join("---" for _ in scorers) + " | --- |",
                *rows,
            ]
        )
        if evaluations
        else "No evaluation was run for this export."
    )
    return f"""---
library_name: transformers
base_model: {base if not Path(base).exists() else "(a local model)"}
tags: [looper, math-reasoning, {cfg.export.source}]
---

# {cfg.model.name} + looper {cfg.export.source} ({cfg.experiment})

A standalone model: the looper `{cfg.export.source}` artifact merged into its base and saved in {cfg.export.dtype}.
Load it with `AutoModelForCausalLM.from_pretrained` and prompt it as it was trained (`model.prompt_format`:
`{cfg.model.prompt_format}`{", with its chat template" if cfg.model.prompt_format == "chat" else ""}).

- base model: `{base}`
- merged artifact: `{source}`
- reasoning format: `{cfg.model.reasoning}`; adapter trained over a `{cfg.lora.quantization}` base
- the whole looper config: `looper_config.yaml` (experiment `{cfg.experiment}`, seed {cfg.seed})

## Evaluation of the merged artifact

Greedy decoding unless `eval.temperature` says otherwise; prompt `{cfg.eval.prompt}`, limit
{cfg.eval.max_new_tokens or cfg.model.max_new_tokens} new tokens.

{table}

Settings: `{json.dumps({"reward": dataclasses.asdict(cfg.reward), "dpo_beta": cfg.dpo.beta}, default=str)}`
"""


def _quantized_copy(cfg: Config, out: Path) -> None:
    """The exported model loaded through bitsandbytes (8- or 4-bit) and saved again in `out/quantized-<bits>/`."""
    if not torch.cuda.is_available():
        raise RuntimeError("export.quantized needs a CUDA GPU (bitsandbytes quantizes on the GPU); set it to none")
    settings = dataclasses.replace(cfg.lora, enabled=True, quantization=cfg.export.quantized)  # (how to load only)
    exported = dataclasses.replace(cfg.model, name_or_path=str(out))
    model = models.load_causal_lm(str(out), exported, settings)
    target = out / f"quantized-{cfg.export.quantized}"
    model.save_pretrained(str(target))
    models.load_tokenizer(str(out), exported).save_pretrained(str(target))
