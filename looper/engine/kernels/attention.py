"""The attention function looper gives models (a transformers `AttentionInterface` entry), for packed sequences and
for decode steps over the paged KV cache, with the kernel chosen once per shape:

- packed sequences (a generation prefill, a padding-free SFT batch): rows concatenated into one without padding,
  `starts` marking where each begins (cumulative lengths); each attends causally within itself. On a GPU this is
  PyTorch's built-in FlashAttention-2 in its variable-length form (differentiable: SFT trains through it), so no
  mask is built and no per-shape cuDNN plan is made; elsewhere, sdpa one sequence at a time.
- the rest of prompts whose first tokens (a prefix shared with other prompts) are already in the KV cache: each
  attends to its slot's entries up to its own position (gathered from the cache's pages), FlashAttention-2 varlen on
  a GPU.
- a decode step (`DecodeStep`): one query per slot, each reading only its own KV length from the paged cache (flat
  buffers [pages * page, kv_heads, head_dim], a slot's positions found through its row of the page table): the
  Triton kernel of `triton_decode` on a GPU (else FlashAttention varlen over the rows gathered), and masked sdpa over
  the longest history elsewhere.

Anything else (a padded batch with a mask) goes to transformers' sdpa attention unchanged.
"""

import functools
import logging
from dataclasses import dataclass, field
from typing import Optional

import torch

from looper.engine.cache import head_dim, on

log = logging.getLogger(__name__)

GENERATION = "looper_slots"  # the implementation generation switches a model to (no mask is ever built for it)
TRAINING = "looper_varlen"  # the implementation padding-free SFT uses (transformers builds sdpa masks for it)


def _sdpa(module, query, key, value, mask, scaling, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, mask, scaling=scaling, **kwargs)


def packed_attention(
    module, query, key, value, starts: torch.Tensor, max_length: int, scaling: float, kernel: str, dropout: float = 0.0
):
    """query/key/value [1, heads, tokens, head_dim] of sequences packed back to back, sequence i at positions
    starts[i]:starts[i + 1] (int32, on the device); causal within each sequence. Returns [1, tokens, heads, dim]."""
    if kernel == "flash":
        output = torch.ops.aten._flash_attention_forward(
            query[0].transpose(0, 1),
            key[0].transpose(0, 1),
            value[0].transpose(0, 1),
            starts,
            starts,
            max_length,
            max_length,
            dropout,
            True,
            False,
            scale=scaling,
        )[0]
        return output.unsqueeze(0), None
    bounds = starts.tolist()
    pieces = [
        _sdpa(
            module, query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], None, scaling, dropout=dropout, is_causal=True
        )[0]
        for a, b in zip(bounds[:-1], bounds[1:])
        if b > a
    ]
    return torch.cat(pieces, dim=1), None


def gather_rows(buffer: torch.Tensor, table: torch.Tensor, page: int, width: int) -> torch.Tensor:
    """The first `width` positions (a multiple of `page`) of each slot of a paged buffer [pages * page, kv_heads,
    head_dim], via the page table [slots, pages per slot]: [slots, width, kv_heads, head_dim]."""
    index = table[:, : width // page, None].long() * page + torch.arange(page, device=table.device)
    return buffer[index.view(table.shape[0], width)]


@dataclass
class DecodeStep:
    """A decode step's attention arguments: each slot's KV length after this step's write, its page table, the
    kernel, (sdpa, flash) how many positions of every slot to attend over, and the `storage`
    (`cache.KVStorage`) with the buffer entry each slot's new key and value go to (`write_index`)."""

    kernel: str
    lengths: torch.Tensor  # [slots], int32
    width: int  # a multiple of `page`
    table: torch.Tensor  # [slots, pages per slot], int32: page j of slot s holds its positions j * page...
    page: int
    storage: Optional[object] = None
    write_index: Optional[torch.Tensor] = None  # [slots]

    def attend(self, module, query, keys, values, scaling):
        """query [slots, heads, 1, head_dim]; keys/values [pages * page, kv_heads, head_dim]."""
        slots, dim = query.shape[0], query.shape[-1]
        if self.kernel == "triton":
            from looper.engine.kernels.triton_decode import decode_attention

            output = decode_attention(
                query.transpose(1, 2).reshape(slots, -1, dim),
                keys,
                values,
                self.lengths,
                self.table,
                self.page,
                scaling,
            )
            return output.view(slots, 1, -1, dim), None
        keys, values = (gather_rows(buffer, self.table, self.page, self.width) for buffer in (keys, values))
        if self.kernel == "flash":  # all slots as one packed key sequence, slot s from s * width, seqused_k
            kv_heads = keys.shape[2]
            starts = torch.arange(slots + 1, dtype=torch.int32, device=query.device)
            output = torch.ops.aten._flash_attention_forward(
                query.transpose(1, 2).reshape(slots, -1, dim),
                keys.view(-1, kv_heads, dim),
                values.view(-1, kv_heads, dim),
                starts,
                starts * self.width,
                1,
                self.width,
                0.0,
                False,
                False,
                scale=scaling,
                seqused_k=self.lengths,
            )[0]
            return output.view(slots, 1, -1, dim), None
        mask = torch.arange(self.width, device=query.device)[None, :] < self.lengths[:, None]
        return _sdpa(module, query, keys.transpose(1, 2), values.transpose(1, 2), mask[:, None, None, :], scaling)


@dataclass
class Packed:
    """A generation prefill's attention arguments: the prompts packed into one row (see `packed_attention`); with
    `history`, the rest of prompts whose first entries are already in the KV cache (see `prefix_attention`); the
    `storage` (`cache.KVStorage`) and the buffer entries the packed tokens' keys and values go to (`entries`; the
    packed token each copies is `sources`, None where that is each token once, in order)."""

    kernel: str
    starts: torch.Tensor
    max_length: int
    history: Optional[torch.Tensor] = None  # the cache positions each sequence attends to, back to back
    key_lengths: Optional[list] = None  # per sequence: how many (its prefix and its own)
    storage: Optional[object] = None
    entries: Optional[torch.Tensor] = None
    sources: Optional[torch.Tensor] = None
    key_starts: Optional[torch.Tensor] = field(init=False, default=None)  # cumulative key_lengths, int32, on device

    def __post_init__(self):
        # once a prefill, not once a layer, and without waiting: a copy from pageable memory would wait for the
        # GPU's queued work in every layer, and the GPU would then wait for the host's next launches
        if self.key_lengths is not None:
            self.key_starts = on(self.starts.device, torch.tensor([0, *self.key_lengths]).cumsum(0), torch.int32)


def prefix_attention(module, query, keys, values, packed: Packed, scaling: float):
    """Queries [1, heads, tokens, head_dim] of sequences packed back to back (`packed.starts`), each the end of a
    sequence whose entries, its earlier ones and its own (written before this call), are at the `key_lengths[i]`
    positions of the cache buffers [positions, kv_heads, head_dim] that `packed.history` lists for it, in order:
    query t of sequence i sees those entries up to its own position (causal, aligned at the end).
    Returns [1, tokens, heads, head_dim]."""
    keys, values = keys[packed.history], values[packed.history]  # each sequence's entries, back to back
    if packed.kernel == "flash":
        output = torch.ops.aten._flash_attention_forward(
            query[0].transpose(0, 1),
            keys,
            values,
            packed.starts,
            packed.key_starts,
            packed.max_length,
            max(packed.key_lengths),
            0.0,
            True,
            False,
            scale=scaling,
        )[0]
        return output.unsqueeze(0), None
    bounds, pieces, first = packed.starts.tolist(), [], 0
    for n, a, b in zip(packed.key_lengths, bounds[:-1], bounds[1:]):
        visible = torch.ones(b - a, n, dtype=torch.bool, device=query.device).tril(n - (b - a))
        pieces.append(
            _sdpa(
                module,
                query[:, :, a:b],
                keys[first : first + n].transpose(0, 1)[None],
                values[first : first + n].transpose(0, 1)[None],
                visible[None, None],
                scaling,
            )[0]
        )
        first += n
    return torch.cat(pieces, dim=1), None


def looper_attention(
    module,
    query,
    key,
    value,
    attention_mask,
    scaling=None,
    dropout=0.0,
    looper_decode: Optional[DecodeStep] = None,
    looper_packed: Optional[Packed] = None,
    **kwargs,
):
    """The registered attention function (signature of transformers' attention interface). In generation it first
    writes the forward's new keys and values to the paged cache, where its arguments say."""
    if looper_decode is not None:
        step = looper_decode
        if step.storage is not None:
            key, value = step.storage.write(module.layer_idx, key[:, :, 0], value[:, :, 0], step.write_index)
        return step.attend(module, query, key, value, scaling)
    if looper_packed is not None and looper_packed.storage is not None:
        new_keys, new_values = key[0].transpose(0, 1), value[0].transpose(0, 1)
        if looper_packed.sources is not None:  # (a piece written to several slots, or part of one)
            new_keys, new_values = new_keys[looper_packed.sources], new_values[looper_packed.sources]
        buffers = looper_packed.storage.write(module.layer_idx, new_keys, new_values, looper_packed.entries)
        if looper_packed.history is not None:
            key, value = buffers
    if looper_packed is not None and looper_packed.history is not None:
        return prefix_attention(module, query, key, value, looper_packed, scaling)
    if looper_packed is not None:
        return packed_attention(
            module, query, key, value, looper_packed.starts, looper_packed.max_length, scaling, looper_packed.kernel
        )
    starts = kwargs.get("cu_seq_lens_q")  # a padding-free training batch (TRL's collator gives these)
    if starts is not None and query.shape[0] == 1:
        kernel = packed_kernel(query.device, query.dtype, *layer_shape(module, query, key))
        if kernel == "flash":
            starts = starts.to(query.device, torch.int32)
            longest = kwargs.get("max_length_q") or int(starts.diff().max())
            return packed_attention(
                module, query, key, value, starts, int(longest), scaling, kernel, dropout if module.training else 0.0
            )
    return _sdpa(module, query, key, value, attention_mask, scaling, dropout=dropout, **kwargs)


def register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(GENERATION, looper_attention)
    AttentionInterface.register(TRAINING, looper_attention)
    AttentionMaskInterface.register(TRAINING, sdpa_mask)


def layer_shape(module, query: torch.Tensor, key: torch.Tensor) -> tuple[int, int, int]:
    """(heads, KV heads, head size) of an attention layer: from its config where it has one, so they stay Python
    ints where torch.compile traces the tensors' shapes symbolically (a compiled layer under Liger's kernels), else
    from the query [1, heads, tokens, dim] and key."""
    config = getattr(module, "config", None)
    if config is None:
        return query.shape[1], key.shape[1], query.shape[3]
    text = config.get_text_config()
    kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    return text.num_attention_heads, kv_heads, head_dim(module)


@functools.lru_cache(maxsize=None)
def kernels(device: torch.device, dtype: torch.dtype, heads: int, kv_heads: int, head_dim: int) -> tuple[str, str]:
    """(packed kernel, decode kernel) for these shapes here: each the fastest that runs and gives sdpa's result on a
    small case. Packed: `flash` or `sdpa`; decode: `triton`, `flash` or `sdpa` (always: CPU, float32, old GPUs)."""
    if (
        device.type != "cuda"
        or dtype not in (torch.float16, torch.bfloat16)
        or head_dim % 8
        or head_dim > 256
        or torch.cuda.get_device_capability(device) < (8, 0)
    ):
        return "sdpa", "sdpa"
    flash = ["flash"] if torch.backends.cuda.is_flash_attention_available() else []
    generator = torch.Generator(device=device).manual_seed(0)
    module = type("Module", (), {"num_key_value_groups": heads // kv_heads, "is_causal": True})()

    def randn(*shape):
        return torch.randn(*shape, device=device, dtype=dtype, generator=generator)

    def first(candidates, run, what):
        expected = run("sdpa").float()
        for kernel in candidates:
            try:
                error = (run(kernel).float() - expected).abs().max().item()
            except Exception as exception:  # an older torch, no Triton: the next kernel
                log.warning("attention: %s %s unavailable here (%s)", kernel, what, exception)
                continue
            if error < 2e-2:
                return kernel
            log.warning("attention: %s %s differs from sdpa by %.3g here; not used", kernel, what, error)
        return "sdpa"

    # three slots of 192 positions in pages of 16, the pages shuffled
    query, keys, values = randn(3, heads, 1, head_dim), randn(576, kv_heads, head_dim), randn(576, kv_heads, head_dim)
    table = torch.randperm(36, device=device, generator=generator).view(3, 12).to(torch.int32)
    lengths = torch.tensor([1, 77, 192], dtype=torch.int32, device=device)
    decode = first(
        (["triton"] if head_dim & (head_dim - 1) == 0 else []) + flash,  # Triton tiles: a power of two
        lambda k: DecodeStep(k, lengths, 192, table, 16).attend(module, query, keys, values, head_dim**-0.5)[0],
        "decoding",
    )
    starts = torch.tensor([0, 1, 70, 200], dtype=torch.int32, device=device)
    q, k, v = randn(1, heads, 200, head_dim), randn(1, kv_heads, 200, head_dim), randn(1, kv_heads, 200, head_dim)
    packed = first(
        flash,
        lambda kernel: packed_attention(module, q, k, v, starts, 130, head_dim**-0.5, kernel)[0],
        "packed attention",
    )
    return packed, decode


@torch.compiler.assume_constant_result
def packed_kernel(device: torch.device, dtype: torch.dtype, heads: int, kv_heads: int, head_dim: int) -> str:
    """The packed kernel of `kernels`, a constant to torch.compile (compiled decoder layers: `sft/dpo.compile`)."""
    return kernels(device, dtype, heads, kv_heads, head_dim)[0]


@functools.lru_cache(maxsize=None)
def prefix_kernel(device: torch.device, dtype: torch.dtype, heads: int, kv_heads: int, head_dim: int) -> str:
    """The kernel of `prefix_attention` for these shapes here: `flash` where the packed kernel is flash and it gives
    the sdpa path's result on a small case, else `sdpa`."""
    if kernels(device, dtype, heads, kv_heads, head_dim)[0] != "flash":
        return "sdpa"
    generator = torch.Generator(device=device).manual_seed(1)
    module = type("Module", (), {"num_key_value_groups": heads // kv_heads, "is_causal": True})()
    keys, values = (
        torch.randn(1024, kv_heads, head_dim, device=device, dtype=dtype, generator=generator) for _ in range(2)
    )
    query = torch.randn(1, heads, 90, head_dim, device=device, dtype=dtype, generator=generator)
    starts = torch.tensor([0, 1, 60, 90], dtype=torch.int32, device=device)
    history = torch.cat([torch.arange(n) + first for first, n in ((0, 1), (512, 200), (512, 31))]).to(device)
    run = lambda kernel: prefix_attention(
        module,
        query,
        keys,
        values,
        Packed(kernel, starts, 59, history, [1, 200, 31]),
        head_dim**-0.5,
    )[0]
    try:
        error = (run("flash").float() - run("sdpa").float()).abs().max().item()
    except Exception as exception:  # an older torch: sdpa
        log.warning("attention: flash unavailable for prompts after a shared prefix (%s)", exception)
        return "sdpa"
    if error < 2e-2:
        return "flash"
    log.warning("attention: flash differs from sdpa by %.3g after a shared prefix here; not used", error)
    return "sdpa"
