"""The one generation path, shared by rollouts and evaluation.

Decoding runs on `slots` rows at once with continuous refill: when rows finish (EOS or their own token limit), the
freed slots are refilled with the next prompts, so a finished row stops costing decode steps. The KV cache is paged
(`PagedCache`): a row holds pages of 16 positions as it grows, not its worst case, so on a GPU `slots` rows decode
together where their real lengths fit in free memory even when their worst cases (longest prompt plus
`max_new_tokens`) would not. A prefill starts rows while their pages are free; where a step finds too few, the
newest row is preempted and resumes later from the tokens it had produced, with the same draws. A decode step reads
each row's own history only (on a GPU a Triton kernel that follows the page table, see `looper.attention`;
elsewhere masked sdpa over the longest live history) and is replayed as a CUDA graph on a GPU; its tokens are read
on the host while the next step runs. A prefill packs its prompts into one row without padding (FlashAttention-2
varlen on a GPU); identical prompts (samples of one prompt) are computed once and their full pages serve all their
slots, and so are the first tokens that prompts of one prefill share (an arm's system prompt, few-shot examples, a
trajectory cut at several points): the rest of each prompt then attends to them in the cache. Prompts are taken in
token order, so those that begin alike are prefilled together. In eager forwards on a GPU (prefills; decode steps
unless compiled) the model's RMSNorms run as one Triton kernel each (`looper.triton_norm`), and in bfloat16 so does
its rotary embedding (`looper.triton_rotary`), which also leaves q and k token-major, the layout of the cache and of
FlashAttention's packed input. When no prompts are left and half the slots are idle, the live rows move into half
the slots (down to 8: their page-table rows move, not their entries). With `compile_decode`, the decode step's model
forward runs through torch.compile, and so do the prefills' MLPs. Results come back in input order; `on_result`
sees each as it finishes. Counts are of real tokens: generated tokens up to and including EOS, never padding.

Sampling is seeded per row (`seeded_choice`; on a GPU one Triton kernel, `looper.triton_sampling`): a row's draws
depend on its own seed and step only, never on which rows share its batch, their order, padding, the batch size or
the number of processes. So a resumed or sharded rollout produces exactly the records of an uninterrupted
single-process one. Greedy decoding equals plain `model.generate` in float32 (tests/test_generation.py on CPU;
`scripts/bench_gpu.py --check-greedy` and `scripts/greedy_check.py` on a GPU); in bfloat16 the fast kernels'
different summation order flips a few near-tied argmaxes, about as often as batching plain `generate` does.
"""

import functools
import logging
import math
import sys
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import torch
from tqdm.auto import tqdm

from looper import attention, models

log = logging.getLogger(__name__)

_MASK32 = 0xFFFFFFFF
_MIN_SLOTS = 8  # the drain stops halving the slots here (below it a step costs about the same: the weights' read)
_WIDTH_STEP = 64  # attention width is rounded up to a multiple of this (fewer shapes, so fewer CUDA graphs)


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mix (xorshift-multiply) on int64 tensors; constants < 2^31 keep products below 2^63, so the
    result is exact and identical on every device."""
    x = x & _MASK32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x2C1B3C6D) & _MASK32
    return x ^ (x >> 16)


def seeded_choice(logits: torch.Tensor, seeds: torch.Tensor, steps: torch.Tensor, temperatures: torch.Tensor,
                  top_ps: torch.Tensor, sampling: bool = True, nucleus: bool = True) -> torch.Tensor:
    """One token per row: a sample from the temperature- and top-p-filtered distribution, by Gumbel-max with noise
    that is a hash of (row seed, row step, token id); the argmax where a row's temperature is 0 (greedy).
    `sampling=False` (no row samples) and `nucleus=False` (no row has top_p < 1) only skip work; a row's choice never
    depends on them or on any other row."""
    if not sampling:
        return logits.argmax(dim=-1)
    row = _hash32(_hash32(seeds) ^ steps)
    if _triton_sampler(logits.device):
        from looper import triton_sampling

        return triton_sampling.seeded_choice(logits, row, temperatures, top_ps, nucleus)
    return _torch_choice(logits, row, temperatures, top_ps, nucleus)


def _torch_choice(logits, row, temperatures, top_ps, nucleus):
    """`seeded_choice` in PyTorch (`row`: each row's noise key): the reference, and the path off CUDA."""
    greedy = temperatures <= 0
    logits = logits.float() / torch.where(greedy, 1.0, temperatures)[:, None]
    if nucleus:
        ordered, order = logits.sort(dim=-1, descending=True)
        probs = ordered.softmax(dim=-1)
        # the top token always stays; a row with top_p >= 1 keeps everything
        drop_sorted = (probs.cumsum(dim=-1) - probs > top_ps[:, None]) & (top_ps < 1)[:, None]
        logits = logits.masked_fill(torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted), float("-inf"))
    tokens = torch.arange(logits.shape[-1], device=logits.device, dtype=torch.int64)
    bits = _hash32(row[:, None] + tokens[None, :] * 0x9E3779B1) >> 8  # 24 bits: exact in float32
    gumbel = -torch.log(-torch.log((bits.float() + 0.5) / 2.0 ** 24))  # uniform strictly inside (0, 1)
    return torch.where(greedy[:, None], logits, logits + gumbel).argmax(dim=-1)


@functools.lru_cache(maxsize=None)
def _triton_sampler(device: torch.device) -> bool:
    """Whether `seeded_choice` runs as `looper.triton_sampling`'s kernel here: on CUDA, when the kernel compiles and
    picks what the PyTorch path picks on a test case (all greedy rows; sampled rows but a few at rounding ties)."""
    if device.type != "cuda":
        return False
    generator = torch.Generator(device=device).manual_seed(0)
    rows, vocab = 64, 32000
    logits = (3 * torch.randn(rows, vocab, device=device, generator=generator)).to(torch.bfloat16)
    temperatures = torch.tensor([0.0, 0.6, 1.0, 1.3] * (rows // 4), device=device)
    top_ps = torch.tensor([0.95, 1.0, 0.9, 0.5] * (rows // 4), device=device)
    keys = _hash32(torch.arange(rows, device=device) * 7919)
    try:
        from looper import triton_sampling

        got = triton_sampling.seeded_choice(logits, keys, temperatures, top_ps, nucleus=True)
    except Exception as error:  # noqa: BLE001 - no Triton, an old GPU: sample with PyTorch
        log.warning("generation: Triton sampling unavailable here (%s); sampling with PyTorch", error)
        return False
    same = got == _torch_choice(logits, keys, temperatures, top_ps, nucleus=True)
    if bool(same[temperatures <= 0].all()) and int(same.sum()) >= rows - 2:
        return True
    log.warning("generation: Triton sampling agrees with PyTorch on %d of %d rows here; not used", int(same.sum()), rows)
    return False


@dataclass
class Generation:
    text: str  # decoded completion, special tokens removed
    num_tokens: int  # generated tokens up to and including EOS
    finish_reason: str  # "stop" (EOS) or "length" (hit max_new_tokens)


PAGE = 16  # positions per page of the KV cache


class PagedCache:
    """The KV cache of `slots` rows in pages of `PAGE` positions, handed out as rows grow: per layer one buffer of
    keys and one of values, [pages * PAGE, kv_heads, head_dim] (token-major, the layout of FlashAttention's packed
    input). Position t of slot s is entry `table[s, t // PAGE] * PAGE + t % PAGE`. Page 0 is scratch: the table rows
    of free slots point there, so their throwaway decode writes touch no row's entries. Pages are handed out and
    taken back on the host (`grow`, `share`, `release`); the table on the device follows at `flush`. A full page of a
    prompt's first entries may serve several slots (samples of one prompt, prompts after one shared prefix): a full
    page is never written again.

    The model sees it as a transformers `Cache` (it calls `update` once per layer). In a prefill (prompts packed into
    one row) each prompt token's key and value are stored at `prefill_index` and attention runs over the prefill
    alone, or, after a shared prefix (`prefill_reads_cache`), over the cache; in a decode step each row's new entry
    is stored at `write_index` and attention (`looper.attention.DecodeStep`) gets the whole buffers."""

    def __init__(self, num_layers: int, slots: int, pages: int, pages_per_slot: int, device: torch.device):
        self.keys: list = [None] * num_layers
        self.values: list = [None] * num_layers
        self.slots, self.pages = slots, pages
        self.table = torch.zeros(slots, pages_per_slot, dtype=torch.int32, device=device)
        self.owned: list[list[int]] = [[] for _ in range(slots)]  # each slot's pages, in position order
        self.users = [0] * pages  # slots holding each page
        self.free = list(range(pages - 1, 0, -1))  # (popped from the end: low pages first)
        self.changes: dict = {}  # (slot, column) -> page, not yet in `table`
        self.shared = 0  # positions slots read from pages another slot also holds (once per extra holder)
        self.prefill_index: Optional[torch.Tensor] = None  # a prefill: the entry each packed token's KV goes to
        self.prefill_sources: Optional[torch.Tensor] = None  # and the packed token each copies (None: in order)
        self.prefill_reads_cache = False  # whether the prefill's attention reads the cache (a shared prefix)
        self.write_index: Optional[torch.Tensor] = None  # a decode step: the entry each slot writes

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0  # positions are always passed explicitly

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        if self.keys[layer_idx] is None:
            shape = (self.pages * PAGE, key.shape[1], key.shape[3])
            self.keys[layer_idx] = key.new_zeros(shape)
            self.values[layer_idx] = value.new_zeros(shape)
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        if self.prefill_index is not None:
            new_keys, new_values = key[0].transpose(0, 1), value[0].transpose(0, 1)
            if self.prefill_sources is not None:
                new_keys, new_values = new_keys[self.prefill_sources], new_values[self.prefill_sources]
            keys.index_copy_(0, self.prefill_index, new_keys)
            values.index_copy_(0, self.prefill_index, new_values)
            return (keys, values) if self.prefill_reads_cache else (key, value)
        # (indexed assignment on the buffers themselves: compiled, index_copy_ on a view of them made a step take
        # 100 ms instead of 17 on an H100, as if each layer's whole buffer were copied back)
        keys[self.write_index] = key[:, :, 0]
        values[self.write_index] = value[:, :, 0]
        return keys, values

    def grow(self, slot: int, count: int) -> None:
        """`count` more pages for `slot` (the caller has checked that `free` holds them)."""
        for _ in range(count):
            page = self.free.pop()
            self.users[page] = 1
            self.changes[slot, len(self.owned[slot])] = page
            self.owned[slot].append(page)

    def share(self, slot: int, source: int, count: int) -> None:
        """The first `count` pages of `source` (full ones) become the first pages of `slot`, which holds none."""
        for page in self.owned[source][:count]:
            self.users[page] += 1
            self.shared += PAGE
            self.changes[slot, len(self.owned[slot])] = page
            self.owned[slot].append(page)

    def release(self, slot: int) -> None:
        """`slot` gives its pages back (a page goes back to `free` when no slot holds it) and points at scratch."""
        for column, page in enumerate(self.owned[slot]):
            self.users[page] -= 1
            if self.users[page]:
                self.shared -= PAGE
            else:
                self.free.append(page)
            self.changes[slot, column] = 0
        self.owned[slot] = []

    def flush(self) -> None:
        """Write the page changes to the device's table (one transfer)."""
        if self.changes:
            (slots, columns), pages = zip(*self.changes), list(self.changes.values())
            update = _on(self.table.device, [slots, columns, pages])
            self.table[update[0], update[1]] = update[2].to(torch.int32)
            self.changes = {}

    def entries(self, slot: int, first: int, end: int) -> torch.Tensor:
        """The buffer entries (on the host) of positions first..end-1 of `slot` (within its pages)."""
        positions = torch.arange(first, end)
        return torch.tensor(self.owned[slot], dtype=torch.long)[positions // PAGE] * PAGE + positions % PAGE

    def keep(self, slots: list[int]) -> None:
        """Keep only `slots` (in that order; the others hold no pages): the table shrinks to len(slots) rows."""
        self.flush()
        self.table = self.table[torch.tensor(slots, device=self.table.device)]
        self.owned = [self.owned[s] for s in slots]
        self.slots = len(slots)


def _common_prefix(a: list, b: list) -> int:
    return next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def _shared_prefixes(prompts: list[list[int]], minimum: int) -> list[tuple[int, int, int]]:
    """Runs of neighbouring prompts (the queue is in token order, so prompts that begin alike are neighbours) that
    begin with the same `minimum` or more tokens, as (first, end, length): prompts[first:end] share their first
    `length` tokens, and each keeps at least one token of its own. A run grows while that saves more tokens
    ((members - 1) * length): an arm's system prompt, few-shot examples, a trajectory cut at several points."""
    groups, first = [], 0
    while first < len(prompts):
        end, length = first + 1, len(prompts[first]) - 1
        while end < len(prompts):
            common = min(length, _common_prefix(prompts[first], prompts[end]), len(prompts[end]) - 1)
            if common < minimum or (end - first) * common < (end - first - 1) * length:
                break
            end, length = end + 1, common
        if end - first > 1:
            groups.append((first, end, length))
        first = end
    return groups


def _per_row(value: Union[float, Sequence[float]], n: int) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value] * n


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], *, max_new_tokens: Union[int, Sequence[int]], batch_size: int,
             temperature: Union[float, Sequence[float]] = 0.0, top_p: Union[float, Sequence[float]] = 1.0,
             seeds: Optional[Sequence[int]] = None, add_special_tokens: Optional[bool] = None, refill_at: float = 0.125,
             on_result: Optional[Callable[[int, Generation], None]] = None, stats: Optional[dict] = None,
             desc: Optional[str] = "generate", compile_decode: bool = False) -> list[Generation]:
    """Complete each prompt, `batch_size` rows decoding at a time: greedy where a row's temperature is 0, else
    sampled with that row's `temperature`, `top_p` and seed (each one per prompt, or one value for all).
    `max_new_tokens` may be per row. Freed slots are refilled once a `refill_at` share of them is free (one prefill
    serves them all). `on_result(i, generation)` is called as prompt i finishes; `stats`, a dict, receives the
    sequences, real tokens and seconds, counts of decode steps (and of the slots and live rows they ran), prefills and
    CUDA graphs, the seconds of the prefills and of the drain (the steps after the last prompt started: a finished
    row's slot is no longer refilled), and the KV pages' (the pool, its peak use, rows preempted, the entries decode
    steps read and those on shared pages). `desc=None` shows no progress bar.
    `compile_decode` runs the decode step's model forward through `torch.compile` (see `_compiled_decode_logits`).
    Prompts are tokenized with exactly one BOS (`models.encode_prompt`, as SFT and DPO see them) unless
    `add_special_tokens` says otherwise."""
    n = len(prompts)
    temperatures, top_ps = _per_row(temperature, n), _per_row(top_p, n)
    limits = _per_row(max_new_tokens, n)
    if any(t > 0 for t in temperatures) and (seeds is None or len(seeds) != n):
        raise ValueError("sampling needs one seed per prompt")
    if min(limits, default=1) < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {min(limits)}")
    if n == 0:
        return []
    encoded = [models.encode_prompt(tokenizer, p) for p in prompts] if add_special_tokens is None else \
        tokenizer(prompts, add_special_tokens=add_special_tokens)["input_ids"]
    with _looper_attention_in(model):
        decoder = _Decoder(model, tokenizer, encoded, limits, [float(t) for t in temperatures],
                           [float(p) for p in top_ps], [s & _MASK32 for s in (seeds or [0] * n)],
                           # compiled: never one slot (a size-1 dimension would be compiled again)
                           max(min(batch_size, n), 2 if compile_decode else 1), compile_decode)
        bar = tqdm(total=n, desc=desc, unit="seq", leave=False, disable=desc is None)
        start = time.time()
        for i, result in decoder.run(refill_at):
            bar.update(1)
            bar.set_postfix(tok_per_s=f"{decoder.real_tokens / max(time.time() - start, 1e-9):.0f}", refresh=False)
            if on_result is not None:
                on_result(i, result)
        bar.close()
    if decoder.stats["preempted"]:
        log.info("generation: %d times a row's KV pages were taken back and it resumed later (recomputing its "
                 "prompt and tokens); a smaller batch size avoids that", decoder.stats["preempted"])
    if stats is not None:
        stats.update(decoder.stats, seconds=time.time() - start, real_tokens=decoder.real_tokens, sequences=n)
    return decoder.results


def _pages(positions: int) -> int:
    """Pages that hold `positions` positions."""
    return -(-positions // PAGE)


@dataclass
class _Plan:
    """The next queued rows as one prefill (`_Decoder._plan`): identical prompts computed once (`unique`: the first
    of the `take` rows with each distinct prompt, `source[k]`: row k's among the `distinct` prompts), the first
    tokens neighbouring distinct prompts share computed once (`groups`: a group's first prompt -> (end, prefix
    length), `shared[d]`: prompt d's prefix length) or, where that saves more, read from the full pages of a row
    already decoding (`resident`: its slot; `shared[d]`: the positions of those pages prompt d shares, no groups),
    and the `pages` the rows need."""

    take: int
    unique: list
    source: list
    distinct: list
    shared: list
    groups: dict
    tokens: int
    pages: int
    resident: Optional[int] = None


class _Decoder:
    """The state of one `generate` call. Per slot, on the host: the prompt it serves (-1: free), its tokens so far
    and its KV length; on the device: its KV length (= its next write position and token position), its step and its
    sampling settings."""

    _PREFILL_TOKENS = 16384  # prompt tokens per prefill forward (bounds activation memory)
    _MIN_SHARED = 8  # a prefix shared by prompts of one prefill is computed once if it has this many tokens

    def __init__(self, model, tokenizer, encoded, limits, temperatures, top_ps, seeds, slots, compile_decode):
        self.model, self.tokenizer, self.encoded, self.limits = model, tokenizer, encoded, limits
        self.settings = (temperatures, top_ps, seeds)
        self.sampling, self.nucleus = any(t > 0 for t in temperatures), any(p < 1 for p in top_ps)
        quantized = models.is_quantized(model)
        if compile_decode and quantized:  # bitsandbytes layers are neither captured nor compiled here
            log.warning("generation.compile: not for a quantized model; decoding uncompiled")
            compile_decode = False
        self.decode_logits = _compiled_decode_logits(COMPILE_BACKEND) if compile_decode else _decode_logits
        # in eager forwards (GPU): RMSNorm (bf16/fp16) and the rotary embedding (bf16) as one Triton kernel each;
        # with compile_decode, the prefills' MLPs (and the rotary embedding where the kernel is not used) compiled
        rotary = _fused_rotary(model)
        mlps, modeling = _compilable_parts(model) if compile_decode else ([], [])
        modeling = [python for python in modeling if python not in rotary]
        eager = _norm_patches(_fused_norms(model)) + _rotary_patches(rotary)
        self.prefill_patches = eager + _compiled_patches(mlps, modeling)
        self.step_patches = [] if compile_decode else eager  # (a compiled step fuses them itself)
        # CUDA graphs replay a decode step without Python and kernel-launch overhead (which otherwise bounds the
        # step time of a 7B model on an H100); one graph per slot count (and, for the sdpa kernel, width), captured
        # on first use.
        self.graphs: dict = {}
        self.pool = None
        self.use_graphs = model.device.type == "cuda" and not quantized
        self.eos_ids = set(_eos_ids(model, tokenizer))
        # in token order: identical prompts, and prompts that begin alike, side by side, so that one prefill
        # computes their shared entries once
        self.queue = sorted(range(len(encoded)), key=lambda i: encoded[i])
        self.device = model.device
        text = model.config.get_text_config()
        shape = (self.device, model.dtype, text.num_attention_heads,
                 getattr(text, "num_key_value_heads", None) or text.num_attention_heads, _head_dim(model))
        self.packed_kernel, self.kernel = attention.kernels(*shape)
        self.prefix_kernel = attention.prefix_kernel(*shape)
        # a slot's worst case: its prompt and every token it may generate (a multiple of _WIDTH_STEP: the sdpa and
        # flash steps attend over that many positions at most)
        self.capacity = _round_up(max(map(len, encoded)) + max(limits) + 1, _WIDTH_STEP)
        pages = _pages_that_fit(model, slots, self.capacity // PAGE)
        self.cache = PagedCache(text.num_hidden_layers, slots, pages, self.capacity // PAGE, self.device)
        # a prefill starts rows only while this many pages stay free besides theirs: the next step can then give
        # every row a page, so a row started is not taken back before it has decoded (where the pool holds a page
        # per slot beyond one slot's worst case; a smaller pool keeps what it can)
        self.reserve = min(slots, pages - 1 - self.capacity // PAGE)
        self.owner, self.produced, self.length = [-1] * slots, [[] for _ in range(slots)], [0] * slots
        self.started, self.starts = [0] * slots, 0  # when each slot's row started (the newest is preempted first)
        self.resumed: dict[int, list[int]] = {}  # preempted rows waiting in the queue: the tokens they had produced
        zeros = dict(dtype=torch.long, device=self.device)
        self.state = {"length": torch.zeros(slots, **zeros), "live": torch.zeros(slots, **zeros),
                      "step": torch.zeros(slots, **zeros), "seed": torch.zeros(slots, **zeros),
                      "temperature": torch.zeros(slots, device=self.device),
                      "top_p": torch.ones(slots, device=self.device)}
        self.tokens = torch.zeros(slots, **zeros)
        self.next_tokens = torch.zeros(slots, **zeros)
        self.pending = None  # (slots, their owners, tokens on the host, done event) of the step launched last
        self.results: list[Optional[Generation]] = [None] * len(encoded)
        self.real_tokens = 0
        self.width = 0  # positions every slot's attention covers in a decode step (sdpa and flash kernels)
        self.stats = {"decode_steps": 0, "slot_steps": 0, "row_steps": 0, "prefills": 0, "prefill_tokens": 0,
                      "prefill_shared": 0, "prefix_shared_tokens": 0, "prefill_seconds": 0.0, "drain_steps": 0,
                      "drain_seconds": 0.0, "graphs": 0, "kv_pages": pages - 1, "peak_pages": 0, "preempted": 0,
                      "kv_positions": 0, "kv_shared_positions": 0,
                      "capture_seconds": 0.0, "kernel": self.kernel, "compiled_decode": compile_decode,
                      "slots": slots, "triton_rotary": bool(rotary),
                      "compiled_prefill": sorted({type(m).__name__ for m in mlps})
                      + ["apply_rotary_pos_emb"] * bool(modeling)}

    def run(self, refill_at: float):
        """Yields (prompt index, Generation) as rows finish. A decode step's tokens are read while the next step
        runs (`pending`), so the GPU never waits for the host; before the slots change (a prefill, halving, the
        end) the pending step is collected first. A refill waits for free pages as well as free slots: for
        `refill_at` of the slots' worth of rows like the next one (or for one row, when none is decoding)."""
        yield from self.prefill(list(range(self.cache.slots)))
        drain_start = None  # when the queue ran out: from then on, ever fewer rows a step
        while True:
            free = [s for s in range(self.cache.slots) if self.owner[s] < 0]
            live = [s for s in range(self.cache.slots) if self.owner[s] >= 0]
            half = self.cache.slots // 2
            wanted = max(1, min(len(self.queue), math.ceil(refill_at * self.cache.slots)))
            refill = self.queue and len(free) >= wanted and self._room_for(wanted if live else 1)
            halve = not self.queue and len(live) <= half and half >= _MIN_SLOTS
            if (refill or halve or not live) and self.pending is not None:
                yield from self.collect_pending()  # decide on the newest tokens
                continue
            if refill:
                yield from self.prefill(free)
            elif not live:
                if self.queue:  # (cannot happen: with no row decoding, every page but scratch is free)
                    raise RuntimeError(f"generation: {len(self.queue)} prompts left and no KV pages for the next")
                if drain_start is not None:
                    self.stats["drain_seconds"] = time.perf_counter() - drain_start
                return
            else:
                if halve:  # the live rows fit in half the slots
                    self.keep(live + free[: half - len(live)])
                if not self.queue:
                    drain_start = drain_start or time.perf_counter()
                    self.stats["drain_steps"] += 1
                yield from self.decode()

    def _prompt(self, i: int) -> list[int]:
        """Row i's tokens to prefill: its prompt, and after a preemption the tokens it had produced but the last
        (the input of its next step, as it was)."""
        return self.encoded[i] + self.resumed[i][:-1] if i in self.resumed else self.encoded[i]

    def _room_for(self, rows: int) -> bool:
        """Whether the pages of `rows` rows like the next queued one are free, besides the reserve."""
        return rows * _pages(len(self._prompt(self.queue[0]))) + self.reserve <= len(self.cache.free)

    def _plan(self, count: int) -> "_Plan":
        """The next `count` queued rows as one prefill (fewer where `_PREFILL_TOKENS` ends it first)."""
        unique, source, tokens, take = [], [], 0, 0
        while take < count:
            prompt = self._prompt(self.queue[take])
            if not unique or prompt != self._prompt(self.queue[unique[-1]]):
                if unique and tokens + len(prompt) > self._PREFILL_TOKENS:
                    break
                unique.append(take)
                tokens += len(prompt)
            source.append(len(unique) - 1)
            take += 1
        distinct = [self._prompt(self.queue[u]) for u in unique]
        shared, groups = [0] * len(distinct), {}
        for first, end, length in _shared_prefixes(distinct, self._MIN_SHARED):
            shared[first:end], groups[first] = [length] * (end - first), (end, length)
        resident, on_pages = self._resident(distinct)
        if sum(on_pages) > sum(length for d, length in enumerate(shared) if d not in groups):  # (tokens saved)
            shared, groups = on_pages, {}
        else:
            resident = None
        rows = [source.count(d) for d in range(len(distinct))]  # (source is ascending)
        pages = sum(_pages(len(prompt)) - (shared[d] // PAGE if d not in groups else 0)
                    + (rows[d] - 1) * (_pages(len(prompt)) - len(prompt) // PAGE) for d, prompt in enumerate(distinct))
        return _Plan(take, unique, source, distinct, shared, groups, tokens, pages, resident)

    def _resident(self, distinct: list[list[int]]) -> tuple[Optional[int], list[int]]:
        """The newest row decoding (the queue is in token order, so the likeliest to begin as the next prompts do)
        and, per prompt of `distinct`, the positions of that row's full prompt pages it begins with (a multiple of
        `PAGE`; at least its last token left to compute): few-shot examples, an arm's system prompt, written once
        for all the prefills that need them while a row holds them."""
        live = [s for s in range(self.cache.slots) if self.owner[s] >= 0]
        if not live:
            return None, [0] * len(distinct)
        newest = max(live, key=self.started.__getitem__)
        written = self.encoded[self.owner[newest]]  # (its prompt's entries are all in its pages)
        return newest, [min(_common_prefix(written, prompt), len(prompt) - 1) // PAGE * PAGE for prompt in distinct]

    def prefill(self, free: list[int]):
        """Start the next prompts in the `free` slots, as many as their pages allow (`_plan`, `reserve`), packed
        into one row without padding (up to `_PREFILL_TOKENS` tokens a forward); their first tokens are chosen from
        the prefill's logits. Identical prompts are computed once, and so are the first tokens that prompts share
        (`_shared_prefixes`), or, where that saves more, the first full pages they share with the newest row already
        decoding are its pages (`_resident`): the rest of each prompt attends to them in the cache. The full pages
        of those shared entries serve every row that shares them. A preempted row goes on from its last token, as it
        was."""
        start = time.perf_counter()
        while free and self.queue:
            room = len(self.cache.free) - self.reserve
            plan = self._plan(min(len(free), len(self.queue)))
            while plan.pages > room and plan.take > 1:  # fewer rows (in proportion) until their pages are free
                plan = self._plan(max(1, min(plan.take - 1, plan.take * room // plan.pages)))
            if plan.pages > room:
                break
            rows, self.queue = self.queue[:plan.take], self.queue[plan.take:]
            where, free = free[:plan.take], free[plan.take:]
            distinct, shared, groups = plan.distinct, plan.shared, plan.groups
            slots_of = [[] for _ in distinct]  # each distinct prompt's slots
            for k, d in enumerate(plan.source):
                slots_of[d].append(where[k])
            # pages: a prompt's first slot shares its group's prefix pages (full ones) with the group's first slot
            # and has its own for the rest; its other slots share its full pages. `own[slot]`: where the entries
            # that slot's targets write begin (the pages before are written for another slot).
            own, group_slot = {}, plan.resident  # (with a resident row: every prompt's prefix is its pages)
            for d, prompt in enumerate(distinct):
                first = slots_of[d][0]
                if d in groups:
                    group_slot = first
                elif shared[d]:
                    self.cache.share(first, group_slot, shared[d] // PAGE)
                own[first] = len(self.cache.owned[first]) * PAGE
                self.cache.grow(first, _pages(len(prompt)) - len(self.cache.owned[first]))
                for slot in slots_of[d][1:]:
                    self.cache.share(slot, first, len(prompt) // PAGE)
                    own[slot] = len(prompt) // PAGE * PAGE
                    self.cache.grow(slot, _pages(len(prompt)) - len(prompt) // PAGE)
            self._count_pages()
            # one packed row: each distinct prompt (without its shared prefix), preceded by the prefix where it is
            # its group's first; each piece's entries go to every slot that needs them. With groups, each piece
            # attends to the entries of its prompt's first slot: the prefix's (written in the same layer, before
            # attention) and its own.
            pieces, offsets, targets, answers, history = [], [], [], [], []
            for d, prompt in enumerate(distinct):
                if d in groups:
                    end, length = groups[d]
                    pieces.append(prompt[:length])
                    offsets.append(0)
                    targets += [(slot, len(pieces) - 1) for e in range(d, end) for slot in slots_of[e]]
                    history.append(slots_of[d][0])
                pieces.append(prompt[shared[d]:])
                offsets.append(shared[d])
                targets += [(slot, len(pieces) - 1) for slot in slots_of[d]]
                history.append(slots_of[d][0])
                answers.append(len(pieces) - 1)
            logits = self._forward(pieces, offsets, targets, own, answers,
                                   history if groups or plan.resident is not None else None)
            self.stats["prefills"] += 1
            self.stats["prefill_tokens"] += sum(map(len, pieces))
            self.stats["prefill_shared"] += plan.take - len(plan.unique)
            self.stats["prefix_shared_tokens"] += plan.tokens - sum(map(len, pieces))
            if len(plan.unique) < plan.take:
                logits = logits[torch.tensor(plan.source, device=self.device)]
            temperatures, top_ps, seeds = self.settings
            to = functools.partial(_on, self.device)
            slots = to(where)
            lengths = [len(self._prompt(i)) for i in rows]
            self.state["length"][slots] = to(lengths)
            self.state["live"][slots] = 1
            self.state["step"][slots] = 0
            self.state["seed"][slots] = to([seeds[i] for i in rows])
            self.state["temperature"][slots] = to([temperatures[i] for i in rows], torch.float32)
            self.state["top_p"][slots] = to([top_ps[i] for i in rows], torch.float32)
            self.tokens[slots] = self.choose(logits, slots)
            for slot, i, length in zip(where, rows, lengths):
                self.owner[slot], self.produced[slot], self.length[slot] = i, self.resumed.pop(i, []), length
                self.started[slot], self.starts = self.starts, self.starts + 1
            fresh = [slot for slot in where if not self.produced[slot]]
            if len(fresh) < len(where):  # resumed rows: their own last token and step, not the ones chosen
                back = [slot for slot in where if self.produced[slot]]
                self.tokens[to(back)] = to([self.produced[slot][-1] for slot in back])
                self.state["step"][to(back)] = to([len(self.produced[slot]) for slot in back])
            # (it waits for the chosen tokens: the time below is the GPU's)
            finished = list(self.collect(fresh, self.tokens.tolist()))
            self.stats["prefill_seconds"] += time.perf_counter() - start
            yield from finished
            start = time.perf_counter()

    def _forward(self, pieces: list[list[int]], offsets: list[int], targets: list[tuple[int, int]],
                 own: dict, answers: list[int], history: Optional[list[int]] = None) -> torch.Tensor:
        """One prefill forward: the token lists `pieces` packed into one row, piece j at positions offsets[j]...
        Each (slot, j) of `targets` receives piece j's KV entries at those positions of its slot, from position
        `own[slot]` on (before it, its pages are another slot's). Without `history` each piece attends to itself
        alone; with it, piece j attends to the first offsets[j] entries of slot history[j] (its prefix) and to
        itself. Returns the logits at the last token of each of the pieces `answers`."""
        lengths = [len(piece) for piece in pieces]
        ends = torch.tensor(lengths).cumsum(0)
        starts = (ends - torch.tensor(lengths)).tolist()
        ids = torch.tensor([token for piece in pieces for token in piece], device=self.device)[None]
        positions = torch.cat([torch.arange(o, o + n) for o, n in zip(offsets, lengths)])
        entries, sources = [], []
        for slot, j in targets:
            first, end = max(offsets[j], own[slot]), offsets[j] + lengths[j]
            if first < end:
                entries.append(self.cache.entries(slot, first, end))
                sources.append(torch.arange(first, end) - offsets[j] + starts[j])
        sources = torch.cat(sources)
        self.cache.prefill_index = torch.cat(entries).to(self.device)
        if not torch.equal(sources, torch.arange(int(ends[-1]))):  # a piece written to several slots, or part of one
            self.cache.prefill_sources = sources.to(self.device)
        query_starts = torch.cat([torch.zeros(1, dtype=torch.int32), ends.to(torch.int32)]).to(self.device)
        if history is None:
            packed = attention.Packed(self.packed_kernel, query_starts, max(lengths))
        else:
            seen = [o + n for o, n in zip(offsets, lengths)]
            where = torch.cat([self.cache.entries(slot, 0, n) for slot, n in zip(history, seen)])
            packed = attention.Packed(self.prefix_kernel, query_starts, max(lengths), where.to(self.device), seen)
            self.cache.prefill_reads_cache = True
        try:
            with _patched(self.prefill_patches):
                return _logits(self.model, self.cache, ids, positions[None].to(self.device),
                               (ends - 1)[answers].to(self.device), looper_packed=packed)[0]
        finally:
            self.cache.prefill_index = self.cache.prefill_sources = None
            self.cache.prefill_reads_cache = False

    def make_room(self):
        """Give each row whose next entry starts a page a new page. Where too few are free, first collect the step
        in flight (rows it ended give theirs back), then preempt the newest rows."""
        while True:
            live = [s for s in range(self.cache.slots) if self.owner[s] >= 0]
            short = [s for s in live if self.length[s] >= len(self.cache.owned[s]) * PAGE]
            if len(short) <= len(self.cache.free):
                break
            if self.pending is not None:
                yield from self.collect_pending()
            else:
                self.preempt(max(live, key=self.started.__getitem__))
        for slot in short:
            self.cache.grow(slot, 1)
        self._count_pages()

    def preempt(self, slot: int) -> None:
        """Send `slot`'s row back to the front of the queue with the tokens it has produced, and free its pages: it
        goes on from those tokens (a prefill of its prompt and them) when pages are free again."""
        i = self.owner[slot]
        self.resumed[i] = self.produced[slot]
        self.queue.insert(0, i)
        self.free_slots([slot])
        self.stats["preempted"] += 1

    def free_slots(self, slots: list[int]) -> None:
        """`slots` serve no row: their pages go back, and their throwaway steps write at position 0 of their table
        rows, now all the scratch page."""
        for slot in slots:
            self.cache.release(slot)
            self.owner[slot], self.produced[slot], self.length[slot] = -1, [], 0
        where = _on(self.device, slots)
        self.state["length"][where] = 0
        self.state["live"][where] = 0

    def _count_pages(self) -> None:
        self.stats["peak_pages"] = max(self.stats["peak_pages"], self.cache.pages - 1 - len(self.cache.free))

    def decode(self):
        """One step for every slot (a free slot computes a throwaway token at its position 0, in the scratch
        page)."""
        yield from self.make_room()
        live = [s for s in range(self.cache.slots) if self.owner[s] >= 0]
        if not live:  # (the step in flight ended them all)
            return
        self.cache.flush()
        if self.kernel != "triton":  # it attends over the longest live history, rounded up (few graph shapes)
            self.width = min(self.capacity, _round_up(max(self.length[s] for s in live) + 1, _WIDTH_STEP))
        self.stats["decode_steps"] += 1
        self.stats["slot_steps"] += self.cache.slots
        self.stats["row_steps"] += len(live)  # row_steps / slot_steps: the slots' occupancy
        self.stats["kv_positions"] += sum(self.length[s] for s in live)  # the KV entries the step's rows read,
        self.stats["kv_shared_positions"] += self.cache.shared  # of which on pages another row also reads
        if self.use_graphs:
            self.replay()
        else:
            self.step()
        self.tokens.copy_(self.next_tokens)
        self.state["length"] += self.state["live"]
        self.state["step"] += 1
        for slot in live:
            self.length[slot] += 1
        done = None
        if self.tokens.is_cuda:
            host = self.tokens.to("cpu", non_blocking=True)  # (into pinned memory)
            done = torch.cuda.Event()
            done.record()
        else:
            host = self.tokens.clone()
        launched = (live, [self.owner[s] for s in live], host, done)  # owners as they are now, before collecting
        if self.pending is not None:
            yield from self.collect_pending()
        self.pending = launched

    def collect_pending(self):
        """Collect the last decode step launched (its rows as they were then: a row that ended one step earlier
        has computed a token that is not its own)."""
        live, owners, tokens, done = self.pending
        self.pending = None
        if done is not None:
            done.synchronize()
        yield from self.collect([s for s, i in zip(live, owners) if self.owner[s] == i], tokens.tolist())

    def step(self) -> None:
        """The decode step proper: reads `tokens` and the slot state, writes the KV entries and `next_tokens` (the
        body of the CUDA graphs; running it twice with the same state writes the same values)."""
        state, table = self.state, self.cache.table
        page = table.gather(1, (state["length"] // PAGE)[:, None])[:, 0].long()
        self.cache.write_index = page * PAGE + state["length"] % PAGE
        step = attention.DecodeStep(self.kernel, (state["length"] + 1).to(torch.int32), self.width, table, PAGE)
        with _patched(self.step_patches):
            logits = self.decode_logits(self.model, self.cache, self.tokens, state["length"], step)
        self.next_tokens.copy_(seeded_choice(logits, state["seed"], state["step"], state["temperature"],
                                             state["top_p"], self.sampling, self.nucleus))

    def replay(self) -> None:
        shape = (self.cache.slots, self.width)
        if shape not in self.graphs:
            try:
                start = time.perf_counter()
                self.graphs[shape] = self.capture()
                self.stats["graphs"] += 1
                self.stats["capture_seconds"] += time.perf_counter() - start
            except Exception as error:  # noqa: BLE001 - a model that cannot be captured still decodes, eagerly
                log.warning("generation: CUDA graph capture failed (%s); decoding without graphs", error)
                self.stats["graph_failure"] = repr(error)[:300]
                self.use_graphs = False
                self.step()
                return
        self.graphs[shape].replay()

    def capture(self):
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()  # one memory pool for the graphs of these slots
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self.step()  # warm-up outside the graph (lazy library initialisation); it writes what the replay will
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            self.step()
        return graph

    def choose(self, logits, slots):
        state = self.state
        chosen = seeded_choice(logits, state["seed"][slots], state["step"][slots], state["temperature"][slots],
                               state["top_p"][slots], self.sampling, self.nucleus)
        state["step"][slots] += 1
        return chosen

    def collect(self, slots: list[int], tokens: list[int]):
        """Record `tokens[slot]` for each of `slots`; a row that ends frees its slot."""
        freed = []
        for slot in slots:
            i, produced = self.owner[slot], self.produced[slot]
            produced.append(tokens[slot])
            stop = tokens[slot] in self.eos_ids
            if stop or len(produced) >= self.limits[i]:
                body = produced[:-1] if stop else produced
                self.results[i] = Generation(self.tokenizer.decode(body, skip_special_tokens=True), len(produced),
                                             "stop" if stop else "length")
                self.real_tokens += len(produced)
                freed.append(slot)
                yield i, self.results[i]
        if freed:
            self.free_slots(freed)

    def keep(self, slots: list[int]) -> None:
        where = torch.tensor(slots, device=self.device)
        self.cache.keep(slots)
        self.owner = [self.owner[s] for s in slots]
        self.started = [self.started[s] for s in slots]
        self.produced = [self.produced[s] for s in slots]
        self.length = [self.length[s] for s in slots]
        self.state = {k: v[where] for k, v in self.state.items()}
        self.tokens, self.next_tokens = self.tokens[where], self.next_tokens[where]
        # the graphs read the old tensors; their pool goes with them (capturing into a pool whose graphs are all
        # gone trips an allocator assertion)
        self.graphs.clear()
        self.pool = None


def _logits(model, cache, ids, positions, keep, **attention_args):
    """The model's logits at `keep` (a count from the end, or the positions) of `ids`, with `cache` as its KV cache
    and the `looper.attention` arguments (`looper_packed` for a prefill, `looper_decode` for a decode step)."""
    return model(input_ids=ids, position_ids=positions, past_key_values=cache, use_cache=True, logits_to_keep=keep,
                 **attention_args).logits


def _decode_logits(model, cache, tokens, lengths, step):
    """The logits [slots, vocab] of one decode step: each slot's token at position `lengths`."""
    return _logits(model, cache, tokens[:, None], lengths[:, None], 1, looper_decode=step)[:, -1]


COMPILE_BACKEND = "inductor"  # torch.compile's backend for `compile_decode` (tests use "eager": tracing only)


@functools.lru_cache(maxsize=None)
def _compiled_decode_logits(backend: str):
    """`_decode_logits` through torch.compile, one per process: inductor fuses the step's hundreds of small
    elementwise kernels (RMSNorm, rotary embedding, SiLU, residual adds) into a few. Shapes are dynamic (one
    compilation serves every slot count). On an H100 with a 7B model the first call compiles for ~100 s (~60 s in a
    later process: inductor's on-disk cache). Looper's own CUDA graph capture replays the compiled kernels as it
    does eager ones. The prefill's forward as a whole stays eager (its attention and cache writes vary in shape from
    one prefill to the next); only its MLPs are compiled (`_compiled_patches`, a few seconds), and its rotary
    embedding where looper's Triton kernel does not serve. Since the eager step has looper's Triton norms and rotary
    embedding, compiling gains little there: a step of 256 slots takes 18.2 instead of 18.9 ms, and a rollout of
    2,048 arm-template sequences runs at the same ~9.9k tokens/s (`scripts/bench_gpu.py --sections step,rollout
    --rollout-batches 8 --rollout-arms 8 [--compile]`)."""
    return torch.compile(_decode_logits, dynamic=True, backend=backend)


class _looper_attention_in:
    """Within `generate`, the model attends with `looper.attention` (registered with transformers' attention
    interface); its own implementation (sdpa, eager, flash_attention_2) is restored afterwards."""

    def __init__(self, model):
        self.model, self.original = model, model.config._attn_implementation

    def __enter__(self):
        attention.register()
        self.model.set_attn_implementation(attention.GENERATION)

    def __exit__(self, *exc):
        self.model.set_attn_implementation(self.original)


_ABSENT = object()


class _patched:
    """Within it, each (owner, name, value) of `patches` is set: an nn.Module's instance `forward` (nn.Module calls it
    instead of the class's), a modeling module's `apply_rotary_pos_emb` (the attention forward looks it up there at
    each call). Afterwards each name is as it was, or gone where it was not there, so training never sees them."""

    def __init__(self, patches: list):
        self.patches, self.saved = patches, []

    def __enter__(self):
        self.saved = [vars(owner).get(name, _ABSENT) for owner, name, _ in self.patches]
        for owner, name, value in self.patches:
            setattr(owner, name, value)
        return self

    def __exit__(self, *exc):
        for (owner, name, _), before in zip(self.patches, self.saved):
            if before is _ABSENT:
                delattr(owner, name)
            else:
                setattr(owner, name, before)


def _norm_patches(modules: list) -> list:
    """The RMSNorm `modules` (`_fused_norms`) as one Triton kernel each. Eager forwards only: in a compiled decode
    step inductor fuses the norms itself, and a Triton kernel in it made every new slot count compile again."""
    return [(m, "forward", functools.partial(_triton_rms_norm, weight=m.weight, eps=m.variance_epsilon))
            for m in modules]


def _rotary_patches(modeling: list) -> list:
    """Each of the `modeling` modules' `apply_rotary_pos_emb` (`_fused_rotary`) as looper's Triton kernel where the
    call is one it handles, and as itself otherwise. Eager forwards only, as the norms."""
    return [(python, "apply_rotary_pos_emb", functools.partial(_triton_rotary, python.apply_rotary_pos_emb))
            for python in modeling]


def _compiled_patches(mlps: list, modeling: list) -> list:
    """The `mlps` and each of the `modeling` modules' `apply_rotary_pos_emb` through torch.compile (a prefill with
    `compile_decode`): inductor fuses the MLP's activation and product, and the rotary embedding's slices, negation,
    products and sum, where eager PyTorch makes a pass over the prompts' activations for each. One compilation per
    function (dynamic shapes) serves every layer and prefill size."""
    return [(m, "forward", functools.partial(_compiled(type(m).forward, COMPILE_BACKEND), m)) for m in mlps] + \
        [(python, "apply_rotary_pos_emb", _compiled(python.apply_rotary_pos_emb, COMPILE_BACKEND))
         for python in modeling]


@functools.lru_cache(maxsize=None)
def _compiled(function, backend: str):
    return torch.compile(function, dynamic=True, backend=backend)


def _compilable_parts(model) -> tuple[list, list]:
    """(the model's MLP modules, the Python modules that define its attention classes and their
    `apply_rotary_pos_emb`): what `_compiled_patches` compiles. MLPs are modules of a class named *MLP whose forward
    is the class's own."""
    mlps = [m for m in model.modules() if type(m).__name__.endswith("MLP") and "forward" not in vars(m)]
    return mlps, _modeling_with_rotary(model)


def _modeling_with_rotary(model) -> list:
    """The Python modules that define the model's attention classes and an `apply_rotary_pos_emb` (transformers'
    modeling_llama, modeling_qwen2, ...: the attention forward looks the function up there at each call)."""
    modeling = {sys.modules.get(type(m).__module__) for m in model.modules() if type(m).__name__.endswith("Attention")}
    return [python for python in modeling if callable(getattr(python, "apply_rotary_pos_emb", None))]


def _triton_rotary(original, q, k, cos, sin, *args, **kwargs):
    """`original(q, k, cos, sin, ...)`, by `looper.triton_rotary` where the call is its plain form: q and k
    [batch, heads, tokens, head_dim] (a power of two, the last dimension contiguous), cos/sin [batch, tokens,
    head_dim], all bfloat16."""
    plain = not args and kwargs.get("unsqueeze_dim", 1) == 1 and set(kwargs) <= {"unsqueeze_dim"} \
        and q.dim() == k.dim() == 4 and cos.dim() == sin.dim() == 3 and q.stride(-1) == k.stride(-1) == 1 \
        and q.shape[-1] == k.shape[-1] == cos.shape[-1] and q.shape[-1] & (q.shape[-1] - 1) == 0 \
        and q.dtype == k.dtype == cos.dtype == sin.dtype == torch.bfloat16 and q.is_cuda
    if not plain:
        return original(q, k, cos, sin, *args, **kwargs)
    from looper.triton_rotary import apply_rotary_pos_emb

    return apply_rotary_pos_emb(q, k, cos, sin)


def _fused_rotary(model) -> list:
    """The modules of `_modeling_with_rotary` whose `apply_rotary_pos_emb` `looper.triton_rotary` computes exactly
    (on CUDA in bfloat16, heads of a power-of-two size, checked on a test input: a variant such as an interleaved or
    partial rotary is not). None where the kernel would never run: there `generation.compile` compiles it."""
    head_dim = _head_dim(model)
    if model.device.type != "cuda" or model.dtype != torch.bfloat16 or head_dim & (head_dim - 1):
        return []
    return [python for python in _modeling_with_rotary(model)
            if _rotary_matches(python.apply_rotary_pos_emb, model.dtype, model.device)]


@functools.lru_cache(maxsize=None)
def _rotary_matches(function, dtype: torch.dtype, device: torch.device) -> bool:
    generator = torch.Generator(device=device).manual_seed(0)
    # q and k as the attention forward makes them: a projection [batch, tokens, heads * 64] viewed per head and
    # transposed; 3 query heads (not a power of two), 2 key heads
    q = torch.randn(2, 5, 3 * 64, device=device, generator=generator).to(dtype).view(2, 5, 3, 64).transpose(1, 2)
    k = torch.randn(2, 5, 2 * 64, device=device, generator=generator).to(dtype).view(2, 5, 2, 64).transpose(1, 2)
    angles = 40 * torch.rand(2, 5, 32, device=device, generator=generator)
    cos, sin = (torch.cat([f(angles)] * 2, dim=-1).to(dtype) for f in (torch.cos, torch.sin))
    try:
        with torch.no_grad():
            got, expected = _triton_rotary(function, q, k, cos, sin), function(q, k, cos, sin)
    except Exception as error:  # noqa: BLE001 - no Triton, an old GPU, another signature: the model's own
        log.warning("generation: Triton rotary embedding unavailable for %s here (%s)", function.__module__, error)
        return False
    if all(torch.equal(a, b) for a, b in zip(got, expected)):
        return True
    log.warning("generation: Triton rotary embedding differs from %s.apply_rotary_pos_emb here; not used",
                function.__module__)
    return False


def _triton_rms_norm(hidden_states, weight, eps):
    from looper.triton_norm import rms_norm

    return rms_norm(hidden_states, weight, eps)


def _fused_norms(model) -> list:
    """The model's RMSNorm modules that `looper.triton_norm` computes as they do: on CUDA in bf16/fp16, of a class
    named *RMSNorm with a weight and `variance_epsilon`, whose own forward the kernel matches on a test input (a
    variant such as Gemma's 1 + weight does not)."""
    if model.device.type != "cuda" or model.dtype not in (torch.float16, torch.bfloat16):
        return []
    candidates = [m for m in model.modules() if type(m).__name__.endswith("RMSNorm") and "forward" not in vars(m)
                  and hasattr(m, "variance_epsilon") and getattr(m, "weight", None) is not None
                  and m.weight.dim() == 1 and m.weight.dtype == model.dtype]
    return [m for m in candidates if _norm_matches(type(m), m.weight.shape[0], m.weight.dtype, m.weight.device)]


@functools.lru_cache(maxsize=None)
def _norm_matches(cls, width: int, dtype: torch.dtype, device: torch.device) -> bool:
    generator = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        try:
            module = cls(width, eps=1e-5).to(device=device, dtype=dtype)
            module.weight.copy_(torch.rand(width, device=device, generator=generator) + 0.5)
            x = (4 * torch.randn(3, 5, width, device=device, generator=generator)).to(dtype)
            got, expected = _triton_rms_norm(x, module.weight, module.variance_epsilon), module(x)
        except Exception as error:  # noqa: BLE001 - no Triton, an old GPU, another constructor: the module's own
            log.warning("generation: Triton RMSNorm unavailable for %s here (%s)", cls.__name__, error)
            return False
    if got.dtype == expected.dtype and torch.allclose(got.float(), expected.float(), rtol=1e-2, atol=1e-2):
        return True
    log.warning("generation: Triton RMSNorm differs from %s here; not used", cls.__name__)
    return False


def _kv_bytes_per_position(model) -> int:
    """Bytes of KV cache one slot position takes (keys and values of every layer)."""
    text = model.config.get_text_config()
    kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    return 2 * text.num_hidden_layers * kv_heads * _head_dim(model) * model.dtype.itemsize


def _head_dim(model) -> int:
    """The size of one attention head."""
    text = model.config.get_text_config()
    return getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads


def _working_bytes(model, slots: int) -> int:
    """Memory a generate call needs besides its KV cache, from above: a prefill forward of `_PREFILL_TOKENS`
    tokens (hidden states, q/k/v, the MLP's intermediates, and one layer's keys and values that prompts after a
    shared prefix attend to, gathered), one float32 logits row per slot a few times over (prefill answers, sampling,
    the CUDA graphs' outputs), and 1 GiB for the allocator's slack."""
    text = model.config.get_text_config()
    hidden = text.hidden_size
    intermediate = getattr(text, "intermediate_size", None) or 4 * hidden
    prefill = _Decoder._PREFILL_TOKENS * (6 * hidden + 4 * intermediate) * model.dtype.itemsize
    history = 2 * 2 * _Decoder._PREFILL_TOKENS * _kv_bytes_per_position(model) // text.num_hidden_layers
    return prefill + history + 4 * slots * text.vocab_size * 4 + (1 << 30)


def _free_bytes(device: torch.device) -> Optional[int]:
    """Bytes PyTorch can still allocate on `device`: free on the GPU plus cached and unused; on the CPU the memory
    the kernel reports available (MemAvailable), None where it reports none."""
    if device.type != "cuda":
        try:
            with open("/proc/meminfo") as handle:
                fields = dict(line.split(":", 1) for line in handle if ":" in line)
            return int(fields["MemAvailable"].split()[0]) * 1024
        except (OSError, KeyError, ValueError):
            return None
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def _pages_that_fit(model, slots: int, pages_per_slot: int) -> int:
    """Pages of the KV cache, scratch included: every slot's worst case (`pages_per_slot`), or as many as fit in the
    device's free memory, where that is less (rows then start while pages last, and the newest is preempted where
    they run out; a log line says so). Too little memory for one slot's worst case is an error naming what to
    lower."""
    want = slots * pages_per_slot + 1
    free = _free_bytes(model.device)
    if free is None:
        return want
    page_bytes, working = PAGE * _kv_bytes_per_position(model), _working_bytes(model, slots)
    fits = max(0, (free - working) // page_bytes)
    if fits >= want:
        return want
    gib = lambda n: f"{n / 2 ** 30:.1f} GiB"  # noqa: E731
    if fits < pages_per_slot + 1:
        raise RuntimeError(
            f"generation: not enough memory for the KV cache: one slot of {pages_per_slot * PAGE} positions (the "
            f"longest prompt plus max_new_tokens) needs {gib(pages_per_slot * page_bytes)} besides {gib(working)} of "
            f"working memory, and {gib(free)} is free on {model.device}. Lower max_new_tokens "
            f"(rollout.max_new_tokens, eval.max_new_tokens) or the prompts' length (eval.shots), or free memory.")
    log.info("generation: KV cache of %d pages (%s): %.0f%% of %d slots' worst case of %d positions; rows start "
             "while pages last", fits - 1, gib(fits * page_bytes), 100 * fits / want, slots, pages_per_slot * PAGE)
    return int(fits)


def _on(device: torch.device, values: list, dtype: torch.dtype = torch.long) -> torch.Tensor:
    """`values` as a tensor on `device`; to a GPU through pinned memory, without waiting: a copy from pageable memory
    waits for the GPU's queued work, so the host could no longer prepare a step while the one in flight runs."""
    return torch.tensor(values, dtype=dtype, pin_memory=device.type == "cuda").to(device, non_blocking=True)


def _round_up(value: int, step: int) -> int:
    return -(-value // step) * step


def _eos_ids(model, tokenizer) -> list[int]:
    configured = model.generation_config.eos_token_id
    ids = configured if isinstance(configured, list) else [configured] if configured is not None else []
    return sorted(set(ids) | {tokenizer.eos_token_id})
