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
import yaml

from looper import engine, models
from looper.config import Config

log = logging.getLogger(__name__)


def NEEDS(cfg: Config) -> tuple:
    """The artifact this stage exports (looper/pipeline.py resolves it)."""
    return (cfg.export.source,)


ENSURE: dict = {}

READS = ("export", "model", "eval.scorers")  # the config it reads (the model card lists the eval.scorers)


def build(cfg: Config, up: dict, out: Path) -> None:
    """Merge, save and describe the source model in `out` (`up["evaluations"]`: the source's eval artifacts)."""
    source = str(up[cfg.export.source])
    model, tokenizer = models.load_target(source, cfg.model)  # (a quantized base: its original weights)
    model = model.to(getattr(torch, cfg.export.dtype))
    engine.restore_attention(model)
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    evaluations = [Path(e) for e in up.get("evaluations", [])]
    settings = lineage(Path(source)) | ({"eval": _reads(evaluations[0])} if evaluations else {})
    (out / "looper_config.yaml").write_text(yaml.safe_dump(settings, sort_keys=False))
    base = models.adapter_base(source) if models.is_adapter(source) else source
    summaries = [json.loads((e / "summary.json").read_text()) for e in evaluations]
    (out / "README.md").write_text(model_card(cfg, source, base, summaries))
    if cfg.export.quantized != "none":
        _quantized_copy(cfg, out)
    log.info("export: %s merged into %s, written to %s (%s)", source, base, out, cfg.export.dtype)


def _reads(artifact: Path) -> dict:
    return json.loads((artifact / "spec.json").read_text()).get("reads", {})


def lineage(artifact: Path) -> dict:
    """{stage: the config keys it read} for a cached artifact and every artifact upstream of it, upstream first, from
    their `spec.json` files (looper/pipeline.py writes what each read): the settings that made the model."""
    root, out = artifact.parent.parent, {}

    def walk(directory: Path) -> None:
        for need in json.loads((directory / "spec.json").read_text()).get("needs", {}).values():
            if isinstance(need, str) and (root / need / "spec.json").is_file():
                walk(root / need)
        out[directory.parent.name] = _reads(directory)

    if (artifact / "spec.json").is_file():
        walk(artifact)
    return out


def model_card(cfg: Config, source: str, base: str, evaluations: list[dict]) -> str:
    """The exported model's README: what it is, what it was built from, and how it scored."""
    scorers = [s for s in cfg.eval.scorers if evaluations and f"acc_{s}" in evaluations[0]]
    rows = [
        f"| {e['dataset']} | {e['n']} | "
        + " | ".join(f"{100 * e[f'acc_{s}']:.1f}%" for s in scorers)
        + f" | {100 * (e.get('truncated') or 0):.1f}% |"
        for e in evaluations
    ]
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

# {Path(base).name} + looper {cfg.export.source}

A standalone model: the looper `{cfg.export.source}` artifact merged into its base and saved in {cfg.export.dtype}.
Load it with `AutoModelForCausalLM.from_pretrained` and prompt it as it was trained (`model.prompt_format`:
`{cfg.model.prompt_format}`{", with its chat template" if cfg.model.prompt_format == "chat" else ""}).

- base model: `{base}`
- merged artifact: `{source}`
- reasoning format: `{cfg.model.reasoning}`
- the settings that made it, stage by stage (what each read), and those of its evaluation: `looper_config.yaml`

## Evaluation of the merged artifact

{table}
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
