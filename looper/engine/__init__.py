"""Generation for rollouts and evaluation: one interface, backends behind it.

Rollout and eval build one `Generator` per model with `build(settings, model, tokenizer, batch_size)` and call only
its `generate(requests)`. `generation.backend` picks the backend:

- `paged`: looper's engine (`paged.py`: `scheduler`, `cache`, `runner`, `sampling`, `kernels/`), fast and seeded per
  row, for decoder-only models whose attention goes through transformers' attention interface;
- `hf`: plain transformers `generate` (`hf.py`), the reference and the fallback for any other model;
- `auto` (the default): `paged` where `paged_refusal` finds nothing against it, else `hf`; the log says which and why.

A third backend (vLLM, SGLang on a user's cluster) is one module with a `Generator` subclass (`interface.py` states the
contract) and one `register(name, factory)` call; nothing in rollout or eval changes. Layers, top down: this module,
the backends, `scheduler` / `runner` / `cache` / `sampling`, `kernels/`; none imports a stage.
"""

import logging
from typing import Callable, Optional

from looper.engine.interface import Generation, GenerationStats, Generator, Request, is_quantized
from looper.engine.packing import pack_backbone

log = logging.getLogger(__name__)

__all__ = [
    "Generation",
    "GenerationStats",
    "Generator",
    "Request",
    "is_quantized",
    "build",
    "attend_padding_free",
    "pack_backbone",
    "restore_attention",
    "register",
    "BACKENDS",
]


def _paged(*args, **kwargs) -> Generator:
    from looper.engine.paged import PagedGenerator

    return PagedGenerator(*args, **kwargs)


def _hf(*args, **kwargs) -> Generator:
    from looper.engine.hf import HFGenerator

    return HFGenerator(*args, **kwargs)


BACKENDS: dict[str, Callable[..., Generator]] = {"paged": _paged, "hf": _hf}


def register(name: str, factory: Callable[..., Generator]) -> None:
    """Make `factory(model, tokenizer, batch_size, refill_at=..., compile_decode=...)` the backend `name`
    (`generation.backend=<name>`)."""
    BACKENDS[name] = factory


def paged_refusal(model) -> Optional[str]:
    """Why the paged engine cannot serve `model` (None: it can). It needs a decoder-only model that attends through
    transformers' attention interface (looper registers its own attention there) and whose config names its heads and
    layers (to size the KV cache)."""
    if getattr(model.config, "is_encoder_decoder", False):
        return f"{type(model).__name__} is an encoder-decoder model"
    base = getattr(model, "get_base_model", lambda: model)()  # (a PEFT model: the model it wraps)
    if not getattr(type(base), "_supports_attention_backend", False):
        return f"{type(base).__name__} does not attend through transformers' attention interface"
    text = model.config.get_text_config()
    missing = [key for key in ("num_attention_heads", "num_hidden_layers", "hidden_size") if not getattr(text, key, 0)]
    if missing:
        return f"its config has no {', '.join(missing)}"
    return None


def build(settings, model, tokenizer, batch_size: int) -> Generator:
    """The `settings.backend` generator (`settings`: `cfg.generation`) for `model`, decoding `batch_size` rows at a
    time."""
    name = settings.backend
    if name == "auto":
        refusal = paged_refusal(model)
        name = "paged" if refusal is None else "hf"
        if refusal is not None:
            log.warning("generation.backend=auto: hf, since the paged engine cannot serve this model (%s)", refusal)
        else:
            log.info("generation.backend=auto: paged (%s passes its start-up checks)", type(model).__name__)
    if name not in BACKENDS:
        raise ValueError(f"generation.backend: got {name!r}; allowed: auto, {', '.join(BACKENDS)}")
    return BACKENDS[name](model, tokenizer, batch_size, refill_at=settings.refill_at, compile_decode=settings.compile)


def attend_padding_free(model) -> None:
    """Route `model`'s attention through looper's function for padding-free training: FlashAttention-2 varlen over
    TRL's cu_seq_lens on a GPU (no block-diagonal mask, no per-shape plan), transformers' sdpa with its packed mask
    elsewhere (`kernels/attention.py`)."""
    from looper.engine.kernels import attention

    attention.register()
    model.set_attn_implementation(attention.TRAINING)


def restore_attention(model) -> None:
    """Give a model that attends through one of looper's functions transformers' sdpa back, so what is saved names
    an implementation every install has."""
    if model.config._attn_implementation.startswith("looper"):
        model.set_attn_implementation("sdpa")
