"""The one generation path, shared by rollouts and evaluation.

Prompts are sorted by length (longest first, so an out-of-memory shows in the first batch, and rows of a batch need
little padding), left-padded, and decoded in batches with `model.generate`; results come back in input order.
Counts are of real tokens: generated tokens up to and including EOS, never padding.

Sampling is seeded per row (`SeededSampling`): a row's draws depend on its own seed only, never on which rows share
its batch, their order, padding, the batch size or the number of processes. So a resumed or sharded rollout produces
exactly the records of an uninterrupted single-process one.
"""

import time
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
from tqdm.auto import tqdm
from transformers import LogitsProcessor, LogitsProcessorList

_MASK32 = 0xFFFFFFFF


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mix (xorshift-multiply) on int64 tensors; constants < 2^31 keep products below 2^63, so the
    result is exact and identical on every device."""
    x = x & _MASK32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x2C1B3C6D) & _MASK32
    return x ^ (x >> 16)


class SeededSampling(LogitsProcessor):
    """Temperature + top-p sampling, row by row reproducible: returns Gumbel-perturbed logits whose argmax (greedy
    decoding) is a sample from the filtered distribution. The Gumbel noise is a hash of (row seed, step, token id)."""

    def __init__(self, seeds: Sequence[int], temperatures: Sequence[float], top_ps: Sequence[float], start: int):
        self.seeds = torch.tensor([s & _MASK32 for s in seeds], dtype=torch.int64)
        self.temperatures = torch.tensor(temperatures, dtype=torch.float32)
        self.top_ps = torch.tensor(top_ps, dtype=torch.float32)
        self.start = start  # prompt length (padded): step = current length - start

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        device = scores.device
        logits = scores.float() / self.temperatures.to(device)[:, None]
        if bool((self.top_ps < 1).any()):
            ordered, order = logits.sort(dim=-1, descending=True)
            probs = ordered.softmax(dim=-1)
            drop_sorted = probs.cumsum(dim=-1) - probs > self.top_ps.to(device)[:, None]  # the top token stays
            logits = logits.masked_fill(torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted), float("-inf"))
        step = input_ids.shape[1] - self.start
        row = _hash32(_hash32(self.seeds.to(device)) ^ step)
        tokens = torch.arange(scores.shape[-1], device=device, dtype=torch.int64)
        bits = _hash32(row[:, None] + tokens[None, :] * 0x9E3779B1) >> 8  # 24 bits: exact in float32
        uniform = (bits.float() + 0.5) / 2.0 ** 24  # strictly inside (0, 1)
        return logits - torch.log(-torch.log(uniform))


@dataclass
class Generation:
    text: str  # decoded completion, special tokens removed
    num_tokens: int  # generated tokens up to and including EOS
    finish_reason: str  # "stop" (EOS) or "length" (hit max_new_tokens)


def _per_row(value: Union[float, Sequence[float]], n: int) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value] * n


class RowLimits(LogitsProcessor):
    """Per-row generation limits: row i is ended (EOS forced) after `limits[i]` new tokens."""

    def __init__(self, limits: Sequence[int], start: int, eos_id: int):
        self.limits, self.start, self.eos_id = torch.tensor(limits), start, eos_id

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        done = (input_ids.shape[1] - self.start) >= self.limits.to(scores.device)
        if done.any():
            scores[done] = float("-inf")
            scores[done, self.eos_id] = 0.0
        return scores


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], *, max_new_tokens: Union[int, Sequence[int]], batch_size: int,
             temperature: Union[float, Sequence[float]] = 0.0, top_p: Union[float, Sequence[float]] = 1.0,
             seeds: Optional[Sequence[int]] = None, add_special_tokens: bool = True, cache: str = "dynamic",
             desc: Optional[str] = "generate") -> list[Generation]:
    """Complete each prompt: greedy when every temperature is 0, else sampled with per-row `temperature`, `top_p`
    and `seeds` (one each per prompt, or one value for all). `max_new_tokens` may be per row. `cache="static"` uses
    a static KV cache with compiled decoding; prompt lengths are then padded to multiples of 64 so that few shapes
    compile. `desc=None` shows no progress bar (the caller has one)."""
    temperatures, top_ps = _per_row(temperature, len(prompts)), _per_row(top_p, len(prompts))
    limits = _per_row(max_new_tokens, len(prompts))
    sampling = any(t > 0 for t in temperatures)
    if sampling and (seeds is None or len(seeds) != len(prompts) or min(temperatures) <= 0):
        raise ValueError("sampling needs one seed per prompt and temperatures > 0 for every row")
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    results: list[Optional[Generation]] = [None] * len(prompts)
    eos_ids = _eos_ids(model, tokenizer)
    bar = tqdm(total=len(prompts), desc=desc, unit="seq", leave=False, disable=desc is None)
    start, real_tokens = time.time(), 0
    for first in range(0, len(order), batch_size):
        rows = order[first:first + batch_size]
        encoded = tokenizer([prompts[i] for i in rows], return_tensors="pt", padding=True,
                            pad_to_multiple_of=64 if cache == "static" else None,
                            add_special_tokens=add_special_tokens).to(model.device)
        prompt_length = encoded["input_ids"].shape[1]
        row_limits = [limits[i] for i in rows]
        processors = LogitsProcessorList()
        if len(set(row_limits)) > 1:
            processors.append(RowLimits(row_limits, prompt_length, eos_ids[0]))
        if sampling:
            processors.append(SeededSampling([seeds[i] for i in rows], [temperatures[i] for i in rows],
                                             [top_ps[i] for i in rows], prompt_length))
        output = model.generate(**encoded, max_new_tokens=max(row_limits), pad_token_id=tokenizer.pad_token_id,
                                eos_token_id=eos_ids, do_sample=False, temperature=None, top_p=None, top_k=None,
                                logits_processor=processors,
                                **({"cache_implementation": "static"} if cache == "static" else {}))
        for i, tokens in zip(rows, output[:, prompt_length:].tolist()):
            results[i] = _finish(tokenizer, tokens, eos_ids, limits[i])
            real_tokens += results[i].num_tokens
        bar.update(len(rows))
        bar.set_postfix(tok_per_s=f"{real_tokens / max(time.time() - start, 1e-9):.0f}")
    bar.close()
    if cache == "static" and getattr(model, "_cache", None) is not None:
        model._cache = None  # transformers keeps the static cache on the model: free it for whatever runs next
    return results


def _eos_ids(model, tokenizer) -> list[int]:
    configured = model.generation_config.eos_token_id
    ids = configured if isinstance(configured, list) else [configured] if configured is not None else []
    return sorted(set(ids) | {tokenizer.eos_token_id})


def _finish(tokenizer, tokens: list[int], eos_ids: list[int], limit: int) -> Generation:
    # After a row's EOS, generate pads it; a row with no EOS ran to its limit (an EOS at the limit was forced).
    for position, token in enumerate(tokens[:limit + 1]):
        if token in eos_ids:
            if position == limit:
                break
            return Generation(tokenizer.decode(tokens[:position], skip_special_tokens=True), position + 1, "stop")
    return Generation(tokenizer.decode(tokens[:limit], skip_special_tokens=True), min(limit, len(tokens)), "length")
