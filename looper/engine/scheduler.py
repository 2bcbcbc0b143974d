"""The scheduler of the paged engine: which rows decode in which slots, and when.

Owns the queue (prompts in token order, so those that begin alike are prefilled together), refill (freed slots take
the next prompts in one prefill once a `refill_at` share of them is free and their pages are), prefix planning
(identical prompts computed once; the first tokens neighbouring prompts share, or the full pages of the newest row
still decoding, computed once and shared; a prompt longer than `PREFILL_TOKENS` computed in chunks of that many
tokens, each attending to the entries of those before it), preemption (where a step finds too few free pages, the
newest row goes back to the queue with the tokens it produced and resumes from them, with the same draws), halving
(when the queue is empty and half the slots are idle, the live rows move into half of them) and collection (a row
ends at EOS or its own token limit; results are detokenized as rows finish). Its decisions leave it as plans
(`plan.Step`): `steps` yields each step's plan and receives what the runner made of it (a prefill's first tokens, a
decode step's `runner.Pending`). Holds the page allocator (`cache.PageAllocator`); every index a forward needs is in
its plan. Must never run the model (the runner does) or touch a KV entry (the runner's storage does).
"""

import math
import time
from dataclasses import dataclass
from typing import Optional

from looper.engine.cache import PAGE, PREFILL_TOKENS, PageAllocator, pages, pages_that_fit
from looper.engine.interface import Generation
from looper.engine.plan import Decode, Prefill, Step, packed
from looper.engine.prefixes import common_prefix, shared_prefixes

MIN_SLOTS = 8  # the drain stops halving the slots here (below it a step costs about the same: the weights' read)
WIDTH_STEP = 64  # attention width is rounded up to a multiple of this (fewer shapes, so fewer CUDA graphs)
MIN_SHARED = 8  # a prefix shared by prompts of one prefill is computed once if it has this many tokens


def round_up(value: int, step: int) -> int:
    return -(-value // step) * step


@dataclass
class _Plan:
    """The next queued rows as one prefill (`Scheduler.plan`): identical prompts computed once (`unique`: the first
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


class Scheduler:
    """The host side of one `generate` call. Per slot: the prompt it serves (-1: free), its tokens so far, its KV length
    and when it started; the queue of prompts not yet started (and the tokens of preempted ones); the pages (`pages`,
    the allocator); the results, and those finished since the caller last took them (`take_finished`). The runner
    holds the same slots' state on the device. `widths`: the decode kernel attends over a width of positions (sdpa,
    flash), which each step's plan then gives."""

    def __init__(self, model, tokenizer, encoded, limits, temperatures, top_ps, seeds, slots, eos_ids, widths=True):
        self.tokenizer, self.encoded, self.limits = tokenizer, encoded, limits
        self.settings = (temperatures, top_ps, seeds)
        self.eos_ids = set(eos_ids)
        # in token order: identical prompts, and prompts that begin alike, side by side, so that one prefill
        # computes their shared entries once
        self.queue = sorted(range(len(encoded)), key=lambda i: encoded[i])
        self.widths = widths
        # a slot's worst case: its prompt and every token it may generate (a multiple of WIDTH_STEP: the sdpa and
        # flash steps attend over that many positions at most)
        self.capacity = round_up(max(map(len, encoded)) + max(limits) + 1, WIDTH_STEP)
        pool = pages_that_fit(model, slots, self.capacity // PAGE)
        self.pages = PageAllocator(slots, pool)
        self.slots = slots
        self.logprobs: Optional[dict[int, list[float]]] = None  # per prompt, its tokens' log-probs (`keep_logprobs`)
        # a prefill starts rows only while this many pages stay free besides theirs: the next step can then give
        # every row a page, so a row started is not taken back before it has decoded (where the pool holds a page
        # per slot beyond one slot's worst case; a smaller pool keeps what it can)
        self.reserve = min(slots, pool - 1 - self.capacity // PAGE)
        self.owner, self.produced, self.length = [-1] * slots, [[] for _ in range(slots)], [0] * slots
        self.started, self.starts = [0] * slots, 0  # when each slot's row started (the newest is preempted first)
        self.resumed: dict[int, list[int]] = {}  # preempted rows waiting in the queue: the tokens they had produced
        self.pending = None  # (slots, their owners, runner.Pending) of the decode step launched last
        self.released: list[int] = []  # slots freed since the last plan (the next one resets them on the device)
        self.results: list[Optional[Generation]] = [None] * len(encoded)
        self.finished: list[tuple[int, Generation]] = []  # since `take_finished`
        self.real_tokens = 0
        self.counts = {
            "decode_steps": 0,
            "slot_steps": 0,
            "row_steps": 0,
            "prefills": 0,
            "prefill_tokens": 0,
            "prefill_shared": 0,
            "prefix_shared_tokens": 0,
            "prefill_seconds": 0.0,
            "drain_steps": 0,
            "drain_seconds": 0.0,
            "kv_pages": pool - 1,
            "peak_pages": 0,
            "preempted": 0,
            "kv_positions": 0,
            "kv_shared_positions": 0,
            "slots": slots,
        }

    def keep_logprobs(self) -> None:
        """Record each generated token's log-prob (the runner computes them: `ModelRunner(logprobs=True)`)."""
        self.logprobs = {}

    def take_finished(self) -> list[tuple[int, Generation]]:
        """(prompt index, Generation) of the rows finished since the last call, in the order they finished."""
        finished, self.finished = self.finished, []
        return finished

    def step(self, **forward) -> Step:
        """The plan of the next step: the slots freed and the page changes since the last one, and `forward`."""
        released, self.released = self.released, []
        return Step(release=released, table=self.pages.take_changes(), **forward)

    def steps(self, refill_at: float):
        """Yields each step's plan (`plan.Step`) and receives what the runner returned for it; rows that finish go
        to `finished`. A decode step's tokens are read while the next step runs (`pending`), so the GPU never waits
        for the host; before the slots change (a prefill, halving, the end) the pending step is collected first. A
        refill waits for free pages as well as free slots: for `refill_at` of the slots' worth of rows like the
        next one (or for one row, when none is decoding)."""
        yield from self.prefill(list(range(self.slots)))
        drain_start = None  # when the queue ran out: from then on, ever fewer rows a step
        while True:
            free = [s for s in range(self.slots) if self.owner[s] < 0]
            live = [s for s in range(self.slots) if self.owner[s] >= 0]
            half = self.slots // 2
            wanted = max(1, min(len(self.queue), math.ceil(refill_at * self.slots)))
            refill = self.queue and len(free) >= wanted and self._room_for(wanted if live else 1)
            halve = not self.queue and len(live) <= half and half >= MIN_SLOTS
            if (refill or halve or not live) and self.pending is not None:
                self.collect_pending()  # decide on the newest tokens
                continue
            if refill:
                yield from self.prefill(free)
            elif not live:
                if self.queue:  # (cannot happen: with no row decoding, every page but scratch is free)
                    raise RuntimeError(f"generation: {len(self.queue)} prompts left and no KV pages for the next")
                if drain_start is not None:
                    self.counts["drain_seconds"] = time.perf_counter() - drain_start
                return
            else:
                if halve:  # the live rows fit in half the slots
                    yield from self.keep(live + free[: half - len(live)])
                if not self.queue:
                    drain_start = drain_start or time.perf_counter()
                    self.counts["drain_steps"] += 1
                yield from self.decode()

    def _prompt(self, i: int) -> list[int]:
        """Row i's tokens to prefill: its prompt, and after a preemption the tokens it had produced but the last
        (the input of its next step, as it was)."""
        return self.encoded[i] + self.resumed[i][:-1] if i in self.resumed else self.encoded[i]

    def _room_for(self, rows: int) -> bool:
        """Whether the pages of `rows` rows like the next queued one are free, besides the reserve."""
        return rows * pages(len(self._prompt(self.queue[0]))) + self.reserve <= len(self.pages.free)

    def plan(self, count: int) -> "_Plan":
        """The next `count` queued rows as one prefill (fewer where `PREFILL_TOKENS` ends it first)."""
        unique, source, tokens, take = [], [], 0, 0
        while take < count:
            prompt = self._prompt(self.queue[take])
            if not unique or prompt != self._prompt(self.queue[unique[-1]]):
                if unique and tokens + len(prompt) > PREFILL_TOKENS:
                    break
                unique.append(take)
                tokens += len(prompt)
            source.append(len(unique) - 1)
            take += 1
        distinct = [self._prompt(self.queue[u]) for u in unique]
        shared, groups = [0] * len(distinct), {}
        for first, end, length in shared_prefixes(distinct, MIN_SHARED):
            shared[first:end], groups[first] = [length] * (end - first), (end, length)
        resident, on_pages = self._resident(distinct)
        if sum(on_pages) > sum(length for d, length in enumerate(shared) if d not in groups):  # (tokens saved)
            shared, groups = on_pages, {}
        else:
            resident = None
        rows = [source.count(d) for d in range(len(distinct))]  # (source is ascending)
        needed = sum(
            pages(len(prompt))
            - (shared[d] // PAGE if d not in groups else 0)
            + (rows[d] - 1) * (pages(len(prompt)) - len(prompt) // PAGE)
            for d, prompt in enumerate(distinct)
        )
        return _Plan(take, unique, source, distinct, shared, groups, tokens, needed, resident)

    def _resident(self, distinct: list[list[int]]) -> tuple[Optional[int], list[int]]:
        """The newest row decoding (the queue is in token order, so the likeliest to begin as the next prompts do)
        and, per prompt of `distinct`, the positions of that row's full prompt pages it begins with (a multiple of
        `PAGE`; at least its last token left to compute): few-shot examples, an arm's system prompt, written once
        for all the prefills that need them while a row holds them."""
        live = [s for s in range(self.slots) if self.owner[s] >= 0]
        if not live:
            return None, [0] * len(distinct)
        newest = max(live, key=self.started.__getitem__)
        written = self.encoded[self.owner[newest]]  # (its prompt's entries are all in its pages)
        return newest, [min(common_prefix(written, prompt), len(prompt) - 1) // PAGE * PAGE for prompt in distinct]

    def prefill(self, free: list[int]):
        """Start the next prompts in the `free` slots, as many as their pages allow (`plan`, `reserve`), packed into
        one row without padding (up to `PREFILL_TOKENS` tokens a forward); their first tokens are chosen from the
        prefill's logits. Identical prompts are computed once, and so are the first tokens that prompts share
        (`shared_prefixes`), or, where that saves more, the first full pages they share with the newest row already
        decoding are its pages (`_resident`): the rest of each prompt attends to them in the cache. The full pages
        of those shared entries serve every row that shares them. A preempted row goes on from its last token, as it
        was."""
        start = time.perf_counter()
        while free and self.queue:
            room = len(self.pages.free) - self.reserve
            plan = self.plan(min(len(free), len(self.queue)))
            while plan.pages > room and plan.take > 1:  # fewer rows (in proportion) until their pages are free
                plan = self.plan(max(1, min(plan.take - 1, plan.take * room // plan.pages)))
            if plan.pages > room:
                break
            rows, self.queue = self.queue[: plan.take], self.queue[plan.take :]
            where, free = free[: plan.take], free[plan.take :]
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
                    self.pages.share(first, group_slot, shared[d] // PAGE)
                own[first] = len(self.pages.owned[first]) * PAGE
                self.pages.grow(first, pages(len(prompt)) - len(self.pages.owned[first]))
                for slot in slots_of[d][1:]:
                    self.pages.share(slot, first, len(prompt) // PAGE)
                    own[slot] = len(prompt) // PAGE * PAGE
                    self.pages.grow(slot, pages(len(prompt)) - len(prompt) // PAGE)
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
                pieces.append(prompt[shared[d] :])
                offsets.append(shared[d])
                targets += [(slot, len(pieces) - 1) for slot in slots_of[d]]
                history.append(slots_of[d][0])
                answers.append(len(pieces) - 1)
            self.counts["prefills"] += 1
            self.counts["prefill_tokens"] += sum(map(len, pieces))
            self.counts["prefill_shared"] += plan.take - len(plan.unique)
            self.counts["prefix_shared_tokens"] += plan.tokens - sum(map(len, pieces))
            temperatures, top_ps, seeds = self.settings
            lengths = [len(self._prompt(i)) for i in rows]
            attend = history if groups or plan.resident is not None else None
            if len(pieces) == 1 and len(pieces[0]) > PREFILL_TOKENS:  # a long prompt: its chunks but the last first
                yield from self._chunks(pieces[0][:-PREFILL_TOKENS], offsets[0], targets, own, history[0])
                offsets, pieces = [offsets[0] + len(pieces[0]) - PREFILL_TOKENS], [pieces[0][-PREFILL_TOKENS:]]
                attend = history
            forward = packed(self.pages, pieces, offsets, targets, own, answers, attend)
            forward.update(
                slots=where,
                lengths=lengths,
                seeds=[seeds[i] for i in rows],
                temperatures=[temperatures[i] for i in rows],
                top_ps=[top_ps[i] for i in rows],
                logit_rows=plan.source if len(plan.unique) < plan.take else None,
            )
            for slot, i, length in zip(where, rows, lengths):
                self.owner[slot], self.produced[slot], self.length[slot] = i, self.resumed.pop(i, []), length
                self.started[slot], self.starts = self.starts, self.starts + 1
            fresh = [slot for slot in where if not self.produced[slot]]
            # (resumed rows go on from their own last token and step, not the ones chosen)
            resumed = {slot: self.produced[slot] for slot in where if self.produced[slot]}
            # (the runner waits for the chosen tokens: the time below is the GPU's)
            tokens, chosen = yield self.step(prefill=Prefill(**forward, resumed=resumed))
            self.collect(fresh, tokens, chosen)
            self.counts["prefill_seconds"] += time.perf_counter() - start
            start = time.perf_counter()

    def _chunks(self, tokens: list[int], offset: int, targets: list, own: dict, history: int):
        """The forwards that write `tokens` (a long prompt's first tokens from position `offset`, its last
        `PREFILL_TOKENS` left for the forward that starts its rows) to the KV cache, `PREFILL_TOKENS` at a time:
        each attends to the entries before it in slot `history` (earlier chunks, a shared prefix) and starts no row."""
        for first in range(0, len(tokens), PREFILL_TOKENS):
            chunk, at = tokens[first : first + PREFILL_TOKENS], offset + first
            forward = packed(self.pages, [chunk], [at], targets, own, [], [history] if at else None)
            forward.update(slots=[], lengths=[], seeds=[], temperatures=[], top_ps=[])
            self.counts["prefills"] += 1
            yield self.step(prefill=Prefill(**forward))

    def make_room(self):
        """Give each row whose next entry starts a page a new page. Where too few are free, first collect the step
        in flight (rows it ended give theirs back), then preempt the newest rows."""
        while True:
            live = [s for s in range(self.slots) if self.owner[s] >= 0]
            short = [s for s in live if self.length[s] >= len(self.pages.owned[s]) * PAGE]
            if len(short) <= len(self.pages.free):
                break
            if self.pending is not None:
                self.collect_pending()
            else:
                self.preempt(max(live, key=self.started.__getitem__))
        for slot in short:
            self.pages.grow(slot, 1)
        self._count_pages()

    def preempt(self, slot: int) -> None:
        """Send `slot`'s row back to the front of the queue with the tokens it has produced, and free its pages: it
        goes on from those tokens (a prefill of its prompt and them) when pages are free again."""
        i = self.owner[slot]
        self.resumed[i] = self.produced[slot]
        self.queue.insert(0, i)
        self.free_slots([slot])
        self.counts["preempted"] += 1

    def free_slots(self, slots: list[int]) -> None:
        """`slots` serve no row: their pages go back, and (from the next plan on) their throwaway steps write in the
        scratch page."""
        for slot in slots:
            self.pages.release(slot)
            self.owner[slot], self.produced[slot], self.length[slot] = -1, [], 0
        self.released += slots

    def _count_pages(self) -> None:
        self.counts["peak_pages"] = max(self.counts["peak_pages"], self.pages.pages - 1 - len(self.pages.free))

    def decode(self):
        """One step for every slot (a free slot computes a throwaway token at its position 0, in the scratch
        page)."""
        self.make_room()
        live = [s for s in range(self.slots) if self.owner[s] >= 0]
        if not live:  # (the step in flight ended them all)
            return
        width = 0  # (the Triton kernel reads each row's own length)
        if self.widths:  # it attends over the longest live history, rounded up (few graph shapes)
            width = min(self.capacity, round_up(max(self.length[s] for s in live) + 1, WIDTH_STEP))
        self.counts["decode_steps"] += 1
        self.counts["slot_steps"] += self.slots
        self.counts["row_steps"] += len(live)  # row_steps / slot_steps: the slots' occupancy
        self.counts["kv_positions"] += sum(self.length[s] for s in live)  # the KV entries the step's rows read,
        self.counts["kv_shared_positions"] += self.pages.shared  # of which on pages another row also reads
        launched = yield self.step(decode=Decode(width))
        for slot in live:
            self.length[slot] += 1
        launched = (live, [self.owner[s] for s in live], launched)  # owners as they are now
        if self.pending is not None:
            self.collect_pending()
        self.pending = launched

    def collect_pending(self) -> None:
        """Collect the last decode step launched (its rows as they were then: a row that ended one step earlier
        has computed a token that is not its own)."""
        live, owners, launched = self.pending
        self.pending = None
        tokens, chosen = launched.result()
        self.collect([s for s, i in zip(live, owners) if self.owner[s] == i], tokens, chosen)

    def collect(self, slots: list[int], tokens: list[int], logprobs: Optional[list[float]] = None) -> None:
        """Record `tokens[slot]` (and its log-prob) for each of `slots`; a row that ends frees its slot and goes to
        `finished`."""
        freed = []
        for slot in slots:
            i, produced = self.owner[slot], self.produced[slot]
            produced.append(tokens[slot])
            if self.logprobs is not None:
                self.logprobs.setdefault(i, []).append(logprobs[slot])
            stop = tokens[slot] in self.eos_ids
            if stop or len(produced) >= self.limits[i]:
                body = produced[:-1] if stop else produced
                self.results[i] = Generation(
                    self.tokenizer.decode(body, skip_special_tokens=True), len(produced), "stop" if stop else "length"
                )
                if self.logprobs is not None:
                    self.results[i].prompt_ids, self.results[i].token_ids = list(self.encoded[i]), list(produced)
                    self.results[i].logprobs = self.logprobs.pop(i)
                self.real_tokens += len(produced)
                freed.append(slot)
                self.finished.append((i, self.results[i]))
        if freed:
            self.free_slots(freed)

    def keep(self, slots: list[int]):
        """Move the rows of `slots` into the first len(slots) slots (their page-table rows move, not their entries)."""
        yield self.step(keep=slots)
        self.pages.keep(slots)
        self.slots = len(slots)
        self.owner = [self.owner[s] for s in slots]
        self.started = [self.started[s] for s in slots]
        self.produced = [self.produced[s] for s in slots]
        self.length = [self.length[s] for s in slots]
