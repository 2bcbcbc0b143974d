"""How generation serves an adapter over a quantized base: the as-trained quantized model against the model
rollouts and evaluation generate with when the base is dequantized (`models.load_for_generation`, as
`generation.dequantize=always`: the base dequantized once into the model dtype, the adapter unmerged), greedy, on
the same prompts. Prints, for
each way, decoding tokens/s and how many greedy outputs equal the as-trained model's; writes JSON.

The SFT adapter is that of the configuration given as Hydra overrides (built first if the cache has none), so

    python scripts/qlora_serving.py --out serving.json experiment=deepseek_qlora model.name_or_path=DIR ...

measures the DeepSeek preset's own SFT adapter. On random weights, build the model with `scripts/reasoning_probe.py
--dominant-head` so that greedy comparisons measure the model, not the rounding (docs/performance.md).
"""

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from looper import engine, models, pipeline
from looper.artifacts import ArtifactStore
from looper.config import conf_dir, register_configs
from looper.stages import evaluation


def decode(cfg, model, tokenizer, prompts: list[str], max_new: int, batch: int) -> tuple[list[str], float]:
    """Greedy outputs of every prompt through looper's generation path, and real tokens/s (after a warm-up)."""
    generator = engine.build(cfg.generation, model, tokenizer, batch)
    requests = [engine.Request(p, max_new, 0.0, 1.0, 0) for p in prompts]
    generator.generate([engine.Request(p, 16, 0.0, 1.0, 0) for p in prompts[:batch]])  # warm-up: kernels, graphs
    torch.cuda.synchronize()
    start = time.perf_counter()
    outputs, _ = generator.generate(requests)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return [o.text for o in outputs], sum(o.num_tokens for o in outputs) / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=192)
    parser.add_argument("--max-new", type=int, default=256)
    parser.add_argument("--batch", type=int, default=96)
    parser.add_argument("--out", type=Path, default=Path("qlora_serving.json"))
    args, overrides = parser.parse_known_args()
    register_configs()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = OmegaConf.to_object(compose(config_name="config", overrides=["logger=none", *overrides]))
    sft = str(pipeline.artifact(cfg, ArtifactStore(Path(cfg.paths.artifacts)), "sft"))
    tokenizer = models.load_tokenizer(sft, cfg.model)
    problems = evaluation.eval_problems("gsm8k_platinum", cfg)[: args.prompts]
    prompts = [evaluation.prompt_for(cfg, tokenizer, p, []) for p in problems]

    ways = {}
    trained, _ = models.load_target(sft, cfg.model, cfg.lora)  # as SFT and DPO compute: quantized base + adapter
    reference, ways["quantized (as trained)"] = decode(cfg, trained, tokenizer, prompts, args.max_new, args.batch)
    del trained  # (one 8B model on the GPU at a time)
    gc.collect()
    torch.cuda.empty_cache()
    model, _ = models.load_for_generation(sft, cfg.model, cfg.lora, "always")  # generation.dequantize=always
    texts, speed = decode(cfg, model, tokenizer, prompts, args.max_new, args.batch)
    ways["dequantized (generation)"] = {"tokens_per_s": speed, "equal": sum(a == b for a, b in zip(texts, reference))}
    del model
    ways["quantized (as trained)"] = {"tokens_per_s": ways["quantized (as trained)"], "equal": len(reference)}
    result = {
        "gpu": torch.cuda.get_device_name(),
        "quantization": cfg.lora.quantization,
        "sft": sft,
        "prompts": len(prompts),
        "max_new_tokens": args.max_new,
        "batch": args.batch,
        "ways": ways,
    }
    base = ways["quantized (as trained)"]["tokens_per_s"]
    for name, figures in ways.items():
        print(
            f"{cfg.lora.quantization} | {name} | {figures['tokens_per_s']:,.0f} tok/s "
            f"({figures['tokens_per_s'] / base:.1f}x) | greedy equal {figures['equal']}/{len(prompts)}"
        )
    args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
