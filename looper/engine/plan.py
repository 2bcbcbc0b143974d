"""The plan of one engine step: what the scheduler decided and the runner carries out.

A `Step` is the whole of what the device does next, in this order: slots that serve no row any more are reset
(`release`: rows that ended or were preempted), the page table takes the allocator's changes (`table`), the live rows
move into the first slots (`keep`, when the queue is empty and half the slots idle), then at most one forward: a
`Prefill` (queued rows start) or a `Decode` (one token for every slot). Every index a forward needs is in its plan,
computed on the host from the allocator's bookkeeping; nothing reaches the model through state set beside it. Must
never hold tensors of the device or decide anything (`packed` only turns the scheduler's decisions into indices).
"""

from dataclasses import dataclass, field
from typing import Optional

import torch


@dataclass
class Prefill:
    """Queued rows start in `slots`: their prompts' tokens (without what the cache already holds) packed into one
    row `ids` at `positions`, piece j at ids[starts[j]:starts[j + 1]]; the packed token `sources[k]` (None: token k)
    is written to buffer entry `entries[k]`. With `history`, piece j attends to the `key_lengths[j]` entries
    history lists for it (its prefix in the cache and itself), else to itself alone. The logits at the last token of
    the pieces `answers` choose the rows' first tokens (row k's: answer `logit_rows[k]`, None: k). Each row starts
    at KV length `lengths[k]` with its sampling settings; `resumed` rows (preempted before) go on from their own
    tokens. A prefill with no `slots` (a long prompt's chunk before its last) writes its entries and starts no
    row."""

    ids: list[int]
    positions: list[int]
    starts: list[int]
    answers: list[int]
    entries: torch.Tensor
    sources: Optional[torch.Tensor]
    history: Optional[torch.Tensor]
    key_lengths: Optional[list[int]]
    slots: list[int]
    lengths: list[int]
    seeds: list[int]
    temperatures: list[float]
    top_ps: list[float]
    logit_rows: Optional[list[int]] = None
    resumed: dict = field(default_factory=dict)  # slot -> the tokens its row had produced


@dataclass
class Decode:
    """One token for every slot, attending over `width` positions (sdpa and flash kernels; the Triton kernel reads
    each row's own length)."""

    width: int


@dataclass
class Step:
    release: list[int] = field(default_factory=list)
    table: Optional[tuple[list, list, list]] = None  # (slots, columns, pages)
    keep: Optional[list[int]] = None
    prefill: Optional[Prefill] = None
    decode: Optional[Decode] = None


def packed(pages, pieces, offsets, targets, own, answers, history) -> dict:
    """A prefill forward's arguments (`Prefill`'s first fields; the entries from the allocator `pages`): the token
    lists `pieces` packed into one row, piece j at positions offsets[j]... Each (slot, j) of `targets` receives
    piece j's KV entries at those positions of its slot, from position `own[slot]` on (before it, its pages are
    another slot's). Without `history` each piece attends to itself alone; with it, piece j attends to the first
    offsets[j] entries of slot history[j] (its prefix) and to itself. The logits are those at the last token of
    each of the pieces `answers`."""
    lengths = [len(piece) for piece in pieces]
    ends = torch.tensor(lengths).cumsum(0)
    starts = (ends - torch.tensor(lengths)).tolist()
    entries, sources = [], []
    for slot, j in targets:
        first, end = max(offsets[j], own[slot]), offsets[j] + lengths[j]
        if first < end:
            entries.append(pages.entries(slot, first, end))
            sources.append(torch.arange(first, end) - offsets[j] + starts[j])
    sources = torch.cat(sources)
    in_order = torch.equal(sources, torch.arange(int(ends[-1])))  # (else a piece goes to several slots)
    seen = [o + n for o, n in zip(offsets, lengths)]
    return dict(
        ids=[token for piece in pieces for token in piece],
        positions=[p for o, n in zip(offsets, lengths) for p in range(o, o + n)],
        starts=[0] + ends.tolist(),
        answers=answers,
        entries=torch.cat(entries),
        sources=None if in_order else sources,
        history=None if history is None else torch.cat([pages.entries(slot, 0, n) for slot, n in zip(history, seen)]),
        key_lengths=None if history is None else seen,
    )
