"""The model runner: carries out the scheduler's plans (`plan.Step`), every forward the paged engine makes, and
holds the device-side state of its slots.

Owns the execution of a step (`execute`: slots released, page-table changes applied, halving, then a prefill forward
(prompts packed into one row, their KV entries written where the plan says) or a decode step (one token for every
slot, replayed as a CUDA graph on a GPU, its model forward optionally through torch.compile)), the KV storage's
tensors, the slots' device state (KV length, step, seed, temperature, top-p, last token) and the switch of the model
to `looper.engine.kernels.attention` for the duration of a generate call. Must never decide which rows run (the
scheduler does) or hand out KV pages (the allocator does).
"""

import functools
import inspect
import logging
import time
from typing import Optional

import torch

from looper.engine import sampling
from looper.engine.cache import PAGE, KVStorage, head_dim, on
from looper.engine.interface import is_quantized
from looper.engine.kernels import attention, fused
from looper.engine.plan import Prefill, Step

log = logging.getLogger(__name__)

# on a GPU, q, k and v as one product (`fused.MergedProjections`); the benchmark can turn it off
MERGE_PROJECTIONS = True


class AttentionSwitch:
    """Within it, `model` attends with `looper.engine.kernels.attention` (registered with transformers' attention
    interface); its own implementation (sdpa, eager, flash_attention_2) is restored afterwards."""

    def __init__(self, model):
        self.model, self.original = model, model.config._attn_implementation

    def __enter__(self):
        attention.register()
        self.model.set_attn_implementation(attention.GENERATION)

    def __exit__(self, *exc):
        self.model.set_attn_implementation(self.original)


_CACHE_KEYWORD: dict = {}  # model class -> its forward's name for the KV cache (filled outside torch.compile)


def cache_keyword(model) -> str:
    """The forward's name for the KV cache: `cache` in the transformers releases that renamed it (where the old
    `past_key_values` warns that it goes in 5.40), `past_key_values` before; a PEFT model's is its base model's (it
    passes the keyword on). Looked up once per class, by the runner, so the compiled decode step only reads a dict."""
    if type(model) not in _CACHE_KEYWORD:
        base = getattr(model, "get_base_model", lambda: model)()
        names = inspect.signature(type(base).forward).parameters
        _CACHE_KEYWORD[type(model)] = "cache" if "cache" in names else "past_key_values"
    return _CACHE_KEYWORD[type(model)]


def logits_at(model, cache, ids, positions, keep, **attention_args):
    """The model's logits at `keep` (a count from the end, or the positions) of `ids`, with `cache` as its KV cache
    and the `looper.engine.kernels.attention` arguments (`looper_packed` for a prefill, `looper_decode` for a decode
    step)."""
    return model(
        input_ids=ids,
        position_ids=positions,
        **{_CACHE_KEYWORD.get(type(model)) or cache_keyword(model): cache},
        use_cache=True,
        logits_to_keep=keep,
        **attention_args,
    ).logits


def decode_logits(model, cache, tokens, lengths, step):
    """The logits [slots, vocab] of one decode step: each slot's token at position `lengths`."""
    return logits_at(model, cache, tokens[:, None], lengths[:, None], 1, looper_decode=step)[:, -1]


@functools.lru_cache(maxsize=None)
def compiled_decode_logits(backend: str):
    """`decode_logits` through torch.compile, one per process: inductor fuses the step's hundreds of small elementwise
    kernels (RMSNorm, rotary embedding, SiLU, residual adds) into a few. Shapes are dynamic (one compilation serves
    every slot count), and the runner's CUDA graph capture replays the compiled kernels as it does eager ones. The
    prefill's forward as a whole stays eager (its attention and cache writes vary in shape from one prefill to the
    next); only its MLPs are compiled (`fused.compiled_patches`), and its rotary embedding where looper's Triton kernel
    does not serve. What compiling costs and gains is measured in docs/performance.md."""
    return torch.compile(decode_logits, dynamic=True, backend=backend)


class Pending:
    """A decode step in flight: its tokens (and log-probs) copied to the host without waiting; `result()` waits."""

    def __init__(self, tokens: torch.Tensor, logprobs: Optional[torch.Tensor]):
        self.done = None
        if tokens.is_cuda:
            self.tokens = tokens.to("cpu", non_blocking=True)  # (into pinned memory)
            self.logprobs = logprobs.to("cpu", non_blocking=True) if logprobs is not None else None
            self.done = torch.cuda.Event()
            self.done.record()
        else:
            self.tokens, self.logprobs = tokens.clone(), logprobs.clone() if logprobs is not None else None

    def result(self) -> tuple[list[int], Optional[list[float]]]:
        if self.done is not None:
            self.done.synchronize()
        return self.tokens.tolist(), self.logprobs.tolist() if self.logprobs is not None else None


class ModelRunner:
    """The forwards of one generate call over `storage`, and the slots' device state: `state` (per slot its KV length,
    which is its next write position and token position; whether it is live; its step; its sampling settings),
    `tokens` (each slot's last token, the next step's input) and `next_tokens` (what the step chose); with
    `logprobs`, `chosen_logprobs` / `next_logprobs` (their log-probabilities, `sampling.chosen_logprob`)."""

    def __init__(
        self, model, storage: KVStorage, sampling_rows: bool, nucleus: bool, compile_decode: bool, logprobs=False
    ):
        self.model, self.storage, self.device = model, storage, model.device
        self.logprobs = logprobs
        self.sampling, self.nucleus = sampling_rows, nucleus
        cache_keyword(model)
        quantized = is_quantized(model)
        if compile_decode and quantized:  # bitsandbytes layers are neither captured nor compiled here
            log.warning("generation.compile: not for a quantized model; decoding uncompiled")
            compile_decode = False
        self.compiled = compile_decode
        self.decode_logits = compiled_decode_logits(fused.COMPILE_BACKEND) if compile_decode else decode_logits
        # in eager forwards (GPU): RMSNorm (bf16/fp16) and the rotary embedding (bf16) as one Triton kernel each;
        # with compile_decode, the prefills' MLPs (and the rotary embedding where the kernel is not used) compiled
        rotary = fused.fused_rotary(model)
        mlps, modeling = fused.compilable_parts(model) if compile_decode else ([], [])
        modeling = [python for python in modeling if python not in rotary]
        eager = fused.norm_patches(fused.fused_norms(model)) + fused.rotary_patches(rotary)
        merge = MERGE_PROJECTIONS and self.device.type == "cuda" and not quantized
        self.merged = fused.MergedProjections(model) if merge else None  # (until `close`)
        eager += self.merged.patches if self.merged else []
        self.prefill_patches = eager + fused.compiled_patches(mlps, modeling)
        self.step_patches = [] if compile_decode else eager  # (a compiled step fuses them itself)
        self.fused = {
            "merged_projections": len(self.merged.groups) if self.merged else 0,
            "triton_rotary": bool(rotary),
            "compiled_prefill": sorted({type(m).__name__ for m in mlps}) + ["apply_rotary_pos_emb"] * bool(modeling),
        }
        # CUDA graphs replay a decode step without Python and kernel-launch overhead (which otherwise bounds the step
        # time of a 7B model); one graph per slot count (and, for the sdpa kernel, width), captured on first use
        self.graphs: dict = {}
        self.pool = None
        self.use_graphs = self.device.type == "cuda" and not quantized
        self.graph_count, self.capture_seconds, self.graph_failure = 0, 0.0, None
        shape = self.shape(model)
        self.packed_kernel, self.kernel = attention.kernels(*shape)
        self.prefix_kernel = attention.prefix_kernel(*shape)
        self.width = 0  # positions every slot's attention covers in a decode step (sdpa and flash kernels)
        slots, zeros = storage.table.shape[0], dict(dtype=torch.long, device=self.device)
        self.state = {
            "length": torch.zeros(slots, **zeros),
            "live": torch.zeros(slots, **zeros),
            "step": torch.zeros(slots, **zeros),
            "seed": torch.zeros(slots, **zeros),
            "temperature": torch.zeros(slots, device=self.device),
            "top_p": torch.ones(slots, device=self.device),
        }
        self.tokens = torch.zeros(slots, **zeros)
        self.next_tokens = torch.zeros(slots, **zeros)
        self.chosen_logprobs = torch.zeros(slots, device=self.device)
        self.next_logprobs = torch.zeros(slots, device=self.device)

    def close(self) -> None:
        """Give the model back as it was (`MergedProjections.restore`); the runner is not used after."""
        if self.merged is not None:
            self.merged.restore()
            self.merged = None

    @staticmethod
    def shape(model) -> tuple:
        """What the attention kernels are chosen by: device, dtype, heads, KV heads, head size."""
        text = model.config.get_text_config()
        kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
        return model.device, model.dtype, text.num_attention_heads, kv_heads, head_dim(model)

    @classmethod
    def decode_kernel(cls, model) -> str:
        """The decode step's attention kernel for `model` (`kernels.attention.kernels`, chosen once per shape)."""
        return attention.kernels(*cls.shape(model))[1]

    # ------------------------------------------------------------------------------------------------ a step

    def execute(self, step: Step):
        """Carry out `step` (`plan.Step`, in its order). A prefill returns every slot's last token and its log-prob
        (with `logprobs`) on the host, having waited for them; a decode step returns a `Pending`, without waiting."""
        if step.release:
            self.stop(step.release)
        if step.table is not None:
            self.storage.apply(step.table)
        if step.keep is not None:
            self.keep(step.keep)
        if step.prefill is not None:
            self.prefill(step.prefill)
            chosen = self.chosen_logprobs.tolist() if self.logprobs else None
            return self.tokens.tolist(), chosen
        if step.decode is not None:
            self.decode(step.decode.width)
            return Pending(self.tokens, self.chosen_logprobs if self.logprobs else None)
        return None

    # ------------------------------------------------------------------------------------------------ prefill

    def prefill(self, plan: Prefill) -> None:
        """One prefill forward (`plan.Prefill`), then its rows start with their first tokens chosen from its logits."""
        # (every copy to the device without waiting: `cache.on`; the forward's launches then follow each other)
        to = functools.partial(on, self.device)
        starts = torch.tensor(plan.starts)
        longest = int(starts.diff().max())
        history = to(plan.history) if plan.history is not None else None
        packed = attention.Packed(
            self.packed_kernel if history is None else self.prefix_kernel,
            to(starts, torch.int32),
            longest,
            history,
            plan.key_lengths,
            storage=self.storage,
            entries=to(plan.entries),
            sources=to(plan.sources) if plan.sources is not None else None,
        )
        with fused.Patched(self.prefill_patches):
            logits = logits_at(
                self.model,
                self.storage,
                to(plan.ids)[None],
                to(plan.positions)[None],
                to((starts[1:] - 1)[plan.answers]),
                looper_packed=packed,
            )[0]
        if not plan.slots:  # (a long prompt's chunk before its last: entries written, no row starts)
            return
        if plan.logit_rows is not None:  # (identical prompts: one logits row serves several)
            logits = logits[to(plan.logit_rows)]
        self.start(plan.slots, plan.lengths, plan.seeds, plan.temperatures, plan.top_ps, logits)
        if plan.resumed:  # resumed rows: their own last token and step, not the ones chosen
            self.resume(list(plan.resumed), list(plan.resumed.values()))

    def start(
        self,
        slots: list[int],
        lengths: list[int],
        seeds: list[int],
        temperatures: list[float],
        top_ps: list[float],
        logits: torch.Tensor,
    ) -> None:
        """Rows start in `slots` with their prompts' `lengths` and sampling settings; their first tokens (in `tokens`)
        are chosen from the prefill's `logits` (one row each)."""
        to = functools.partial(on, self.device)
        where = to(slots)
        self.state["length"][where] = to(lengths)
        self.state["live"][where] = 1
        self.state["step"][where] = 0
        self.state["seed"][where] = to(seeds)
        self.state["temperature"][where] = to(temperatures, torch.float32)
        self.state["top_p"][where] = to(top_ps, torch.float32)
        state = self.state
        self.tokens[where] = sampling.seeded_choice(
            logits,
            state["seed"][where],
            state["step"][where],
            state["temperature"][where],
            state["top_p"][where],
            self.sampling,
            self.nucleus,
        )
        if self.logprobs:
            chosen = sampling.chosen_logprob(logits, self.tokens[where], state["temperature"][where])
            self.chosen_logprobs[where] = chosen
        state["step"][where] += 1

    def resume(self, slots: list[int], produced: list[list[int]]) -> None:
        """Rows resumed after a preemption go on from their own last token and step, not the ones just chosen."""
        to = functools.partial(on, self.device)
        self.tokens[to(slots)] = to([tokens[-1] for tokens in produced])
        self.state["step"][to(slots)] = to([len(tokens) for tokens in produced])

    def stop(self, slots: list[int]) -> None:
        """`slots` serve no row: their throwaway steps write at position 0 of their table rows (the scratch page)."""
        where = on(self.device, slots)
        self.state["length"][where] = 0
        self.state["live"][where] = 0

    def keep(self, slots: list[int]) -> None:
        """Keep only `slots`' state and page-table rows, in that order."""
        self.storage.keep(slots)
        where = on(self.device, slots)
        self.state = {k: v[where] for k, v in self.state.items()}
        self.tokens, self.next_tokens = self.tokens[where], self.next_tokens[where]
        self.chosen_logprobs, self.next_logprobs = self.chosen_logprobs[where], self.next_logprobs[where]
        # the graphs read the old tensors; their pool goes with them (capturing into a pool whose graphs are all gone
        # trips an allocator assertion)
        self.graphs.clear()
        self.pool = None

    # ------------------------------------------------------------------------------------------------ decode

    def decode(self, width: int) -> None:
        """One decode step for every slot, attending over `width` positions (sdpa and flash kernels): each slot's
        chosen token becomes its next input, and live slots advance one position."""
        self.width = width
        if self.use_graphs:
            self._replay()
        else:
            self._step()
        self.tokens.copy_(self.next_tokens)
        if self.logprobs:
            self.chosen_logprobs.copy_(self.next_logprobs)
        self.state["length"] += self.state["live"]
        self.state["step"] += 1

    def _step(self) -> None:
        """The decode step proper: reads `tokens` and the slot state, writes the KV entries and `next_tokens` (the
        body of the CUDA graphs; running it twice with the same state writes the same values)."""
        state, table = self.state, self.storage.table
        page = table.gather(1, (state["length"] // PAGE)[:, None])[:, 0].long()
        written = page * PAGE + state["length"] % PAGE
        lengths = (state["length"] + 1).to(torch.int32)
        step = attention.DecodeStep(self.kernel, lengths, self.width, table, PAGE, self.storage, written)
        with fused.Patched(self.step_patches):
            logits = self.decode_logits(self.model, self.storage, self.tokens, state["length"], step)
        self.next_tokens.copy_(
            sampling.seeded_choice(
                logits, state["seed"], state["step"], state["temperature"], state["top_p"], self.sampling, self.nucleus
            )
        )
        if self.logprobs:
            self.next_logprobs.copy_(sampling.chosen_logprob(logits, self.next_tokens, state["temperature"]))

    def _replay(self) -> None:
        shape = (self.storage.table.shape[0], self.width)
        if shape not in self.graphs:
            try:
                start = time.perf_counter()
                self.graphs[shape] = self._capture()
                self.graph_count += 1
                self.capture_seconds += time.perf_counter() - start
            except Exception as error:  # a model that cannot be captured still decodes, eagerly
                log.warning("generation: CUDA graph capture failed (%s); decoding without graphs", error)
                self.graph_failure = repr(error)[:300]
                self.use_graphs = False
                self._step()
                return
        self.graphs[shape].replay()

    def _capture(self):
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()  # one memory pool for the graphs of these slots
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self._step()  # warm-up outside the graph (lazy library initialisation); it writes what the replay will
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            self._step()
        return graph
