"""The one generation path, shared by rollouts and evaluation.

Prompts are sorted by length (longest first, so an out-of-memory shows in the first batch, and rows of a batch need
little padding), left-padded, and decoded in batches with `model.generate`; results come back in input order.
Counts are of real tokens: generated tokens up to and including EOS, never padding.
"""

import time
from dataclasses import dataclass
from typing import Optional

import torch
from tqdm.auto import tqdm


@dataclass
class Generation:
    text: str  # decoded completion, special tokens removed
    num_tokens: int  # generated tokens up to and including EOS
    finish_reason: str  # "stop" (EOS) or "length" (hit max_new_tokens)


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], *, max_new_tokens: int, batch_size: int,
             temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, add_special_tokens: bool = True,
             desc: str = "generate", progress: Optional[tqdm] = None) -> list[Generation]:
    """Complete each prompt; greedy when temperature is 0, else sampling seeded by `seed` and the batch index."""
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    results: list[Optional[Generation]] = [None] * len(prompts)
    eos_ids = _eos_ids(model, tokenizer)
    bar = progress or tqdm(total=len(prompts), desc=desc, unit="seq", leave=False)
    start, real_tokens = time.time(), 0
    for batch_index, first in enumerate(range(0, len(order), batch_size)):
        rows = order[first:first + batch_size]
        encoded = tokenizer([prompts[i] for i in rows], return_tensors="pt", padding=True,
                            add_special_tokens=add_special_tokens).to(model.device)
        sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else {
            "do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        if temperature > 0:
            torch.manual_seed(seed * 1_000_003 + batch_index)
        output = model.generate(**encoded, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                eos_token_id=eos_ids, **sampling)
        new = output[:, encoded["input_ids"].shape[1]:].tolist()
        for i, tokens in zip(rows, new):
            results[i] = _finish(tokenizer, tokens, eos_ids)
            real_tokens += results[i].num_tokens
        bar.update(len(rows))
        bar.set_postfix(tok_per_s=f"{real_tokens / max(time.time() - start, 1e-9):.0f}")
    if progress is None:
        bar.close()
    return results


def _eos_ids(model, tokenizer) -> list[int]:
    configured = model.generation_config.eos_token_id
    ids = configured if isinstance(configured, list) else [configured] if configured is not None else []
    return sorted(set(ids) | {tokenizer.eos_token_id})


def _finish(tokenizer, tokens: list[int], eos_ids: list[int]) -> Generation:
    # After a row's EOS, generate pads it; a row with no EOS ran the full max_new_tokens.
    for position, token in enumerate(tokens):
        if token in eos_ids:
            return Generation(tokenizer.decode(tokens[:position], skip_special_tokens=True), position + 1, "stop")
    return Generation(tokenizer.decode(tokens, skip_special_tokens=True), len(tokens), "length")
