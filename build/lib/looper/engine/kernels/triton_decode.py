"""A Triton kernel for one decode step of attention over the paged KV cache: each (row, KV head) program streams
only that row's own `length` keys and values, finding each position's page through the row's page table, so a step
reads the real context and nothing more.

Why not a library kernel: PyTorch's built-in FlashAttention-2 (variable-length form, `seqused_k`) skips the unused
positions too, but a one-token query still fills a whole tile, and cuDNN's SDPA reads every row up to the longest;
this kernel reads the rows' real keys and values at about the copy bandwidth (`scripts/bench_attention.py`;
docs/performance.md). Imported only on CUDA (Triton ships with PyTorch's CUDA builds); `attention.kernels` checks it
against the masked sdpa step before using it. Head sizes must be powers of two (Triton tiles); other models decode with
FlashAttention.
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _decode(
    q_ptr,
    k_ptr,
    v_ptr,
    out_ptr,
    lengths_ptr,
    table_ptr,
    scale,
    stride_qb,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_ob,
    stride_oh,
    stride_table,
    GROUP: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    PAGE: tl.constexpr,
):
    row, kv_head = tl.program_id(0), tl.program_id(1)
    length = tl.load(lengths_ptr + row)
    g, d, n = tl.arange(0, BLOCK_G), tl.arange(0, HEAD_DIM), tl.arange(0, BLOCK_N)
    heads = kv_head * GROUP + g  # the query heads that share this KV head
    q = tl.load(q_ptr + row * stride_qb + heads[:, None] * stride_qh + d[None, :], mask=(g < GROUP)[:, None], other=0.0)
    q = (q * (scale * 1.4426950408889634)).to(q.dtype)  # exp2 below
    best = tl.full([BLOCK_G], float("-inf"), tl.float32)
    total = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, HEAD_DIM], tl.float32)
    for start in range(0, length, BLOCK_N):
        t = start + n
        valid = t < length
        page = tl.load(table_ptr + row * stride_table + t // PAGE, mask=valid, other=0).to(tl.int64)
        offsets = (page * PAGE + t % PAGE)[:, None] * stride_kt + kv_head * stride_kh + d[None, :]
        k = tl.load(k_ptr + offsets, mask=valid[:, None], other=0.0)
        scores = tl.dot(q, tl.trans(k))
        scores = tl.where(valid[None, :], scores, float("-inf"))
        new_best = tl.maximum(best, tl.max(scores, 1))
        p = tl.math.exp2(scores - new_best[:, None])
        alpha = tl.math.exp2(best - new_best)
        total = total * alpha + tl.sum(p, 1)
        v = tl.load(v_ptr + offsets, mask=valid[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        best = new_best
    out = acc / total[:, None]
    tl.store(
        out_ptr + row * stride_ob + heads[:, None] * stride_oh + d[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=(g < GROUP)[:, None],
    )


def decode_attention(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    lengths: torch.Tensor,
    table: torch.Tensor,
    page: int,
    scale: float,
    block_n: int = 64,
    num_warps: int = 4,
    num_stages: int = 3,
) -> torch.Tensor:
    """query [rows, heads, head_dim]; keys/values [pages * page, kv_heads, head_dim] (last dim contiguous), row r's
    position t at page table[r, t // page], offset t % page; lengths [rows] int32, each >= 1. Returns [rows, heads,
    head_dim]."""
    rows, heads, head_dim = query.shape
    kv_heads = keys.shape[1]
    group = heads // kv_heads
    out = torch.empty_like(query)
    _decode[(rows, kv_heads)](
        query,
        keys,
        values,
        out,
        lengths,
        table,
        scale,
        query.stride(0),
        query.stride(1),
        keys.stride(0),
        keys.stride(1),
        out.stride(0),
        out.stride(1),
        table.stride(0),
        GROUP=group,
        BLOCK_G=max(16, triton.next_power_of_2(group)),
        BLOCK_N=block_n,
        HEAD_DIM=head_dim,
        PAGE=page,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    return out
