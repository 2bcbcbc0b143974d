"""A Triton kernel for `looper.engine.sampling.seeded_choice` on a GPU: temperature, top-p and the seeded Gumbel-max
draw of one row in one program, without sorting the vocabulary.

Why: in PyTorch, top-p sorts every row (a segmented radix sort of batch x vocab floats), then takes a softmax, a
cumulative sum, a scatter back, the noise hash and an argmax — a dozen passes over a [256, 32000] float32 tensor, a
tenth of a 7B model's decode step at batch 256; this kernel makes one (`scripts/bench_gpu.py --sections sampling`).
Here the nucleus is found as a probability threshold instead: with e_k = exp(x_k - max x)
(x = logits / temperature), token i stays iff the mass of the tokens more likely than it, sum of e_k over
e_k > e_i, is at most top_p * sum of e_k — the sorted rule ("drop a token once the tokens before it hold more than
top_p") without the order. That mass falls as the threshold rises, so a bisection on the float32 bit pattern
(positive floats order like their bits) finds the smallest e-value that passes in 31 passes over the row (the row
stays in L1/L2). The noise is `sampling.hash32` of (row, token) in uint32 arithmetic (the same integers), so a
row's draw still depends on its own seed and step only. Results agree with the PyTorch path except where a token
sits within rounding of the nucleus boundary or two scores tie within rounding (the sums are taken in a different
order); `looper.engine.sampling` checks it against PyTorch at first use.
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _hash32(x):
    """xorshift-multiply on uint32 (products wrap modulo 2^32, as `sampling.hash32`'s masks do)."""
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x2C1B3C6D
    return x ^ (x >> 16)


@triton.jit
def _scaled(row_ptr, start, offsets, vocab, divisor):
    """logits[start:start + BLOCK] / divisor in float32; -inf past the vocabulary."""
    where = start + offsets
    return tl.load(row_ptr + where, mask=where < vocab, other=float("-inf")).to(tl.float32) / divisor


@triton.jit
def _choose(
    logits_ptr,
    stride,
    rows_ptr,
    temperatures_ptr,
    top_ps_ptr,
    out_ptr,
    vocab,
    NUCLEUS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    r = tl.program_id(0)
    row_ptr = logits_ptr + r.to(tl.int64) * stride
    temperature = tl.load(temperatures_ptr + r)
    sample = temperature > 0
    divisor = tl.where(sample, temperature, 1.0)
    offsets = tl.arange(0, BLOCK)
    top = tl.max(_scaled(row_ptr, 0, offsets, vocab, divisor), 0)
    for start in range(BLOCK, vocab, BLOCK):
        top = tl.maximum(top, tl.max(_scaled(row_ptr, start, offsets, vocab, divisor), 0))
    threshold = tl.zeros([], tl.float32)  # keep every token whose e-value is at least this
    if NUCLEUS:
        top_p = tl.load(top_ps_ptr + r)
        if (temperature > 0) & (top_p < 1):
            total = tl.zeros([], tl.float32)
            for start in range(0, vocab, BLOCK):
                total += tl.sum(tl.exp(_scaled(row_ptr, start, offsets, vocab, divisor) - top), 0)
            target = top_p * total
            low = tl.zeros([], tl.int32)  # mass above 0.0 exceeds the target
            high = tl.full([], 0x3F800000, tl.int32)  # 1.0 = the top token's e-value: no mass above it
            for _ in range(31):
                middle = (low + high) // 2
                cut = middle.to(tl.float32, bitcast=True)
                above = tl.zeros([], tl.float32)
                for start in range(0, vocab, BLOCK):
                    e = tl.exp(_scaled(row_ptr, start, offsets, vocab, divisor) - top)
                    above += tl.sum(tl.where(e > cut, e, 0.0), 0)
                fits = above <= target
                high = tl.where(fits, middle, high)
                low = tl.where(fits, low, middle)
            threshold = high.to(tl.float32, bitcast=True)
    row_hash = tl.load(rows_ptr + r).to(tl.uint32)
    best = tl.full([], float("-inf"), tl.float32)
    best_index = tl.zeros([], tl.int32)
    for start in range(0, vocab, BLOCK):
        x = _scaled(row_ptr, start, offsets, vocab, divisor)
        tokens = (start + offsets).to(tl.uint32)
        bits = _hash32(row_hash + tokens * 0x9E3779B1) >> 8  # 24 bits: exact in float32
        gumbel = -tl.log(-tl.log((bits.to(tl.float32) + 0.5) / 16777216.0))
        score = tl.where(tl.exp(x - top) >= threshold, tl.where(sample, x + gumbel, x), float("-inf"))
        score = tl.where(start + offsets < vocab, score, float("-inf"))
        chunk_best = tl.max(score, 0)
        chunk_index = tl.argmax(score, 0)  # the first of ties, as torch.argmax
        better = chunk_best > best  # strictly: an earlier chunk keeps a tie
        best_index = tl.where(better, start + chunk_index, best_index)
        best = tl.where(better, chunk_best, best)
    tl.store(out_ptr + r, best_index.to(tl.int64))


def seeded_choice(
    logits: torch.Tensor,
    row_hashes: torch.Tensor,
    temperatures: torch.Tensor,
    top_ps: torch.Tensor,
    nucleus: bool,
    block: int = 8192,
) -> torch.Tensor:
    """One token per row of `logits` [rows, vocab] (any float dtype, last dim contiguous): see the module docstring.
    `row_hashes` [rows] are `generation`'s per-row noise keys (hash of seed and step); `nucleus=False` skips top-p."""
    rows, vocab = logits.shape
    out = torch.empty(rows, dtype=torch.int64, device=logits.device)
    _choose[(rows,)](
        logits,
        logits.stride(0),
        row_hashes,
        temperatures.float().contiguous(),
        top_ps.float().contiguous(),
        out,
        vocab,
        NUCLEUS=nucleus,
        BLOCK=min(block, triton.next_power_of_2(vocab)),
        num_warps=16,
    )
    return out
