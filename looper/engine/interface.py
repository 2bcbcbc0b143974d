"""The generation interface: what rollouts and evaluation ask of a backend, and what it gives back.

Owns `Request` (one prompt with its token limit and sampling settings), `Generation` (one completion), `GenerationStats`
(the figures of one call, each defined once here) and `Generator` (the contract every backend keeps). Must never know
how a backend decodes.

A backend is a `Generator` subclass in one module, registered by name with `looper.engine.register`; rollout and eval
never name one. It must:

- return one `Generation` per request, in request order, calling `on_result(i, generation)` as request i finishes;
- count real tokens: generated tokens up to and including EOS, never padding;
- stop a row at an EOS id of `eos_ids(model, tokenizer)` or at its own `max_new_tokens` (`finish_reason` "stop" or
  "length"), and decode its text without special tokens;
- tokenize a prompt with exactly one BOS (`looper.prompts.encode_prompt`, as SFT and DPO see it);
- decode greedily where a request's temperature is 0; where it samples, draw from that request's own seed, so that its
  output does not depend on the other requests of the call (the `paged` backend's draws depend on the seed and step
  only; a backend that cannot promise it says so in its docstring);
- fill the `GenerationStats` fields it can measure and leave the others at their defaults;
- with `logprobs=True`, give each `Generation` its prompt ids, generated ids and each generated id's log-probability
  under the model's distribution at the row's temperature (1 where greedy), before top-p: what a forward pass of the
  same model over prompt and completion gives (`sampling.chosen_logprob`; online RL's sampling log-probs).

`tests/test_generation.py` registers a third backend in a few lines to show the seam.
"""

from dataclasses import dataclass, field, fields
from typing import Callable, Optional, Sequence


@dataclass(frozen=True)
class Request:
    prompt: str  # the rendered prompt (chat template or text template applied)
    max_new_tokens: int  # at most this many generated tokens, EOS included
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0  # nucleus mass when sampling
    seed: int = 0  # the row's own seed when sampling


@dataclass
class Generation:
    text: str  # decoded completion, special tokens removed
    num_tokens: int  # generated tokens up to and including EOS
    finish_reason: str  # "stop" (EOS) or "length" (hit max_new_tokens)
    prompt_ids: Optional[list] = None  # the prompt as the model saw it (one BOS), with `logprobs=True`
    token_ids: Optional[list] = None  # the generated ids up to and including EOS, with `logprobs=True`
    logprobs: Optional[list] = None  # per generated id: its log-probability (`sampling.chosen_logprob`)


def _figure(help: str, default=0, kept: bool = True):
    return field(default=default, metadata={"help": help, "kept": kept})


@dataclass
class GenerationStats:
    """The figures of one `Generator.generate` call. `kept` ones go to the artifact's `generation.rank<r>.jsonl`
    (`looper.throughput`), which merges calls and processes into the artifact's `generation` summary."""

    backend: str = _figure("Which backend ran the call.", "")
    sequences: int = _figure("Requests completed.")
    real_tokens: int = _figure("Generated tokens up to and including EOS, never padding.")
    seconds: float = _figure("Wall-clock seconds inside the call (model loading and scoring not counted).", 0.0)
    prefills: int = _figure("Prefill forwards.")
    prefill_tokens: int = _figure("Prompt tokens computed by the prefills (shared prefixes counted once).")
    prefill_seconds: float = _figure("Seconds spent in prefills (compute-bound).", 0.0)
    prefill_shared: int = _figure("Rows whose identical prompt another row of the prefill computed.", kept=False)
    prefix_shared_tokens: int = _figure("Prompt tokens not computed because a prefix was shared.", kept=False)
    decode_steps: int = _figure("Decode steps.")
    slot_steps: int = _figure("Slots the decode steps ran (decode_steps x slots).")
    row_steps: int = _figure("Live rows the decode steps ran; row_steps / slot_steps is the slots' occupancy.")
    drain_steps: int = _figure("Decode steps after the last request started.", kept=False)
    drain_seconds: float = _figure("Seconds after the last request started (ever fewer rows a step).", 0.0)
    slots: int = _figure("Rows decoding together (the batch size, at most the requests).")
    kv_pages: int = _figure("Pages in the KV cache's pool.")
    peak_pages: int = _figure("Most KV pages in use at once.")
    preempted: int = _figure("Times a row's KV pages were taken back; it resumed later from its tokens.")
    kv_positions: int = _figure("KV entries the decode steps' rows read.", kept=False)
    kv_shared_positions: int = _figure("Of those, entries on pages another row also reads.", kept=False)
    graphs: int = _figure("CUDA graphs captured.", kept=False)
    capture_seconds: float = _figure("Seconds spent capturing CUDA graphs.", 0.0, kept=False)
    graph_failure: Optional[str] = _figure(
        "Why CUDA graph capture failed (decoding went on without graphs).", None, kept=False
    )
    kernel: Optional[str] = _figure("The decode step's attention kernel.", None)
    compiled_decode: bool = _figure("Whether the decode step ran through torch.compile.", False, kept=False)
    merged_projections: int = _figure(
        "Attention layers whose q, k and v projections ran as one product (on a GPU).", 0, kept=False
    )
    triton_rotary: bool = _figure("Whether the rotary embedding ran as looper's Triton kernel.", False, kept=False)
    compiled_prefill: list = field(
        default_factory=list, metadata={"help": "What the prefills ran through torch.compile.", "kept": False}
    )

    def kept(self) -> dict:
        """The figures an artifact keeps, by name (`looper.throughput.record`)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.metadata["kept"]}

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


class Generator:
    """Completes requests with one model. Built once per model by `looper.engine.build` from `cfg.generation`; see the
    module docstring for the contract."""

    name = "?"

    def __init__(self, model, tokenizer, batch_size: int, refill_at: float = 0.125, compile_decode: bool = False):
        self.model, self.tokenizer = model, tokenizer
        self.batch_size, self.refill_at, self.compile_decode = batch_size, refill_at, compile_decode

    def generate(
        self,
        requests: Sequence[Request],
        on_result: Optional[Callable[[int, Generation], None]] = None,
        desc: Optional[str] = None,
        logprobs: bool = False,
    ) -> tuple[list[Generation], GenerationStats]:
        """Complete `requests`; returns their generations in request order and the call's figures. `desc` names a
        progress bar (None: no bar); `logprobs` adds the ids and their log-probabilities to each generation."""
        raise NotImplementedError

    @staticmethod
    def check(requests: Sequence[Request]) -> None:
        """The checks every backend makes on its requests."""
        if any(r.max_new_tokens < 1 for r in requests):
            raise ValueError(f"max_new_tokens must be >= 1, got {min(r.max_new_tokens for r in requests)}")


def eos_ids(model, tokenizer) -> list[int]:
    """The token ids that end a row: the model's generation config's and the tokenizer's EOS."""
    configured = model.generation_config.eos_token_id
    ids = configured if isinstance(configured, list) else [configured] if configured is not None else []
    return sorted(set(ids) | {tokenizer.eos_token_id})


def is_quantized(model) -> bool:
    """Whether `model`'s weights are quantized (bitsandbytes, or a checkpoint saved quantized)."""
    return bool(
        getattr(model, "is_quantized", False) or getattr(getattr(model, "config", None), "quantization_config", None)
    )
