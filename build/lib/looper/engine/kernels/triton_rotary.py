"""The rotary position embedding as one Triton kernel, for generation on a GPU in bfloat16.

Why: transformers' `apply_rotary_pos_emb` (`q * cos + rotate_half(q) * sin`) is about eight PyTorch kernels for q and k
(slices, negation, a concatenation, products, sums), each a pass over the prompts' activations, and leaves q and k
head-major, so that writing k into the KV cache is a strided gather, several times as slow as a contiguous copy. This
kernel reads each token's heads once and writes them token-major (the layout of the KV cache and of FlashAttention's
packed input), and returns the same [batch, heads, tokens, head_dim] view (`scripts/bench_gpu.py --sections
prefill,step` measures the prefill and the decode step). The arithmetic is the function's, rounding where it rounds:
each product rounded to bfloat16, then their sum, so the result equals PyTorch's bit for bit. `kernels.fused` uses it
only where it equals the model's own function on a test input; never in float32 or float16 (whose rounding the kernel
does not reproduce).
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _round_to_bf16(x):
    """float32 `x` rounded to the nearest bfloat16 (ties to even), still as float32. In integer arithmetic: a cast
    there and back may be folded away by the compiler, and the product and sum around it fused into an FMA (on a GPU
    that gave a result different from PyTorch's in a quarter of the elements)."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _rotary(
    x_ptr,
    cos_ptr,
    sin_ptr,
    out_ptr,
    tokens,
    heads,
    x_stride_b,
    x_stride_h,
    x_stride_t,
    c_stride_b,
    c_stride_t,
    HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    row = tl.program_id(0)  # (batch, token)
    b, t = row // tokens, row % tokens
    h, d = tl.arange(0, BLOCK_H), tl.arange(0, HALF)
    inside = (h < heads)[:, None]
    x = x_ptr + b * x_stride_b + t * x_stride_t + h[:, None] * x_stride_h + d[None, :]
    x1 = tl.load(x, mask=inside, other=0.0).to(tl.float32)
    x2 = tl.load(x + HALF, mask=inside, other=0.0).to(tl.float32)
    c = cos_ptr + b * c_stride_b + t * c_stride_t + d
    s = sin_ptr + b * c_stride_b + t * c_stride_t + d
    c1, c2 = tl.load(c)[None, :].to(tl.float32), tl.load(c + HALF)[None, :].to(tl.float32)
    s1, s2 = tl.load(s)[None, :].to(tl.float32), tl.load(s + HALF)[None, :].to(tl.float32)
    # q * cos + cat(-q2, q1) * sin, each product and the sum rounded to bfloat16, as PyTorch does
    first = _round_to_bf16(_round_to_bf16(x1 * c1) + _round_to_bf16(-x2 * s1))
    second = _round_to_bf16(_round_to_bf16(x2 * c2) + _round_to_bf16(x1 * s2))
    out = out_ptr + row * heads * 2 * HALF + h[:, None] * 2 * HALF + d[None, :]
    tl.store(out, first.to(tl.bfloat16), mask=inside)  # (exact: the values are bfloat16 already)
    tl.store(out + HALF, second.to(tl.bfloat16), mask=inside)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """`x * cos[:, None] + rotate_half(x) * sin[:, None]` for x [batch, heads, tokens, head_dim] in bfloat16
    (head_dim a power of two, its last dimension contiguous) and cos/sin [batch, tokens, head_dim] in bfloat16; the
    result has x's shape, stored token-major ([batch, tokens, heads, head_dim] underneath)."""
    batch, heads, tokens, dim = x.shape
    out = torch.empty(batch, tokens, heads, dim, dtype=x.dtype, device=x.device)
    cos, sin = cos.expand(batch, tokens, dim), sin.expand(batch, tokens, dim)
    if cos.stride(-1) != 1 or sin.stride() != cos.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    if batch * tokens:
        _rotary[(batch * tokens,)](
            x,
            cos,
            sin,
            out,
            tokens,
            heads,
            x.stride(0),
            x.stride(1),
            x.stride(2),
            cos.stride(0),
            cos.stride(1),
            HALF=dim // 2,
            BLOCK_H=triton.next_power_of_2(heads),
            num_warps=4,
        )
    return out.transpose(1, 2)


def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
    """transformers' `apply_rotary_pos_emb(q, k, cos, sin)` (the default `unsqueeze_dim=1` only)."""
    return rotate(q, cos, sin), rotate(k, cos, sin)
