"""GPU benchmark of looper's own generation and training paths — no downloads.

Builds a model of a named architecture with random weights (default: Llama-2-7B shape, Abel-7B-002's architecture)
and a local word-level tokenizer, then measures, with looper's code:

- seeded top-p sampling of one decode step (PyTorch's path against the Triton kernel);
- one generation prefill (rollout-length prompts packed into one forward): its MFU;
- one decode step of the rollout batch at a rollout-like context: its time against its bandwidth ceiling;
- rollout generation (arms x samples, sampling, prompts of 80-180 tokens, rows ending at different lengths);
- evaluation generation (greedy, 1209 prompts of Platinum-like lengths, up to 512 new tokens);
- LoRA SFT and DPO steps on GSM8K-like variable lengths.

Throughput counts real tokens only (no padding, nothing after EOS). The bandwidth ceiling of a decode step is
(bytes of all weights + bytes of the KV cache it reads) / copy bandwidth, the copy bandwidth measured in the same run;
"share" = measured real tokens/s over the ceiling tokens/s at the operating batch and mean context. The bandwidth
ceiling leaves out the prompts, whose forward is compute-bound; "share of the roofline" counts it: (the real tokens
at the bandwidth ceiling + the computed prompt tokens' FLOPs at the dense bf16 peak) / the measured seconds; "share
of the compute roofline" also lets each decode step's weight products take their FLOPs at that peak where that is
longer than reading the weights (many rows a step).
Training reports MFU against the GPU's dense bf16 peak. Prints a table and writes JSON.

    python scripts/bench_gpu.py --out bench.json                       # everything, Llama-2-7B shape
    python scripts/bench_gpu.py --arch tiny --sections rollout --quick  # a CPU smoke test
    torchrun --nproc_per_node 2 scripts/bench_gpu.py --out bench2.json  # data-parallel: figures for all GPUs

Under torchrun each process takes every WORLD_SIZE-th prompt (as looper's sharded rollout and eval do) or trains
under DDP (as `accelerate launch -m looper stage=sft` does); the figures are for the whole job: tokens of all
processes over the slowest process's time.
"""

import argparse
import atexit
import gc
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # before CUDA starts
if "WORLD_SIZE" not in os.environ:  # one process, one GPU (several visible would make the Trainer use DataParallel)
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "0")

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from looper import distributed, models, throughput
from looper.engine import cache, paged, runner

ARCHS = {
    "llama2-7b": dict(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
    ),
    "llama3-8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
    ),
    "tiny": dict(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=1000,
    ),
}
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def peak_flops() -> float:
    """This GPU's dense bf16 peak FLOP/s (NaN where unknown, and so is the MFU)."""
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), float("nan"))


def flops_per_prompt_token(model) -> float:
    """2 FLOPs per parameter a prompt token's forward multiplies by: all but the embeddings and the LM head (a
    prefill computes logits at each prompt's last token only); attention's own FLOPs are left out."""
    cfg = model.config
    return 2 * (sum(p.numel() for p in model.parameters()) - 2 * cfg.vocab_size * cfg.hidden_size)


def copy_bandwidth(device) -> float:
    """Bytes read + written per second by a large device-to-device copy."""
    if device.type != "cuda":
        return float("nan")
    n = 1 << 30  # 1 GiB
    src, dst = torch.empty(n, dtype=torch.uint8, device=device), torch.empty(n, dtype=torch.uint8, device=device)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    start, reps = time.perf_counter(), 20
    for _ in range(reps):
        dst.copy_(src)
    torch.cuda.synchronize()
    return 2 * n * reps / (time.perf_counter() - start)


def build(arch: str, out: Path, save_weights: bool):
    """Random-weight model of the architecture plus a word-level tokenizer, saved to `out` (looper loads it; the
    weights only with `save_weights`: the training sections load them, and a 7B model takes 13.5 GB of disk)."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers
    from tokenizers import models as tok_models
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    shape = ARCHS[arch]
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{f"w{i}": i for i in range(3, shape["vocab_size"])}}
    tokenizer = Tokenizer(tok_models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")
    config = LlamaConfig(**shape, max_position_embeddings=4096, pad_token_id=0, eos_token_id=1, bos_token_id=None)
    torch.manual_seed(0)
    dtype = models.resolve_dtype("auto")
    with torch.device(models.device()):
        torch.set_default_dtype(dtype)
        model = LlamaForCausalLM(config)
        torch.set_default_dtype(torch.float32)
    if distributed.is_main_process():  # one copy on disk for all processes (transformers saves on the main only)
        if save_weights:
            model.save_pretrained(out)
        fast.save_pretrained(out)
    distributed.barrier()
    return model, fast


def shared_tempdir() -> Path:
    """A new temporary directory, the main process's for all processes (as looper's artifact directories are)."""
    path = [tempfile.mkdtemp()]
    if distributed.world_size() > 1:
        import torch.distributed as dist

        dist.broadcast_object_list(path, src=0)
    return Path(path[0])


def words(rng: random.Random, n: int, vocab: int) -> str:
    return " ".join(f"w{rng.randrange(3, vocab)}" for _ in range(n))


def lognormal_lengths(rng: random.Random, n: int, mean: float, low: int, high: int) -> list[int]:
    sigma = 0.5
    mu = math.log(mean) - sigma**2 / 2
    return [max(low, min(high, int(rng.lognormvariate(mu, sigma)))) for _ in range(n)]


def ceiling_tokens_per_s(model, batch: int, mean_context: float, bandwidth: float) -> float:
    """Tokens/s if every decode step of `batch` live rows ran at copy bandwidth."""
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    kv_per_token = cache.kv_bytes_per_position(model)
    return batch / ((weight_bytes + batch * mean_context * kv_per_token) / bandwidth)


def compute_floor_per_token(model, batch: int, mean_context: float, bandwidth: float) -> float:
    """Seconds per generated token at the hardware's limit with compute counted too: a decode step's weight products
    take the longer of reading the weights (shared by `batch` rows) and computing them at the dense bf16 peak (past
    the ridge point, at a 7B model's 256 rows, the second), the KV cache read at copy bandwidth as before."""
    cfg = model.config
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    flops = flops_per_prompt_token(model) + 2 * cfg.vocab_size * cfg.hidden_size  # (every decode row's logits)
    products = max(weight_bytes / batch / bandwidth, flops / peak_flops())
    return products + mean_context * cache.kv_bytes_per_position(model) / bandwidth


def across_processes(seconds: float, tokens: int) -> tuple[float, int]:
    """(slowest process's seconds, all processes' tokens)."""
    if distributed.world_size() == 1:
        return seconds, tokens
    import torch.distributed as dist

    gathered = [None] * distributed.world_size()
    dist.all_gather_object(gathered, (seconds, tokens))
    return max(g[0] for g in gathered), sum(g[1] for g in gathered)


def run_generation(
    model, tokenizer, prompts, limits, *, batch_size, temperature, bandwidth, refill_at, compile_decode, seeds=None
):
    world, rank = distributed.world_size(), distributed.rank()
    total = len(prompts)
    prompts, limits = prompts[rank::world], limits[rank::world]
    seeds = seeds[rank::world] if seeds is not None else None
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    distributed.barrier()
    sync()
    start = time.perf_counter()
    outputs = paged.generate(
        model,
        tokenizer,
        prompts,
        max_new_tokens=limits,
        batch_size=batch_size,
        temperature=temperature,
        top_p=0.95 if temperature else 1.0,
        seeds=seeds,
        add_special_tokens=False,
        refill_at=refill_at,
        stats=(stats := {}),
        desc=None,
        compile_decode=compile_decode,
    )
    sync()
    mine = sum(o.num_tokens for o in outputs)
    seconds, real = across_processes(time.perf_counter() - start, mine)
    prompt_tokens = [len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    mean_context = sum(prompt_tokens) / len(prompts) + mine / len(prompts) / 2
    # at batch_size rows a step (where the KV pages do not hold that many rows, fewer decode: the share is then low),
    # each reading the weights and its context; a page several rows hold (a prompt's samples, a shared prefix) is
    # one copy in memory, so its entries count once
    shared = stats["kv_shared_positions"] / max(stats["kv_positions"], 1)
    ceiling = world * ceiling_tokens_per_s(model, stats["slots"], mean_context * (1 - shared), bandwidth)
    # the roofline besides: the same decoding at the bandwidth ceiling plus the forward of the prompt tokens (rank 0's;
    # every process has its own share) at the dense bf16 peak: compute-bound work no schedule can skip
    prefill_floor = stats["prefill_tokens"] * flops_per_prompt_token(model) / peak_flops()
    roofline = real / ceiling + prefill_floor
    # the same with compute: the decode steps at `compute_floor_per_token` (processes side by side)
    per_token = compute_floor_per_token(model, stats["slots"], mean_context * (1 - shared), bandwidth)
    compute_roofline = real / world * per_token + prefill_floor
    return {
        "seconds": round(seconds, 2),
        "sequences": total,
        "processes": world,
        "real_tokens": real,
        "tokens_per_s": round(real / seconds, 1),
        "ceiling_tokens_per_s": round(ceiling, 1),
        "share_of_ceiling": round(real / seconds / ceiling, 3) if ceiling == ceiling else None,
        "prefill_floor_seconds": round(prefill_floor, 2),
        "share_of_roofline": round(roofline / seconds, 3) if roofline == roofline else None,
        "share_of_compute_roofline": (
            round(compute_roofline / seconds, 3) if compute_roofline == compute_roofline else None
        ),
        "occupancy": throughput.merged([stats])["slot_occupancy"],
        "kv_shared_share": round(shared, 3),
        "batch_size": batch_size,
        "refill_at": refill_at,
        "rank0_stats": stats,
        "outputs": outputs,
    }


KERNEL_KINDS = (  # (kind, substrings of a kernel's name), first match wins
    ("attention", ("_decode", "flash", "fmha", "attention")),
    ("sampling", ("_choose", "sort", "topk", "cumsum", "softmax", "multinomial")),
    ("norm_rotary", ("_rms_norm", "_rotary", "rms")),
    ("gemm", ("gemm", "nvjet", "cutlass", "xmma", "cublas", "matmul", "sm90")),
    ("copy_index", ("copy", "memcpy", "memset", "index", "scatter", "gather", "cat")),
    ("elementwise", ("elementwise", "vectorized", "reduce", "unrolled")),
)


def profile_generation(generate_once) -> dict:
    """Where one generate call's time goes (--profile): `generate_once()` (a `run_generation` call) under the
    profiler; its wall seconds, the GPU's busy seconds (every kernel and copy, CUDA graph replays included), the share
    of the wall the GPU sat idle, and the kernels' time by kind."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profiler:
        run = generate_once()
    wall, stats = run["seconds"], run["rank0_stats"]
    kinds: dict = {}
    busy = 0.0
    rows = []
    for event in profiler.key_averages():
        seconds = event.self_device_time_total / 1e6
        if seconds <= 0:
            continue
        busy += seconds
        name = event.key.lower()
        kind = next((k for k, parts in KERNEL_KINDS if any(part in name for part in parts)), "other")
        kinds[kind] = kinds.get(kind, 0.0) + seconds
        rows.append((seconds, event.count, kind, event.key[:90]))
    rows.sort(reverse=True)
    prefill = stats.get("prefill_seconds", 0.0)
    result = {
        "wall_seconds": round(wall, 2),
        "gpu_busy_seconds": round(busy, 2),
        "gpu_idle_share": round(1 - busy / wall, 3),
        "prefill_wall_seconds": round(prefill, 2),
        "decode_steps": stats.get("decode_steps"),
        "kinds_seconds": {k: round(v, 3) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])},
        "top_kernels": [
            {"seconds": round(sec, 4), "calls": calls, "kind": kind, "name": name}
            for sec, calls, kind, name in rows[:15]
        ],
    }
    print(f"profile: {json.dumps({k: v for k, v in result.items() if k != 'top_kernels'})}", flush=True)
    for row in result["top_kernels"]:
        print(f"  {row['seconds']:8.3f} s {row['calls']:7d} x  {row['kind']:12s} {row['name']}", flush=True)
    return result


class HostWaits:
    """Within it, every operation that makes the host wait for the GPU (`torch.cuda.set_sync_debug_mode`) is counted
    by the Python lines that called it (the innermost four frames); on exit the most frequent are printed."""

    def __enter__(self):
        import collections
        import warnings

        self.counts, self.previous = collections.Counter(), warnings.showwarning
        self.filters = warnings.catch_warnings()
        self.filters.__enter__()
        warnings.simplefilter("always")

        def record(message, category, filename, lineno, file=None, line=None):
            if "synchroniz" not in str(message):
                return self.previous(message, category, filename, lineno, file, line)
            frames = [f for f in traceback.extract_stack()[:-1] if "warnings" not in f.filename][-4:]
            self.counts[" < ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(frames))] += 1

        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode(1)
        return self

    def __exit__(self, *exc):
        import warnings

        torch.cuda.set_sync_debug_mode(0)
        warnings.showwarning = self.previous
        self.filters.__exit__(*exc)
        print(f"host waits for the GPU: {sum(self.counts.values())}", flush=True)
        for where, count in self.counts.most_common(25):
            print(f"  {count:5d}  {where}", flush=True)


def time_split(result: dict) -> str:
    """Where rank 0's generation time went, in words."""
    stats = result["rank0_stats"]
    return (
        f"prefills {stats['prefill_seconds']:.1f} s (floor at peak {result['prefill_floor_seconds']} s), drain "
        f"{stats['drain_seconds']:.1f} s, slot occupancy {100 * result['occupancy']:.0f}%"
    )


def plain_generate_baseline(model, tokenizer, prompts, limits, batch_size):
    """The 'before' figure: plain `model.generate` with HF's own sampling on the same batches (dynamic cache, no
    per-row seeds, rows run to the batch's longest limit); real tokens counted as each row's own limit."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    start, steps = time.perf_counter(), 0
    for first in range(0, len(prompts), batch_size):
        batch = tokenizer(
            prompts[first : first + batch_size], return_tensors="pt", padding=True, add_special_tokens=False
        ).to(model.device)
        new = max(limits[first : first + batch_size])
        model.generate(
            **batch,
            max_new_tokens=new,
            min_new_tokens=new,
            do_sample=True,
            temperature=1.0,
            top_p=0.95,
            pad_token_id=0,
            eos_token_id=1,
        )
        steps += new
    sync()
    seconds = time.perf_counter() - start
    return {
        "seconds": round(seconds, 2),
        "real_tokens": sum(limits),
        "tokens_per_s": round(sum(limits) / seconds, 1),
        "ms_per_step": round(1000 * seconds / steps, 1),
        "batch_size": batch_size,
        "cache": "dynamic (plain)",
    }


def bench_rollout(model, tokenizer, args, bandwidth, rng):
    vocab = model.config.vocab_size
    n = args.rollout_batch * (1 if args.quick else args.rollout_batches)
    distinct = -(-n // args.rollout_samples)
    if args.issue_setting:  # the issue's baseline table: 128-token prompts, every row 256 new tokens
        prompts = [words(rng, 128, vocab) for _ in range(distinct)]
        limits = [256] * n
    elif args.rollout_arms:  # the template of an arm's prompt: system prompt, question, style, answer cue
        arms = [
            (words(rng, rng.randint(10, 25), vocab), words(rng, rng.randint(10, 15), vocab))
            for _ in range(args.rollout_arms)
        ]
        marker, cue = words(rng, 1, vocab), words(rng, 6, vocab)
        questions = [words(rng, rng.randint(50, 130), vocab) for _ in range(-(-distinct // args.rollout_arms))]
        prompts = [f"{system} {marker} {question} {style} {cue}" for question in questions for system, style in arms][
            :distinct
        ]
        limits = lognormal_lengths(rng, n, args.rollout_mean_new, 16, args.rollout_max_new)
    else:
        prompts = [words(rng, rng.randint(80, 180), vocab) for _ in range(distinct)]
        limits = lognormal_lengths(rng, n, args.rollout_mean_new, 16, args.rollout_max_new)
    prompts = [prompt for prompt in prompts for _ in range(args.rollout_samples)][:n]  # samples side by side
    seeds = list(range(n))
    results = {}
    if args.baseline:
        results["plain_generate"] = plain_generate_baseline(model, tokenizer, prompts, limits, args.rollout_batch)
        print(
            f"rollout  plain generate batch {args.rollout_batch}: "
            f"{results['plain_generate']['tokens_per_s']:>9,.0f} real tok/s, "
            f"{results['plain_generate']['ms_per_step']} ms/step",
            flush=True,
        )
    results["warmup_seconds"] = run_generation(  # first use: kernel choice, CUDA graphs, compilation (--compile)
        model,
        tokenizer,
        prompts[:8],
        limits[:8],
        batch_size=8,
        temperature=1.0,
        bandwidth=bandwidth,
        refill_at=args.refill_at,
        compile_decode=args.compile,
        seeds=seeds[:8],
    )["seconds"]
    for refill_at in args.rollout_refill_at:
        result = run_generation(
            model,
            tokenizer,
            prompts,
            limits,
            batch_size=args.rollout_batch,
            temperature=1.0,
            bandwidth=bandwidth,
            refill_at=refill_at,
            compile_decode=args.compile,
            seeds=seeds,
        )
        result.pop("outputs")
        results["looper" if refill_at == args.refill_at else f"looper_refill_at_{refill_at}"] = result
        result["samples_per_prompt"], result["issue_setting"] = args.rollout_samples, args.issue_setting
        result["arms"] = args.rollout_arms
        print(
            f"rollout  looper batch {args.rollout_batch}, refill_at {refill_at}: {result['tokens_per_s']:>9,.0f} "
            f"real tok/s, {100 * (result['share_of_ceiling'] or 0):.0f}% of the ceiling, "
            f"{100 * (result['share_of_roofline'] or 0):.0f}% of the roofline, "
            f"{100 * (result['share_of_compute_roofline'] or 0):.0f}% with compute "
            f"({n} sequences, {result['seconds']} s: "
            f"{time_split(result)}; {result['rank0_stats']})",
            flush=True,
        )
    if args.profile and torch.cuda.is_available():  # a quarter of the rows again, under the profiler
        quarter = len(prompts) // 4
        results["profile"] = profile_generation(
            lambda: run_generation(
                model,
                tokenizer,
                prompts[:quarter],
                limits[:quarter],
                batch_size=args.rollout_batch,
                temperature=1.0,
                bandwidth=bandwidth,
                refill_at=args.refill_at,
                compile_decode=args.compile,
                seeds=seeds[:quarter],
            )
        )
    return results


def bench_sampling(model, tokenizer, args, bandwidth, rng):
    """`seeded_choice` on one decode step's logits [rollout batch, vocab] (T=1, top-p 0.95): PyTorch's path and,
    where `generation` uses it, the Triton kernel, with how many rows pick the same token."""
    from looper.engine.sampling import _torch_choice, _triton_sampler
    from looper.engine.sampling import hash32 as _hash32

    rows, device = args.rollout_batch, model.device
    generator = torch.Generator(device=device).manual_seed(0)
    logits = torch.randn(rows, model.config.vocab_size, device=device, generator=generator).to(model.dtype)
    keys = _hash32(torch.arange(rows, device=device))
    temperatures, top_ps = torch.ones(rows, device=device), torch.full((rows,), 0.95, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def milliseconds(fn, reps=20):
        fn()
        sync()
        start = time.perf_counter()
        for _ in range(reps):
            fn()
        sync()
        return round(1000 * (time.perf_counter() - start) / reps, 3)

    expected = _torch_choice(logits, keys, temperatures, top_ps, True)
    result = {
        "rows": rows,
        "vocab": logits.shape[1],
        "torch_ms": milliseconds(lambda: _torch_choice(logits, keys, temperatures, top_ps, True)),
    }
    if _triton_sampler(device):
        from looper.engine.kernels import triton_sampling

        result["triton_ms"] = milliseconds(
            lambda: triton_sampling.seeded_choice(logits, keys, temperatures, top_ps, True)
        )
        same = triton_sampling.seeded_choice(logits, keys, temperatures, top_ps, True) == expected
        result["same_tokens"] = f"{int(same.sum())}/{rows}"
    print(
        f"sampling {rows} x {logits.shape[1]}, top-p 0.95: PyTorch {result['torch_ms']} ms, Triton "
        f"{result.get('triton_ms', 'not used here')} ms, same tokens {result.get('same_tokens', '-')}",
        flush=True,
    )
    return result


def bench_prefill(model, tokenizer, args, bandwidth, rng):
    """One generation prefill of rollout-length prompts (80-180 tokens) packed into a single forward (as many as fit
    in generation's 16,384 tokens a forward): seconds, MFU (2 FLOPs per non-embedding parameter per token, against
    the dense bf16 peak); with `--profile`, the top kernels of one prefill."""
    vocab, device = model.config.vocab_size, model.device
    encoded, tokens = [], 0
    while len(encoded) < (16 if args.quick else 10**6):
        prompt = tokenizer(words(rng, rng.randint(80, 180), vocab), add_special_tokens=False)["input_ids"]
        if tokens + len(prompt) > cache.PREFILL_TOKENS:
            break
        encoded.append(prompt)
        tokens += len(prompt)
    n = len(encoded)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    @torch.no_grad()
    def once():
        gc.collect()
        with runner.AttentionSwitch(model):
            decoder, executor = paged.engine_for(
                model, tokenizer, encoded, [1] * n, [1.0] * n, [0.95] * n, list(range(n)), n, args.compile
            )
            sync()
            start = time.perf_counter()
            for _ in paged.execute(decoder.prefill(list(range(n))), decoder, executor):  # each row ends at once
                pass
            sync()
            executor.close()
        if decoder.counts["prefills"] != 1 or decoder.queue:
            raise RuntimeError(f"prefill: the KV pages of {n} prompts do not fit in one prefill here")
        return time.perf_counter() - start

    warmup = once()  # compilation, if any, and kernel choice
    seconds = min(once() for _ in range(3))
    mfu = tokens * flops_per_prompt_token(model) / seconds / peak_flops()
    result = {
        "prompts": n,
        "tokens": tokens,
        "seconds": round(seconds, 4),
        "warmup_seconds": round(warmup, 1),
        "compiled": args.compile,
        "mfu": round(mfu, 3),
    }
    print(
        f"prefill  {n} prompts, {tokens} tokens: {1000 * seconds:.0f} ms, MFU {100 * result['mfu']:.0f}% "
        f"(compiled: {args.compile}; first call {warmup:.1f} s)",
        flush=True,
    )
    if args.profile:
        with torch.profiler.profile(
            activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        ) as profiler:
            once()
        print(
            profiler.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=70), flush=True
        )
    return result


def bench_step(model, tokenizer, args, bandwidth, rng):
    """One decode step of `--rollout-batch` slots whose histories are prompts of 150-300 tokens (mean ~225, about a
    rollout's mean context): milliseconds as generation runs it (a CUDA graph replay; compiled with `--compile`)
    against the step's bandwidth ceiling; with `--profile`, the top kernels of the step run outside the graph."""
    vocab, device, slots = model.config.vocab_size, model.device, args.rollout_batch
    encoded = [
        tokenizer(words(rng, rng.randint(150, 300), vocab), add_special_tokens=False)["input_ids"] for _ in range(slots)
    ]
    context = sum(map(len, encoded)) / slots + 1
    with torch.no_grad(), runner.AttentionSwitch(model):
        decoder, executor = paged.engine_for(
            model,
            tokenizer,
            encoded,
            [16] * slots,
            [1.0] * slots,
            [0.95] * slots,
            list(range(slots)),
            slots,
            args.compile,
        )
        for _ in paged.execute(decoder.prefill(list(range(slots))), decoder, executor):  # (no row ends at once)
            pass
        decoder.make_room()  # (each row's page for its next entry)
        executor.execute(decoder.step())  # (the page table takes it)
        run = executor._replay if executor.use_graphs else executor._step
        run()  # capture (and compile, with --compile)
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        sync()
        start, reps = time.perf_counter(), 2 if args.quick else 20
        for _ in range(reps):
            run()
        sync()
        seconds = (time.perf_counter() - start) / reps
        rows = decoder.slots
        ceiling = rows / ceiling_tokens_per_s(model, rows, context, bandwidth)
        result = {
            "slots": rows,
            "mean_context": round(context, 1),
            "ms": round(1000 * seconds, 2),
            "ceiling_ms": round(1000 * ceiling, 2),
            "share_of_ceiling": round(ceiling / seconds, 3),
            "compiled": args.compile,
            "cuda_graph": executor.use_graphs,
            "kernel": executor.kernel,
        }
        print(
            f"step     {rows} slots, mean context {context:.0f}: {1000 * seconds:.1f} ms, ceiling "
            f"{1000 * ceiling:.1f} ms ({100 * ceiling / seconds:.0f}%; compiled: {args.compile})",
            flush=True,
        )
        if args.profile:
            activities = [torch.profiler.ProfilerActivity.CPU] + (
                [torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else []
            )
            with torch.profiler.profile(activities=activities) as profiler:
                executor._step()
                sync()
            print(
                profiler.key_averages().table(
                    sort_by="cuda_time_total" if device.type == "cuda" else "cpu_time_total",
                    row_limit=20,
                    max_name_column_width=70,
                ),
                flush=True,
            )
        executor.close()
    return result


def check_greedy(model, tokenizer, prompts, limits, compile_decode=False):
    """Greedy outputs of looper's path against plain `generate`, one prompt at a time, in float32 without TF32 (in
    bf16 with random weights the logits are nearly flat, so any change of kernel or batch shape flips argmaxes;
    plain `generate` batched against itself one at a time is printed as that noise floor)."""

    def prefix(a, b):
        return next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))

    report = {}
    tf32 = torch.backends.cuda.matmul.allow_tf32
    for dtype in (torch.bfloat16, torch.float32):
        model.to(dtype)
        torch.backends.cuda.matmul.allow_tf32 = False
        ours = paged.generate(
            model,
            tokenizer,
            prompts,
            max_new_tokens=limits,
            batch_size=len(prompts),
            add_special_tokens=False,
            desc=None,
            compile_decode=compile_decode,
        )
        encoded = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
        batched = model.generate(
            **encoded, max_new_tokens=max(limits), do_sample=False, pad_token_id=0, eos_token_id=1
        )[:, encoded["input_ids"].shape[1] :]
        same, same_batched, prefixes = 0, 0, []
        for k, (prompt, limit, output) in enumerate(zip(prompts, limits, ours)):
            single = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).to(model.device)
            plain = model.generate(**single, max_new_tokens=limit, do_sample=False, pad_token_id=0, eos_token_id=1)[
                0, single["input_ids"].shape[1] :
            ]
            plain_text = tokenizer.decode(plain[:limit], skip_special_tokens=True)
            same += plain_text == output.text
            same_batched += plain_text == tokenizer.decode(batched[k, :limit], skip_special_tokens=True)
            prefixes.append(prefix(plain_text.split(), output.text.split()))
        name = str(dtype).replace("torch.", "")
        report[name] = {
            "looper_equal_plain": f"{same}/{len(prompts)}",
            "plain_batched_equal_plain": f"{same_batched}/{len(prompts)}",
            "looper_mean_common_prefix_tokens": sum(prefixes) / len(prefixes),
        }
        print(
            f"greedy   {name}: looper == plain generate (one at a time) {same}/{len(prompts)}; plain generate "
            f"batched == one at a time {same_batched}/{len(prompts)}; mean common prefix "
            f"{sum(prefixes) / len(prefixes):.0f} tokens",
            flush=True,
        )
    torch.backends.cuda.matmul.allow_tf32 = tf32
    model.to(torch.bfloat16)
    return report


def bench_eval(model, tokenizer, args, bandwidth, rng):
    vocab = model.config.vocab_size
    n = 64 if args.quick else 1209
    prompts = [words(rng, length, vocab) for length in lognormal_lengths(rng, n, 140, 60, 400)]
    if args.eval_shots:  # eval.shots: the same solved examples (~160 tokens each) before every question
        lengths = lognormal_lengths(rng, args.eval_shots, 160, 80, 300)
        shots = " ".join(words(rng, length, vocab) for length in lengths)
        prompts = [f"{shots} {prompt}" for prompt in prompts]
    limits = lognormal_lengths(rng, n, args.eval_mean_new, 32, args.eval_max_new)
    results = {}
    # first use (kernel choice and Triton builds, CUDA graphs, compilation with --compile) is timed apart, as in the
    # rollout section: the first process on a fresh H100 took 69 s for the 8-shot eval, 58 s after such a warm-up
    results["warmup_seconds"] = run_generation(
        model,
        tokenizer,
        prompts[:8],
        limits[:8],
        batch_size=8,
        temperature=0.0,
        bandwidth=bandwidth,
        refill_at=args.refill_at,
        compile_decode=args.compile,
    )["seconds"]
    result = run_generation(
        model,
        tokenizer,
        prompts,
        limits,
        batch_size=args.eval_batch,
        temperature=0.0,
        bandwidth=bandwidth,
        refill_at=args.refill_at,
        compile_decode=args.compile,
    )
    result.pop("outputs")
    results["looper"], result["shots"] = result, args.eval_shots
    print(
        f"eval     looper batch {args.eval_batch}: {n} prompts in {result['seconds']:.0f} s, "
        f"{result['tokens_per_s']:,.0f} real tok/s, {100 * (result['share_of_ceiling'] or 0):.0f}% of the ceiling, "
        f"{100 * (result['share_of_roofline'] or 0):.0f}% of the roofline, "
        f"{100 * (result['share_of_compute_roofline'] or 0):.0f}% with compute ({time_split(result)}; "
        f"{result['rank0_stats']})",
        flush=True,
    )
    if args.profile and torch.cuda.is_available():  # the whole evaluation again, under the profiler
        results["profile"] = profile_generation(
            lambda: run_generation(
                model,
                tokenizer,
                prompts,
                limits,
                batch_size=args.eval_batch,
                temperature=0.0,
                bandwidth=bandwidth,
                refill_at=args.refill_at,
                compile_decode=args.compile,
            )
        )
    if args.check_greedy:
        results["greedy_check"] = check_greedy(
            model, tokenizer, prompts[:8], [min(64, x) for x in limits[:8]], args.compile
        )
    return results


def bench_training(model_dir: Path, args, rng, stage: str):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from looper.config import register_configs
    from looper.stages import dpo, sft

    register_configs()
    from looper.config import conf_dir

    conf = conf_dir()
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        raw = compose(
            config_name="config",
            overrides=[
                "experiment=abel_platinum",
                f"model.name_or_path={model_dir}",
                "logger=none",
                f"sft.batch_size={args.train_batch}",
                "sft.global_batch_size=null",  # (the preset's global batch sets the accumulation: one micro-batch here)
                "sft.gradient_accumulation_steps=1",
                f"sft.max_steps={args.steps}",
                f"sft.gradient_checkpointing={str(args.gradient_checkpointing).lower()}",
                "sft.logging_steps=1000",
                f"sft.padding_free={str(not args.padded).lower()}",
                f"dpo.precompute_ref_log_probs={str(not args.no_precompute).lower()}",
                f"dpo.padding_free={str(not args.dpo_padded).lower()}",
                f"dpo.batch_size={max(1, args.train_batch // 2)}",
                "dpo.global_batch_size=null",
                "dpo.gradient_accumulation_steps=1",
                f"dpo.max_steps={args.steps}",
                "dpo.logging_steps=1000",
                f"dpo.gradient_checkpointing={str(args.gradient_checkpointing).lower()}",
                f"sft.use_liger_kernel={str(args.liger).lower()}",
                f"dpo.use_liger_kernel={str(args.liger).lower()}",
                f"sft.compile={str(args.compile_layers).lower()}",
                f"dpo.compile={str(args.compile_layers).lower()}",
            ],
        )
    cfg = OmegaConf.to_object(raw)
    vocab = ARCHS[args.arch]["vocab_size"]
    n = args.train_batch * (args.steps + 2)
    prompt_lengths = lognormal_lengths(rng, n, 90, 30, 300)
    completion_lengths = lognormal_lengths(rng, n, 130, 30, 500)
    out = shared_tempdir()
    if stage == "sft":
        examples = [
            {"prompt": words(rng, p, vocab), "completion": words(rng, c, vocab)}
            for p, c in zip(prompt_lengths, completion_lengths)
        ]
        trainer = sft.make_trainer(cfg, str(model_dir), out, examples=examples)
    else:
        pairs, adapter = out / "pairs", out / "sft_adapter"  # DPO continues an SFT adapter, as in the pipeline
        text = "".join(
            json.dumps(
                {
                    "prompt": words(rng, p, vocab),
                    "chosen": words(rng, c, vocab),
                    "rejected": words(rng, max(30, c + rng.randint(-40, 40)), vocab),
                }
            )
            + "\n"
            for p, c in zip(prompt_lengths, completion_lengths)
        )
        peft_model = sft.make_trainer(cfg, str(model_dir), out, examples=[{"prompt": "w5", "completion": "w6"}]).model
        if distributed.is_main_process():  # the directory is shared: one writer
            pairs.mkdir()
            (pairs / "pairs.jsonl").write_text(text)
            peft_model.save_pretrained(adapter)
            models.load_tokenizer(str(model_dir), cfg.model).save_pretrained(adapter)
        distributed.barrier()
        del peft_model
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
        trainer = dpo.make_trainer(cfg, adapter, pairs, out)
    tokens, times, step_tokens = [], [], []  # real tokens per forward; seconds and real tokens per optimizer step
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)

    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def on_step_begin(self, *a, **k):
            sync()
            self.t, self.first = time.perf_counter(), len(tokens)

        def on_step_end(self, *a, **k):
            sync()
            times.append(time.perf_counter() - self.t)
            step_tokens.append(sum(tokens[self.first :]))

    trainer.add_callback(Clock())

    class Profile(TrainerCallback):  # --profile: the top kernels and host ops of one step, after warm-up
        def on_step_begin(self, args_, state, *a, **k):
            if state.global_step == 3:
                self.profiler = torch.profiler.profile(
                    activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
                )
                self.profiler.__enter__()

        def on_step_end(self, args_, state, *a, **k):
            if hasattr(self, "profiler") and state.global_step == 4:
                self.profiler.__exit__(None, None, None)
                averages = self.profiler.key_averages()
                for key in ("cuda_time_total", "self_cpu_time_total"):
                    print(averages.table(sort_by=key, row_limit=12, max_name_column_width=60), flush=True)

    class SyncSources(TrainerCallback):  # --sync-debug: where the host waits for the GPU during one step
        def on_step_begin(self, args_, state, *a, **k):
            if state.global_step == 3:
                self.sources = HostWaits()
                self.sources.__enter__()

        def on_step_end(self, args_, state, *a, **k):
            if hasattr(self, "sources") and state.global_step == 4:
                self.sources.__exit__(None, None, None)

    if args.profile:
        trainer.add_callback(Profile())
    if args.sync_debug and torch.cuda.is_available():
        trainer.add_callback(SyncSources())
    original = trainer.compute_loss

    def counting(model, inputs, *a, **k):
        mask = inputs.get("attention_mask")  # padding-free batches have none: every token is real
        tokens.append(int(mask.sum()) if mask is not None else int(inputs["input_ids"].numel()))
        return original(model, inputs, *a, **k)

    trainer.compute_loss = counting
    reference = None
    if stage == "dpo":  # the reference check: dropout off (what dpo runs) against on (TRL's first training step)
        reference = {"dropout_off": dpo.reference_margin(trainer), "dropout_on": dpo.reference_margin(trainer, True)}
        print(
            f"dpo reference check: max |margin| {reference['dropout_off']['max_abs_margin']:.3g} with dropout off, "
            f"{reference['dropout_on']['max_abs_margin']:.3g} with LoRA dropout on",
            flush=True,
        )
    torch.cuda.reset_peak_memory_stats() if torch.cuda.is_available() else None
    trainer.train()
    warm = 2  # the first steps pay allocation and kernel selection
    seconds, real = across_processes(sum(times[warm:]), sum(step_tokens[warm:]))
    params = sum(p.numel() for p in trainer.model.parameters() if p.dtype in (torch.bfloat16, torch.float16))
    flops_per_token = 4 * params * (1.5 if stage == "dpo" else 1)  # frozen base: forward 2N + input-grad 2N
    peak = peak_flops()
    result = {
        "steps_timed": len(times) - warm,
        "step_seconds": [round(t, 3) for t in times],
        "processes": distributed.world_size(),
        "real_tokens_per_s": round(real / seconds, 1),
        "padding_free": trainer.args.padding_free if stage == "sft" else not args.dpo_padded,
        "mfu": round(real / seconds * flops_per_token / peak / distributed.world_size(), 3),
        "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1) if torch.cuda.is_available() else None,
        "batch_size": trainer.args.per_device_train_batch_size,
        "gradient_checkpointing": args.gradient_checkpointing,
        "flops_per_token": flops_per_token,
        "reference_check": reference,
    }
    print(
        f"{stage:8s} LoRA r64: {result['real_tokens_per_s']:,.0f} real tok/s, MFU {100 * result['mfu']:.0f}%, "
        f"peak {result['peak_memory_gib']} GiB",
        flush=True,
    )
    del trainer
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return result


def grpo_logprob_check(trainer, rollouts, cfg) -> dict:
    """The engine's sampling log-probs (CUDA graphs, bf16) against a forward pass of the same policy over one group
    of completions: their largest and mean absolute difference."""
    from looper.stages import grpo

    members = grpo.group(cfg)
    produced = rollouts([trainer.train_dataset[0]["prompt"]] * len(members), trainer)
    model = trainer.accelerator.unwrap_model(trainer.model)
    was_training, diffs = model.training, []
    model.eval()
    with torch.no_grad():
        for (_, _, arm), prompt, completion, engine_logps in zip(
            members, produced["prompt_ids"], produced["completion_ids"], produced["logprobs"]
        ):
            ids = torch.tensor([prompt + completion], device=model.device)
            logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float() / arm.temperature
            forward = logits.log_softmax(-1).gather(1, ids[0, len(prompt) :, None])[:, 0]
            diffs.append((forward - torch.tensor(engine_logps, device=model.device)).abs())
    model.train(was_training)
    every = torch.cat(diffs)
    result = {"max_abs": round(every.max().item(), 4), "mean_abs": round(every.mean().item(), 5)}
    result["tokens"] = every.numel()
    print(f"grpo     engine log-probs against a forward pass (bf16): {result}", flush=True)
    return result


def bench_grpo(model_dir: Path, args, rng, stage: str = "grpo"):
    """GRPO on the model (experiment=abel_platinum: LoRA r64 over bf16, its 8 arms as the group) on the synthetic
    questions: each step's time split between generation (looper's engine on the live, unmerged LoRA policy, inside
    TRL's rollout_func; scoring included, s_cf off so generation is the group's alone) and the update (TRL's forward
    and backward), with generation tokens/s and the update's MFU. Random weights never end a row: every completion
    runs to --grpo-max-new."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from looper.config import conf_dir, register_configs
    from looper.stages import grpo, sft

    register_configs()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        raw = compose(
            config_name="config",
            overrides=[
                "experiment=abel_platinum",
                f"model.name_or_path={model_dir}",
                "logger=none",
                "data=synthetic",
                f"grpo.max_steps={args.steps}",
                f"grpo.questions_per_batch={args.grpo_questions}",
                f"grpo.gradient_accumulation_steps={args.grpo_accumulation}",
                f"grpo.max_new_tokens={args.grpo_max_new}",
                f"grpo.gradient_checkpointing={str(args.gradient_checkpointing).lower()}",
                "grpo.save_steps=0",
                "grpo.logging_steps=1000",
                "reward.cf_samples=0",
                f"generation.compile={str(args.compile).lower()}",
            ],
        )
    cfg = OmegaConf.to_object(raw)
    out = shared_tempdir()
    adapter = out / "sft_adapter"  # GRPO continues an SFT adapter, as in the pipeline
    peft_model = sft.make_trainer(cfg, str(model_dir), out, examples=[{"prompt": "w5", "completion": "w6"}]).model
    if distributed.is_main_process():
        peft_model.save_pretrained(adapter)
        models.load_tokenizer(str(model_dir), cfg.model).save_pretrained(adapter)
    distributed.barrier()
    del peft_model
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    (out / "grpo").mkdir(exist_ok=True)
    trainer = grpo.make_trainer(cfg, adapter, out / "grpo")
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    generation, steps = [], []
    inner = trainer.rollout_func

    def timed(prompts, trainer_):
        sync()
        start = time.perf_counter()
        produced = inner(prompts, trainer_)
        sync()
        completion = sum(map(len, produced["completion_ids"]))
        generation.append((time.perf_counter() - start, completion, completion + sum(map(len, produced["prompt_ids"]))))
        return produced

    trainer.rollout_func = timed
    logprob_check = grpo_logprob_check(trainer, inner, cfg)
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def on_step_begin(self, *a, **k):
            sync()
            self.t = time.perf_counter()

        def on_step_end(self, *a, **k):
            sync()
            steps.append(time.perf_counter() - self.t)

    trainer.add_callback(Clock())
    torch.cuda.reset_peak_memory_stats() if torch.cuda.is_available() else None
    trainer.train()
    warm = 1  # the first step pays graph capture, allocation and kernel selection
    step_s = sum(steps[warm:]) / max(len(steps) - warm, 1)
    gen_s = sum(g[0] for g in generation[warm:]) / max(len(generation) - warm, 1)
    completion = sum(g[1] for g in generation[warm:]) / max(len(generation) - warm, 1)
    trained = sum(g[2] for g in generation[warm:]) / max(len(generation) - warm, 1)
    update_s = step_s - gen_s
    params = sum(p.numel() for p in trainer.model.parameters() if p.dtype in (torch.bfloat16, torch.float16))
    result = {
        "steps_timed": len(steps) - warm,
        "group_size": len(grpo.group(cfg)),
        "completions_per_step": len(grpo.group(cfg))
        * cfg.grpo.questions_per_batch
        * cfg.grpo.gradient_accumulation_steps,
        "max_new_tokens": cfg.grpo.max_new_tokens,
        "step_seconds": round(step_s, 3),
        "generation_seconds": round(gen_s, 3),
        "update_seconds": round(update_s, 3),
        "generation_share": round(gen_s / step_s, 3),
        "generation_tokens_per_s": round(completion / gen_s, 1),
        "update_tokens_per_s": round(trained / update_s, 1),
        "update_mfu": round(trained / update_s * 4 * params / peak_flops(), 3),
        "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1) if torch.cuda.is_available() else None,
        "engine": throughput.summary(out / "grpo"),
        "logprob_check": logprob_check,
    }
    print(
        f"grpo     LoRA r64, {result['completions_per_step']} completions x {cfg.grpo.max_new_tokens} tokens a step: "
        f"{step_s:.2f} s a step, generation {gen_s:.2f} s ({result['generation_tokens_per_s']:,.0f} tok/s), update "
        f"{update_s:.2f} s ({result['update_tokens_per_s']:,.0f} tok/s, MFU {100 * result['update_mfu']:.0f}%), "
        f"peak {result['peak_memory_gib']} GiB",
        flush=True,
    )
    del trainer
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="llama2-7b", choices=sorted(ARCHS))
    parser.add_argument("--sections", default="sampling,prefill,step,rollout,eval,sft,dpo")
    parser.add_argument("--baseline", action="store_true", help="also time plain generate on the rollout batches")
    parser.add_argument("--refill-at", type=float, default=0.125, help="generation.refill_at")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="generation.compile=true (torch.compile the decode "
        "step; its compilation is timed in the warm-up, apart from the figures)",
    )
    parser.add_argument(
        "--rollout-batches",
        type=int,
        default=16,
        help="rollout work, in batches (16: one rollout generate call at the default rollout.batches_per_call)",
    )
    parser.add_argument(
        "--rollout-refill-at",
        default="",
        help="comma-separated generation.refill_at values to compare on the rollout (default: --refill-at)",
    )
    parser.add_argument("--rollout-batch", type=int, default=256)
    parser.add_argument(
        "--rollout-samples",
        type=int,
        default=1,
        help="samples per distinct prompt (arms=single: 8; regime_w: 1, each arm its own system prompt)",
    )
    parser.add_argument(
        "--rollout-arms",
        type=int,
        default=0,
        help="prompts in an arm's template: each question "
        "under N arms, each arm's own system prompt (10-25 tokens, shared by its prompts) and style; "
        "prompts of 77-177 tokens (default 0: prompts of 80-180 random tokens)",
    )
    parser.add_argument(
        "--issue-setting",
        action="store_true",
        help="rollout prompts of exactly 128 tokens, every "
        "row 256 new tokens (the setting of the issue's plain-generate baseline)",
    )
    parser.add_argument("--rollout-mean-new", type=int, default=150)
    parser.add_argument("--rollout-max-new", type=int, default=256)
    parser.add_argument("--eval-batch", type=int, default=96)
    parser.add_argument(
        "--eval-shots",
        type=int,
        default=0,
        help="eval.shots: each eval prompt begins with the same N solved examples of 80-300 tokens (mean 160)",
    )
    parser.add_argument("--eval-mean-new", type=int, default=180)
    parser.add_argument("--eval-max-new", type=int, default=512)
    parser.add_argument(
        "--train-batch",
        type=int,
        default=16,
        help="SFT sequences per step (DPO: half as many pairs); abel_platinum uses 16",
    )
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--grpo-questions", type=int, default=4, help="grpo.questions_per_batch (x 8 arms a step)")
    parser.add_argument("--grpo-max-new", type=int, default=256, help="grpo.max_new_tokens")
    parser.add_argument(
        "--grpo-accumulation",
        type=int,
        default=8,
        help="grpo.gradient_accumulation_steps (TRL generates for all of a step's micro-batches at once)",
    )
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--check-greedy", action="store_true", help="compare the fast path with plain generate")
    parser.add_argument("--quick", action="store_true", help="small workloads (smoke test)")
    parser.add_argument("--out", type=Path, default=Path("bench_gpu.json"))
    parser.add_argument("--padded", action="store_true", help="SFT on padded batches (sft.padding_free=false)")
    parser.add_argument(
        "--no-merged-projections", action="store_true", help="generation computes q, k and v as three products"
    )
    parser.add_argument("--dpo-padded", action="store_true", help="DPO on padded batches (dpo.padding_free=false)")
    parser.add_argument("--no-precompute", action="store_true", help="dpo.precompute_ref_log_probs=false")
    parser.add_argument("--liger", action="store_true", help="sft/dpo.use_liger_kernel=true (needs liger-kernel)")
    parser.add_argument("--compile-layers", action="store_true", help="sft/dpo.compile=true: compiled decoder layers")
    parser.add_argument(
        "--sync-debug", action="store_true", help="count where the host waits for the GPU in one training step"
    )
    parser.add_argument(
        "--profile", action="store_true", help="print the top ops of one prefill, one decode step and one training step"
    )
    args = parser.parse_args()
    runner.MERGE_PROJECTIONS = not args.no_merged_projections
    args.rollout_refill_at = [float(v) for v in args.rollout_refill_at.split(",") if v] or [args.refill_at]
    distributed.init()
    main_process = distributed.is_main_process()
    if not main_process:  # one voice: the others compute and stay quiet
        sys.stdout = open(os.devnull, "w")
    sections = args.sections.split(",")
    rng = random.Random(0)
    device = models.device()
    report = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "arch": args.arch,
        "torch": torch.__version__,
        "args": {k: str(v) for k, v in vars(args).items()},
    }
    bandwidth = copy_bandwidth(device)
    report["copy_bandwidth_tb_s"] = round(bandwidth / 1e12, 3)
    print(f"{report['device']}: copy bandwidth {bandwidth / 1e12:.2f} TB/s", flush=True)
    model_dir = shared_tempdir() / "model"
    if main_process:  # (the saved model goes when the benchmark ends, however it ends)
        atexit.register(shutil.rmtree, model_dir.parent, ignore_errors=True)
    model, tokenizer = build(args.arch, model_dir, save_weights=bool({"sft", "dpo", "grpo"} & set(sections)))
    tokenizer = models.load_tokenizer(str(model_dir), models.ModelConfig(name_or_path=str(model_dir)))
    model.eval()
    for section, fn in (
        ("sampling", bench_sampling),
        ("prefill", bench_prefill),
        ("step", bench_step),
        ("rollout", bench_rollout),
        ("eval", bench_eval),
    ):
        if section in sections:
            try:
                report[section] = fn(model, tokenizer, args, bandwidth, rng)
            except Exception as error:  # a failed section must not lose the others' figures
                report[section] = {"error": repr(error)[:500]}
                print(f"{section}: failed on rank {distributed.rank()}: {error!r}"[:500], file=sys.stderr, flush=True)
                traceback.print_exc()
                torch.cuda.empty_cache() if torch.cuda.is_available() else None
            if main_process:
                args.out.write_text(json.dumps(report, indent=2))
    del model
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    for stage in ("sft", "dpo", "grpo"):
        if stage in sections:
            try:
                report[stage] = (bench_grpo if stage == "grpo" else bench_training)(model_dir, args, rng, stage)
            except Exception as error:  # a failed section must not lose the others' figures
                report[stage] = {"error": repr(error)}
                print(f"{stage}: failed on rank {distributed.rank()}: {error!r}", file=sys.stderr, flush=True)
                traceback.print_exc()
            if main_process:
                args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps({k: v for k, v in report.items() if k != "args"}, indent=2))


if __name__ == "__main__":
    main()
