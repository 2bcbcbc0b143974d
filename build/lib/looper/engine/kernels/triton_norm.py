"""RMSNorm as one Triton kernel, for generation on a GPU in bf16/fp16.

Why: transformers' Llama RMSNorm is eight PyTorch kernels (cast to float32, square, mean, add eps, rsqrt, multiply,
cast back, multiply by the weight), each a pass over the hidden states, a visible share of a prefill's time
(`scripts/bench_gpu.py --sections prefill --profile`); one kernel reads each row once and writes it once. The
arithmetic is the module's: float32 sum of squares, x * rsqrt(mean + eps), cast to the input's dtype, times the
weight. The sum is taken in a different order, so a result can differ from PyTorch's in
the last bit; `kernels.fused` uses the kernel only where it matches the module's own forward on a test input,
and never in float32 (where greedy decoding is checked against plain `generate` exactly).
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm(x_ptr, weight_ptr, out_ptr, x_stride, width, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    offsets = tl.arange(0, BLOCK)
    inside = offsets < width
    x = tl.load(x_ptr + row * x_stride + offsets, mask=inside, other=0.0).to(tl.float32)
    normed = x * tl.rsqrt(tl.sum(x * x, 0) / width + eps)
    weight = tl.load(weight_ptr + offsets, mask=inside)
    out = weight * normed.to(out_ptr.dtype.element_ty)  # the module's order: cast, then times the weight
    tl.store(out_ptr + row * width + offsets, out, mask=inside)


def rms_norm(hidden_states: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`LlamaRMSNorm(hidden_states)` with `weight` and `eps` (any shape; the weight and the input of one dtype)."""
    width = hidden_states.shape[-1]
    x = hidden_states.reshape(-1, width)
    if x.stride(-1) != 1:  # the kernel reads each row as one contiguous run
        x = x.contiguous()
    out = torch.empty(x.shape, dtype=hidden_states.dtype, device=hidden_states.device)
    block = triton.next_power_of_2(width)
    _rms_norm[(x.shape[0],)](
        x, weight, out, x.stride(0), width, eps, BLOCK=block, num_warps=min(16, max(1, block // 256))
    )
    return out.view(hidden_states.shape)
