"""The `paged` backend: looper's own engine, the default wherever its start-up checks pass.

Decoding runs on `batch_size` slots with continuous refill (`scheduler`): when rows finish (EOS or their own token
limit) their slots take the next prompts, so a finished row stops costing decode steps. The KV cache is paged
(`cache`): a row holds pages of 16 positions as it grows, not its worst case, so rows decode together where their real
lengths fit in free memory even when their worst cases would not; where a step finds too few pages the newest row is
preempted and resumes later from its tokens, with the same draws. A prefill packs its prompts into one row without
padding; identical prompts, and the first tokens that prompts share (an arm's system prompt, few-shot examples, a
trajectory cut at several points), are computed once. A decode step reads each row's own history only (on a GPU a
Triton kernel that follows the page table, `kernels.attention`) and is replayed as a CUDA graph (`runner`). On a GPU
the model's RMSNorms and rotary embedding run as Triton kernels in eager forwards (`kernels.fused`).

Sampling is seeded per row (`sampling.seeded_choice`): a row's draws depend on its own seed and step only, never on
which rows share its batch, their order, padding, the batch size or the number of processes, so a resumed or sharded
rollout produces exactly the records of an uninterrupted single-process one. Greedy decoding equals plain
`model.generate` in float32 (tests/test_generation.py on the CPU; `scripts/bench_gpu.py --check-greedy` and
`scripts/greedy_check.py` on a GPU); in bfloat16 the fast kernels' different summation order flips a few near-tied
argmaxes, about as often as batching plain `generate` does.

Must never read the config or know rollouts from evaluations: it completes requests.
"""

import logging
import time
from typing import Callable, Optional, Sequence, Union

import torch
from tqdm.auto import tqdm

from looper.engine.cache import PAGE, KVStorage
from looper.engine.interface import Generation, GenerationStats, Generator, Request, eos_ids
from looper.engine.runner import AttentionSwitch, ModelRunner
from looper.engine.sampling import MASK32
from looper.engine.scheduler import Scheduler
from looper.prompts import encode_prompt

log = logging.getLogger(__name__)


class PagedGenerator(Generator):
    """looper's engine (see the module docstring)."""

    name = "paged"

    def generate(
        self,
        requests: Sequence[Request],
        on_result: Optional[Callable[[int, Generation], None]] = None,
        desc: Optional[str] = None,
        logprobs: bool = False,
    ) -> tuple[list[Generation], GenerationStats]:
        self.check(requests)
        figures = {}
        results = generate(
            self.model,
            self.tokenizer,
            [r.prompt for r in requests],
            max_new_tokens=[r.max_new_tokens for r in requests],
            batch_size=self.batch_size,
            temperature=[r.temperature for r in requests],
            top_p=[r.top_p for r in requests],
            seeds=[r.seed for r in requests],
            refill_at=self.refill_at,
            on_result=on_result,
            stats=figures,
            desc=desc,
            compile_decode=self.compile_decode,
            logprobs=logprobs,
        )
        return results, GenerationStats(**figures) if figures else GenerationStats(backend=self.name)


def _per_row(value: Union[float, Sequence[float]], n: int) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value] * n


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: list[str],
    *,
    max_new_tokens: Union[int, Sequence[int]],
    batch_size: int,
    temperature: Union[float, Sequence[float]] = 0.0,
    top_p: Union[float, Sequence[float]] = 1.0,
    seeds: Optional[Sequence[int]] = None,
    add_special_tokens: Optional[bool] = None,
    refill_at: float = 0.125,
    on_result: Optional[Callable[[int, Generation], None]] = None,
    stats: Optional[dict] = None,
    desc: Optional[str] = "generate",
    compile_decode: bool = False,
    logprobs: bool = False,
) -> list[Generation]:
    """The engine called directly (tests and benchmarks; the pipeline goes through `PagedGenerator`): complete each
    prompt, `batch_size` rows decoding at a time, greedy where a row's temperature is 0, else sampled with that row's
    `temperature`, `top_p` and seed (each one per prompt, or one value for all). `max_new_tokens` may be per row. Freed
    slots are refilled once a `refill_at` share of them is free (one prefill serves them all). `on_result(i,
    generation)` is called as prompt i finishes; `stats`, a dict, receives the `GenerationStats` fields. `desc=None`
    shows no progress bar. `compile_decode` runs the decode step's model forward through torch.compile; `logprobs` gives
    each generation its ids and their log-probabilities (`interface.Generation`). Prompts are tokenized with exactly one
    BOS (`prompts.encode_prompt`) unless `add_special_tokens` says otherwise."""
    n = len(prompts)
    temperatures, top_ps = _per_row(temperature, n), _per_row(top_p, n)
    limits = _per_row(max_new_tokens, n)
    if any(t > 0 for t in temperatures) and (seeds is None or len(seeds) != n):
        raise ValueError("sampling needs one seed per prompt")
    if min(limits, default=1) < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {min(limits)}")
    if n == 0:
        return []
    encoded = (
        [encode_prompt(tokenizer, p) for p in prompts]
        if add_special_tokens is None
        else tokenizer(prompts, add_special_tokens=add_special_tokens)["input_ids"]
    )
    with AttentionSwitch(model):
        scheduler, runner = engine_for(
            model,
            tokenizer,
            encoded,
            limits,
            [float(t) for t in temperatures],
            [float(p) for p in top_ps],
            [s & MASK32 for s in (seeds or [0] * n)],
            # compiled: never one slot (a size-1 dimension would be compiled again)
            max(min(batch_size, n), 2 if compile_decode else 1),
            compile_decode,
            logprobs,
        )
        bar = tqdm(total=n, desc=desc, unit="seq", leave=False, disable=desc is None)
        start = time.time()
        try:
            for i, result in execute(scheduler.steps(refill_at), scheduler, runner):
                bar.update(1)
                bar.set_postfix(
                    tok_per_s=f"{scheduler.real_tokens / max(time.time() - start, 1e-9):.0f}", refresh=False
                )
                if on_result is not None:
                    on_result(i, result)
        finally:
            runner.close()
        bar.close()
    counts = scheduler.counts
    if counts["preempted"]:
        log.info(
            "generation: %d times a row's KV pages were taken back and it resumed later (recomputing its "
            "prompt and tokens); a smaller batch size avoids that",
            counts["preempted"],
        )
    if stats is not None:
        stats.update(
            GenerationStats(
                backend=PagedGenerator.name,
                sequences=n,
                real_tokens=scheduler.real_tokens,
                seconds=time.time() - start,
                graphs=runner.graph_count,
                capture_seconds=runner.capture_seconds,
                graph_failure=runner.graph_failure,
                kernel=runner.kernel,
                compiled_decode=runner.compiled,
                **runner.fused,
                **counts,
            ).as_dict()
        )
    return scheduler.results


def engine_for(model, tokenizer, encoded, limits, temperatures, top_ps, seeds, slots, compile_decode, logprobs=False):
    """(scheduler, runner) of one generate call over the token lists `encoded` (per row its token limit and sampling
    settings), `slots` rows decoding at a time: the scheduler sizes the page pool, the runner holds the KV storage
    of that many pages. Call inside `AttentionSwitch(model)`."""
    text = model.config.get_text_config()
    kernel = ModelRunner.decode_kernel(model)
    scheduler = Scheduler(
        model,
        tokenizer,
        encoded,
        limits,
        temperatures,
        top_ps,
        seeds,
        slots,
        eos_ids(model, tokenizer),
        kernel != "triton",
    )
    storage = KVStorage(text.num_hidden_layers, slots, scheduler.pages.pages, scheduler.capacity // PAGE, model.device)
    sampled, nucleus = any(t > 0 for t in temperatures), any(p < 1 for p in top_ps)
    runner = ModelRunner(model, storage, sampled, nucleus, compile_decode, logprobs)
    if logprobs:
        scheduler.keep_logprobs()
    return scheduler, runner


def execute(steps, scheduler: Scheduler, runner: ModelRunner):
    """Run the plans the scheduler's generator `steps` yields on `runner`, handing each result back; yields
    (prompt index, Generation) as rows finish."""
    output = None
    while True:
        try:
            step = steps.send(output)
        except StopIteration:
            break
        output = runner.execute(step)
        yield from scheduler.take_finished()
    yield from scheduler.take_finished()
