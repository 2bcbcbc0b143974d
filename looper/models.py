"""Loading models and tokenizers: bases, adapters, quantized weights and how generation is served.

A *target* is something that can generate: the base model (a hub id, a local directory, or the tiny model built
here), or a stage artifact holding either a full model or a PEFT adapter over a base named in its
`adapter_config.json`.
"""

import importlib.util
import json
import logging
import os
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Optional, Union

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from looper import distributed
from looper.config import Config, GenerationSettings, LoraSettings, ModelConfig
from looper.engine import is_quantized

log = logging.getLogger(__name__)

# The config keys loading reads, as stages declare them (looper/pipeline.py derives identities from them). A trained
# model depends on the prompt format and how its base is loaded, not on the generation limit; what generates also on
# that limit, and on how it is served.
TRAINED_MODEL = ("model", "-model.max_new_tokens")
SERVED_MODEL = ("model",)


def adapter_reads(cfg: Config) -> tuple:
    """The adapter keys a trainer reads: all of `lora`, or only that there is none (full fine-tuning)."""
    return ("lora",) if cfg.lora.enabled else ("lora.enabled",)


def served_reads(cfg: Config) -> tuple:
    """The keys `load_for_generation` and the engine read: the generation settings, the base's quantization and,
    over a quantized base only, how it is served (`generation.dequantize`)."""
    quantized = cfg.lora.quantization != "none"
    return ("generation", *(() if quantized else ("-generation.dequantize",)), "lora.quantization")


# ---------------------------------------------------------------------------------------------------------- devices


def resolve_dtype(name: str) -> torch.dtype:
    """`auto`: bf16 where the GPU supports it, fp16 on other CUDA devices, fp32 on CPU."""
    if name != "auto":
        return getattr(torch, name)
    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def resolve_attention(name: str) -> str:
    """`auto`: flash_attention_2 when flash_attn imports (and CUDA is present), else sdpa."""
    if name != "auto":
        return name
    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def device() -> torch.device:
    """This process's GPU (its local rank's under accelerate; otherwise the one `distributed.claim_gpu` left
    visible), else the CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    if distributed.world_size() > 1:
        from accelerate import PartialState

        return PartialState().device
    return torch.device("cuda", torch.cuda.current_device())


if torch.cuda.is_available():
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


# ---------------------------------------------------------------------------------------------------------- loading


def _revision(path: str, model: ModelConfig) -> Optional[str]:
    """`model.revision` for the configured hub model; None for local directories."""
    return model.revision if path == model.name_or_path and not Path(path).exists() else None


def load_tokenizer(path: str, model: ModelConfig):
    """The tokenizer with a pad token (EOS when it has none) and left padding for batched generation."""
    tokenizer = AutoTokenizer.from_pretrained(
        path, trust_remote_code=model.trust_remote_code, revision=_revision(path, model)
    )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def quantization_config(lora: LoraSettings, dtype: torch.dtype):
    """bitsandbytes settings for `lora.quantization` (NF4 with double quantization for 4bit), or None."""
    if lora.quantization == "none":
        return None
    from transformers import BitsAndBytesConfig

    if lora.quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype
    )


def load_causal_lm(path: str, model: ModelConfig, lora: Optional[LoraSettings] = None):
    """A causal LM with the configured dtype, attention and (for QLoRA) quantized base weights."""
    dtype = resolve_dtype(model.dtype)
    quantization = quantization_config(lora, dtype) if lora is not None else None
    loaded = AutoModelForCausalLM.from_pretrained(
        path,
        dtype=dtype,
        attn_implementation=resolve_attention(model.attn_implementation),
        trust_remote_code=model.trust_remote_code,
        quantization_config=quantization,
        revision=_revision(path, model),
        device_map={"": device()} if quantization is not None else None,
    )
    if quantization is None:
        loaded.to(device())
    return loaded


def is_adapter(path: str) -> bool:
    """Whether `path` is a PEFT adapter directory (rather than a full model or a hub id)."""
    return (Path(path) / "adapter_config.json").is_file()


BASE_IN_CACHE = "looper_base.json"  # beside an adapter whose base is an artifact of its cache: where, relative to it


def adapter_base(path: str) -> str:
    """The base model an adapter directory was trained on: the cache-relative base `portable_adapter` recorded, where
    it exists (a copied or moved cache finds its own), else the `base_model_name_or_path` PEFT wrote."""
    recorded = Path(path) / BASE_IN_CACHE
    if recorded.is_file():
        relative = os.path.normpath(os.path.join(path, json.loads(recorded.read_text())["relative"]))
        if Path(relative).exists():
            return relative
    return json.loads((Path(path) / "adapter_config.json").read_text())["base_model_name_or_path"]


def portable_adapter(adapter_dir: Path, cache_root: Path) -> None:
    """Record, beside the adapter in `adapter_dir`, its base relative to it (`BASE_IN_CACHE`) where the base is an
    artifact of the cache at `cache_root` (an SFT model, the tiny base): a copied or moved cache then uses its own base,
    never the old place's, while `adapter_config.json` keeps the absolute path plain PEFT loads from."""
    config_path = Path(adapter_dir) / "adapter_config.json"
    if not config_path.is_file():
        return
    base = json.loads(config_path.read_text()).get("base_model_name_or_path") or ""
    root = os.path.abspath(cache_root)
    if os.path.isabs(base) and os.path.commonpath([os.path.abspath(base), root]) == root:
        relative = os.path.relpath(os.path.abspath(base), os.path.abspath(adapter_dir))
        (Path(adapter_dir) / BASE_IN_CACHE).write_text(json.dumps({"relative": relative}) + "\n")


@contextmanager
def known_warnings():
    """Around loading adapters and building and training TRL's trainers: silence the one warning raised inside PEFT
    and TRL that no user can act on (they ask through transformers' deprecated alias `is_gradient_checkpointing`:
    peft.peft_model, trl.models.utils), by its exact message; every other warning stays visible."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def _with_adapter(base, path: str, trainable: bool):
    """The PEFT adapter at `path` over `base`, refused where its weights are not finite."""
    from peft import PeftModel

    with known_warnings():
        loaded = PeftModel.from_pretrained(base, path, is_trainable=trainable)
    broken = [n for n, p in loaded.named_parameters() if "lora_" in n and not torch.isfinite(p).all()]
    if broken:
        raise ValueError(
            f"the adapter {path} holds NaN or inf weights ({broken[0]}, {len(broken)} tensors): it "
            "is damaged or came from a diverged training; rebuild it"
        )
    return loaded


def _tokenizer_of(path: str, model: ModelConfig):
    return load_tokenizer(path if (Path(path) / "tokenizer_config.json").exists() else adapter_base(path), model)


def load_target(path: str, model: ModelConfig, lora: Optional[LoraSettings] = None, trainable: bool = False):
    """(model, tokenizer) for a target directory or hub id, as it trains (DPO) or is exported; an adapter is loaded
    over its base (quantized as `lora` says). For inference (`trainable=False`) over full-precision base weights the
    adapter is merged into them; over a quantized base it stays separate. Generation loads through
    `load_for_generation`."""
    if is_adapter(path):
        base = load_causal_lm(adapter_base(path), model, lora)
        loaded = _with_adapter(base, path, trainable)
        if not trainable and not is_quantized(base):
            loaded = loaded.merge_and_unload()
    else:
        loaded = load_causal_lm(path, model, lora)
    if not trainable:
        loaded.eval()
    return loaded, _tokenizer_of(path, model)


# the share of free GPU memory the dequantized weights may take; the rest stays for the KV cache and activations
DEQUANTIZE_SHARE = 0.8


def quantized_layers(model) -> list:
    """The bitsandbytes-quantized linear layers of `model` (inside PEFT's adapter layers too)."""
    try:
        import bitsandbytes as bnb
    except ImportError:  # nothing can be quantized without it
        return []
    return [m for m in model.modules() if isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))]


def _dequantized_bytes(model, dtype: torch.dtype) -> int:
    """Bytes the quantized linear layers of `model` take once dequantized into `dtype`."""
    element = torch.empty((), dtype=dtype).element_size()
    return sum(m.in_features * m.out_features * element for m in quantized_layers(model))


def dequantize_base(model, dtype: torch.dtype) -> bool:
    """Replace a bitsandbytes-quantized model's quantized layers by plain ones holding their dequantized weights in
    `dtype` (transformers' `dequantize`: the values the quantized layers compute with), where they fit in
    `DEQUANTIZE_SHARE` of the free GPU memory; returns whether it did (the log says why not)."""
    needed = _dequantized_bytes(model, dtype)
    free = torch.cuda.mem_get_info(device())[0] if torch.cuda.is_available() else 0
    if needed > DEQUANTIZE_SHARE * free:
        log.warning(
            "generation: the base dequantized into %s needs %.1f GiB, more than %.0f%% of the %.1f GiB free on the "
            "GPU; generating from the quantized model as trained (slower)",
            str(dtype).replace("torch.", ""),
            needed / 2**30,
            100 * DEQUANTIZE_SHARE,
            free / 2**30,
        )
        return False
    model.dequantize(dtype=dtype)
    log.info(
        "generation: quantized base dequantized once into %s (%.1f GiB)",
        str(dtype).replace("torch.", ""),
        needed / 2**30,
    )
    return True


def load_for_generation(path: str, model: ModelConfig, lora: LoraSettings, generation: Union[GenerationSettings, str]):
    """(model, tokenizer) that rollouts, bandit rounds and evaluation generate with: the model as trained. A target
    over a full-precision base is `load_target`'s (an adapter merged). Over a 4- or 8-bit base (`lora.quantization`)
    it is loaded exactly as SFT and DPO train it (the quantized base, the adapter in PEFT's layers for quantized
    bases); then, where `dequantizes(lora, generation.dequantize)` says so (`generation`: the settings, or that key's
    value) and the copy fits in GPU memory, every quantized layer
    is replaced by a plain one holding its dequantized weights: decoding runs bf16 kernels and CUDA graphs, and the
    adapter, unmerged, computes as in training. (Merging it into the dequantized weights decodes faster but rounds
    differently, and changed most greedy outputs: docs/performance.md.)"""
    if lora.quantization == "none":
        return load_target(path, model)
    dequantize = generation if isinstance(generation, str) else generation.dequantize  # (read only when quantized)
    loaded = load_causal_lm(adapter_base(path) if is_adapter(path) else path, model, lora)
    if is_adapter(path):
        loaded = _with_adapter(loaded, path, trainable=False)
    if dequantizes(lora, dequantize):
        dequantize_base(getattr(loaded, "get_base_model", lambda: loaded)(), resolve_dtype(model.dtype))
    else:
        log.info(
            "generation: the %s base is served quantized, as trained (generation.dequantize=%s)",
            lora.quantization,
            dequantize,
        )
    loaded.eval()
    return loaded, _tokenizer_of(path, model)


def dequantizes(lora: LoraSettings, setting: str) -> bool:
    """Whether generation dequantizes the base (`generation.dequantize`): `always`, never for `never`, and for
    `auto` where the dequantized layers compute what the quantized ones do: 4-bit (bitsandbytes dequantizes its
    weights and runs a matmul in the compute dtype), not 8-bit (LLM.int8 quantizes the activations as well)."""
    if lora.quantization == "none" or setting == "never":
        return False
    return setting == "always" or lora.quantization == "4bit"
