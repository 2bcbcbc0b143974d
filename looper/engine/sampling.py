"""Seeded per-row token choice: what a decode step picks from its logits.

Owns `seeded_choice` (greedy, temperature and top-p, drawn by Gumbel-max with noise that is a hash of the row's seed,
its step and the token id) and the check that picks the Triton kernel (`kernels.triton_sampling`) or the PyTorch
reference. A row's draw depends on its own seed and step only, never on which rows share its batch, their order, the
batch size or the number of processes: that is what makes resumed and sharded rollouts equal uninterrupted ones.
Must never touch the KV cache, the scheduler's queues or the model.
"""

import functools
import logging

import torch

log = logging.getLogger(__name__)

MASK32 = 0xFFFFFFFF


def hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mix (xorshift-multiply) on int64 tensors; constants < 2^31 keep products below 2^63, so the
    result is exact and identical on every device."""
    x = x & MASK32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & MASK32
    x = x ^ (x >> 15)
    x = (x * 0x2C1B3C6D) & MASK32
    return x ^ (x >> 16)


def seeded_choice(
    logits: torch.Tensor,
    seeds: torch.Tensor,
    steps: torch.Tensor,
    temperatures: torch.Tensor,
    top_ps: torch.Tensor,
    sampling: bool = True,
    nucleus: bool = True,
) -> torch.Tensor:
    """One token per row: a sample from the temperature- and top-p-filtered distribution, by Gumbel-max with noise
    that is a hash of (row seed, row step, token id); the argmax where a row's temperature is 0 (greedy).
    `sampling=False` (no row samples) and `nucleus=False` (no row has top_p < 1) only skip work; a row's choice never
    depends on them or on any other row."""
    if not sampling:
        return logits.argmax(dim=-1)
    row = hash32(hash32(seeds) ^ steps)
    if _triton_sampler(logits.device):
        from looper.engine.kernels import triton_sampling

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
    bits = hash32(row[:, None] + tokens[None, :] * 0x9E3779B1) >> 8  # 24 bits: exact in float32
    gumbel = -torch.log(-torch.log((bits.float() + 0.5) / 2.0**24))  # uniform strictly inside (0, 1)
    return torch.where(greedy[:, None], logits, logits + gumbel).argmax(dim=-1)


def chosen_logprob(logits: torch.Tensor, tokens: torch.Tensor, temperatures: torch.Tensor) -> torch.Tensor:
    """Per row, the log-probability of `tokens` under the logits at the row's temperature (1 where it is greedy),
    before top-p: the sampling log-prob an online-RL trainer compares with its own forward pass."""
    scale = torch.where(temperatures > 0, temperatures, torch.ones_like(temperatures))
    return (logits.float() / scale[:, None]).log_softmax(dim=-1).gather(1, tokens[:, None])[:, 0]


@functools.lru_cache(maxsize=None)
def _triton_sampler(device: torch.device) -> bool:
    """Whether `seeded_choice` runs as `kernels.triton_sampling`'s kernel here: on CUDA, when the kernel compiles and
    picks what the PyTorch path picks on a test case (all greedy rows; sampled rows but a few at rounding ties)."""
    if device.type != "cuda":
        return False
    generator = torch.Generator(device=device).manual_seed(0)
    rows, vocab = 64, 32000
    logits = (3 * torch.randn(rows, vocab, device=device, generator=generator)).to(torch.bfloat16)
    temperatures = torch.tensor([0.0, 0.6, 1.0, 1.3] * (rows // 4), device=device)
    top_ps = torch.tensor([0.95, 1.0, 0.9, 0.5] * (rows // 4), device=device)
    keys = hash32(torch.arange(rows, device=device) * 7919)
    try:
        from looper.engine.kernels import triton_sampling

        got = triton_sampling.seeded_choice(logits, keys, temperatures, top_ps, nucleus=True)
    except Exception as error:  # no Triton, an old GPU: sample with PyTorch
        log.warning("generation: Triton sampling unavailable here (%s); sampling with PyTorch", error)
        return False
    same = got == _torch_choice(logits, keys, temperatures, top_ps, nucleus=True)
    if bool(same[temperatures <= 0].all()) and int(same.sum()) >= rows - 2:
        return True
    log.warning(
        "generation: Triton sampling agrees with PyTorch on %d of %d rows here; not used", int(same.sum()), rows
    )
    return False
