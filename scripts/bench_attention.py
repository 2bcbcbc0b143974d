"""Decode-step attention kernels on a GPU: the masked sdpa step (cuDNN; it reads every row up to the longest),
PyTorch's FlashAttention-2 varlen with per-row lengths, and looper's Triton kernel. Prints milliseconds per call and
the bandwidth on the keys and values each row really owns (the figure to compare with the copy bandwidth). The
keys and values are paged as generation pages them, the pages shuffled.

    python scripts/bench_attention.py                       # batch 256, 32 heads of 128, rows of 80-420 keys
    python scripts/bench_attention.py --kv-heads 8 --batch 96
"""

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from looper.engine.cache import PAGE
from looper.engine.kernels.attention import DecodeStep


def milliseconds(fn, reps: int = 50) -> float:
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=32)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--min-keys", type=int, default=80)
    parser.add_argument("--max-keys", type=int, default=420)
    parser.add_argument("--capacity", type=int, default=768)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_attention.py needs a CUDA GPU")
    device, dtype = torch.device("cuda"), torch.bfloat16
    generator = torch.Generator(device=device).manual_seed(0)
    lengths = torch.randint(
        args.min_keys, args.max_keys + 1, (args.batch,), device=device, generator=generator, dtype=torch.int32
    )
    width = -(-int(lengths.max()) // 64) * 64
    query = torch.randn(args.batch, args.heads, 1, args.head_dim, device=device, dtype=dtype, generator=generator)
    shape = (args.batch * args.capacity, args.kv_heads, args.head_dim)  # paged as generation pages it, shuffled
    keys = torch.randn(shape, device=device, dtype=dtype, generator=generator)
    values = torch.randn(shape, device=device, dtype=dtype, generator=generator)
    page = PAGE
    table = torch.randperm(args.batch * args.capacity // page, device=device, generator=generator)
    table = table.view(args.batch, -1).to(torch.int32)
    module = type("Module", (), {"num_key_value_groups": args.heads // args.kv_heads, "is_causal": True})()
    real_bytes = int(lengths.sum()) * args.kv_heads * args.head_dim * keys.element_size() * 2
    scale = args.head_dim**-0.5
    report = {"device": torch.cuda.get_device_name(), "args": vars(args), "mean_keys": lengths.float().mean().item()}
    expected = DecodeStep("sdpa", lengths, width, table, page).attend(module, query, keys, values, scale)[0].float()
    for kernel in ("sdpa", "flash", "triton"):
        step = DecodeStep(kernel, lengths, width, table, page)
        ms = milliseconds(lambda step=step: step.attend(module, query, keys, values, scale))
        error = (step.attend(module, query, keys, values, scale)[0].float() - expected).abs().max().item()
        report[kernel] = {"ms": round(ms, 4), "real_tb_s": round(real_bytes / ms / 1e9, 2), "max_abs_diff": error}
        print(
            f"{kernel:7s} {ms:.3f} ms  {real_bytes / ms / 1e9:.2f} TB/s of real keys/values  "
            f"(max |diff| vs sdpa {error:.2g})",
            flush=True,
        )
    print(json.dumps(report))


if __name__ == "__main__":
    main()
