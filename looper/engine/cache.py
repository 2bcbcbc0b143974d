"""The paged KV cache and the sizing of its page pool.

Owns `PageAllocator` (the bookkeeping: pages of `PAGE` positions handed out to slots as rows grow, shared where
prompts begin alike, taken back when rows end), `KVStorage` (the tensors: key and value buffers, the page table on
the device), `pages_that_fit` (how many pages the device's free memory holds besides a prefill's working memory,
from the model's head size and KV bytes per position) and `on` (host lists and tensors to the device without a
sync). Must never decide which row runs where (the scheduler does) or
run the model (the runner does).
"""

import logging
from typing import Optional

import torch

log = logging.getLogger(__name__)

PAGE = 16  # positions per page of the KV cache
PREFILL_TOKENS = 16384  # prompt tokens per prefill forward (bounds activation memory; longer prompts go in chunks)


def pages(positions: int) -> int:
    """Pages that hold `positions` positions."""
    return -(-positions // PAGE)


class PageAllocator:
    """The pages of a KV cache of `slots` rows, `PAGE` positions each, handed out as rows grow: host bookkeeping only
    (the tensors are `KVStorage`'s). Position t of slot s is entry `owned[s][t // PAGE] * PAGE + t % PAGE` of the
    storage's buffers. Page 0 is scratch: the table rows of free slots point there, so their throwaway decode writes
    touch no row's entries. A full page of a prompt's first entries may serve several slots (samples of one prompt,
    prompts after one shared prefix): a full page is never written again. The page table changes made here are
    handed to the storage in the next step's plan (`take_changes`)."""

    def __init__(self, slots: int, pages: int):
        self.slots, self.pages = slots, pages
        self.owned: list[list[int]] = [[] for _ in range(slots)]  # each slot's pages, in position order
        self.users = [0] * pages  # slots holding each page
        self.free = list(range(pages - 1, 0, -1))  # (popped from the end: low pages first)
        self.changes: dict = {}  # (slot, column) -> page, not yet in the storage's table
        self.shared = 0  # positions slots read from pages another slot also holds (once per extra holder)

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

    def take_changes(self) -> Optional[tuple[list, list, list]]:
        """The table changes since the last call, as (slots, columns, pages), or None."""
        if not self.changes:
            return None
        (slots, columns), pages = zip(*self.changes), list(self.changes.values())
        self.changes = {}
        return list(slots), list(columns), pages

    def entries(self, slot: int, first: int, end: int) -> torch.Tensor:
        """The buffer entries (on the host) of positions first..end-1 of `slot` (within its pages)."""
        positions = torch.arange(first, end)
        return torch.tensor(self.owned[slot], dtype=torch.long)[positions // PAGE] * PAGE + positions % PAGE

    def keep(self, slots: list[int]) -> None:
        """Keep only `slots` (in that order; the others hold no pages). Changes not yet taken must be taken first:
        they name the slots as they were."""
        assert not self.changes, "take_changes before keep"
        self.owned = [self.owned[s] for s in slots]
        self.slots = len(slots)


class KVStorage:
    """The KV cache's tensors: per layer one buffer of keys and one of values, [pages * PAGE, kv_heads, head_dim]
    (token-major, the layout of FlashAttention's packed input; made at the first write), and the page table on the
    device [slots, pages per slot], which follows the allocator's changes (`apply`).

    The model sees it as a transformers `Cache`, whose `update` hands the new keys and values on untouched: looper's
    attention writes them (`write`), at the entries its forward's own arguments name (`kernels.attention.Packed` for
    a prefill, `DecodeStep` for a decode step), and attends over them."""

    def __init__(self, num_layers: int, slots: int, pages: int, pages_per_slot: int, device: torch.device):
        self.keys: list = [None] * num_layers
        self.values: list = [None] * num_layers
        self.pages = pages
        self.table = torch.zeros(slots, pages_per_slot, dtype=torch.int32, device=device)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0  # positions are always passed explicitly

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        return key, value  # (written by the attention function, which knows where)

    def write(self, layer: int, keys: torch.Tensor, values: torch.Tensor, index: torch.Tensor):
        """Store `keys`/`values` [n, kv_heads, head_dim] at buffer entries `index` [n] of `layer`; returns the
        layer's buffers."""
        if self.keys[layer] is None:
            shape = (self.pages * PAGE, keys.shape[1], keys.shape[2])
            self.keys[layer], self.values[layer] = keys.new_zeros(shape), values.new_zeros(shape)
        # (indexed assignment on the buffers themselves: compiled, index_copy_ on a view of them made a step several
        # times as slow, as if each layer's whole buffer were copied back)
        self.keys[layer][index] = keys
        self.values[layer][index] = values
        return self.keys[layer], self.values[layer]

    def apply(self, changes: tuple[list, list, list]) -> None:
        """Write the allocator's page changes (slots, columns, pages) to the table (one transfer)."""
        update = on(self.table.device, list(changes))
        self.table[update[0], update[1]] = update[2].to(torch.int32)

    def keep(self, slots: list[int]) -> None:
        """Keep only `slots`' table rows, in that order."""
        self.table = self.table[torch.tensor(slots, device=self.table.device)]


def head_dim(model) -> int:
    """The size of one attention head of `model` (not cached: a cache keyed by the model would keep every model it
    saw, and its GPU memory, alive after its stage)."""
    text = model.config.get_text_config()
    return getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads


def kv_bytes_per_position(model) -> int:
    """Bytes of KV cache one slot position takes (keys and values of every layer)."""
    text = model.config.get_text_config()
    kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    return 2 * text.num_hidden_layers * kv_heads * head_dim(model) * model.dtype.itemsize


def working_bytes(model, slots: int) -> int:
    """Memory a generate call needs besides its KV cache, from above: a prefill forward of `PREFILL_TOKENS`
    tokens (hidden states, q/k/v, the MLP's intermediates, and one layer's keys and values that prompts after a
    shared prefix attend to, gathered), one float32 logits row per slot a few times over (prefill answers, sampling,
    the CUDA graphs' outputs), and 1 GiB for the allocator's slack."""
    text = model.config.get_text_config()
    hidden = text.hidden_size
    intermediate = getattr(text, "intermediate_size", None) or 4 * hidden
    prefill = PREFILL_TOKENS * (6 * hidden + 4 * intermediate) * model.dtype.itemsize
    history = 2 * 2 * PREFILL_TOKENS * kv_bytes_per_position(model) // text.num_hidden_layers
    return prefill + history + 4 * slots * text.vocab_size * 4 + (1 << 30)


def free_bytes(device: torch.device) -> Optional[int]:
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


def pages_that_fit(model, slots: int, pages_per_slot: int) -> int:
    """Pages of the KV cache, scratch included: every slot's worst case (`pages_per_slot`), or as many as fit in the
    device's free memory, where that is less (rows then start while pages last, and the newest is preempted where
    they run out; a log line says so). Too little memory for one slot's worst case is an error naming what to
    lower."""
    want = slots * pages_per_slot + 1
    free = free_bytes(model.device)
    if free is None:
        return want
    page_bytes, working = PAGE * kv_bytes_per_position(model), working_bytes(model, slots)
    fits = max(0, (free - working) // page_bytes)
    if fits >= want:
        return want
    gib = lambda n: f"{n / 2**30:.1f} GiB"
    if fits < pages_per_slot + 1:
        raise RuntimeError(
            f"generation: not enough memory for the KV cache: one slot of {pages_per_slot * PAGE} positions (the "
            f"longest prompt plus max_new_tokens) needs {gib(pages_per_slot * page_bytes)} besides {gib(working)} of "
            f"working memory, and {gib(free)} is free on {model.device}. Lower max_new_tokens "
            f"(rollout.max_new_tokens, eval.max_new_tokens) or the prompts' length (eval.shots), or free memory."
        )
    log.info(
        "generation: KV cache of %d pages (%s): %.0f%% of %d slots' worst case of %d positions; rows start "
        "while pages last",
        fits - 1,
        gib(fits * page_bytes),
        100 * fits / want,
        slots,
        pages_per_slot * PAGE,
    )
    return int(fits)


def on(device: torch.device, values, dtype: torch.dtype = torch.long) -> torch.Tensor:
    """`values` (a list, or a tensor on the host) as a tensor on `device`; to a GPU through pinned memory, without
    waiting: a copy from pageable memory waits for the GPU's queued work, so the host could no longer prepare a step
    while the one in flight runs."""
    cuda = device.type == "cuda"
    host = values.to(dtype) if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dtype)
    return (host.pin_memory() if cuda else host).to(device, non_blocking=cuda)
