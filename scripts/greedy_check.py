"""Greedy decoding through looper's generation path against plain `model.generate`, prompt by prompt, on a trained
model: the SFT policy of the configuration given as Hydra overrides (built first if the cache has none; the default
is the tiny demo's). Prints how many outputs are identical, in the model's dtype and in float32, beside the noise
floor (plain `generate` on left-padded batches against itself one at a time) and, on a GPU, looper with the masked
sdpa in place of the fast kernels.

    python scripts/greedy_check.py                              # tiny demo SFT, 64 synthetic test questions
    python scripts/greedy_check.py experiment=abel_platinum     # the 7B SFT adapter of that experiment
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from looper import models, pipeline, prompts
from looper.artifacts import ArtifactStore
from looper.config import conf_dir, register_configs
from looper.data import load_splits
from looper.engine import paged
from looper.engine.kernels import attention


def main(overrides: list[str], n: int = 64) -> None:
    register_configs()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = OmegaConf.to_object(compose(config_name="config", overrides=["logger=none", *overrides]))
    target = pipeline.artifact(cfg, ArtifactStore(Path(cfg.paths.artifacts)), "sft")
    model, tokenizer = models.load_for_generation(str(target), cfg.model, cfg.lora, cfg.generation)
    problems = load_splits(cfg.data)["test"][:n]
    texts = [prompts.build_prompt(cfg.model, tokenizer, p["question"]) for p in problems]
    limit = cfg.eval.max_new_tokens or cfg.model.max_new_tokens
    special = cfg.model.prompt_format != "chat"  # (models.load_tokenizer pads on the left, for batched generate)
    for dtype in (model.dtype, torch.float32):
        model.to(dtype)
        tf32 = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        plain = []
        for prompt in texts:
            encoded = tokenizer(prompt, return_tensors="pt", add_special_tokens=special).to(model.device)
            output = model.generate(
                **encoded, max_new_tokens=limit, do_sample=False, pad_token_id=tokenizer.pad_token_id
            )[0, encoded["input_ids"].shape[1] :]
            plain.append(tokenizer.decode(output, skip_special_tokens=True))
        # the noise floor: plain generate on left-padded batches against itself one prompt at a time
        batched = []
        for first in range(0, len(texts), cfg.eval.batch_size):
            encoded = tokenizer(
                texts[first : first + cfg.eval.batch_size],
                return_tensors="pt",
                padding=True,
                add_special_tokens=special,
            ).to(model.device)
            output = model.generate(
                **encoded, max_new_tokens=limit, do_sample=False, pad_token_id=tokenizer.pad_token_id
            )[:, encoded["input_ids"].shape[1] :]
            batched += tokenizer.batch_decode(output, skip_special_tokens=True)
        runs = {"looper": attention.kernels}
        if model.device.type == "cuda":  # the same decoder with sdpa in place of the fast kernels
            runs["looper, sdpa kernels"] = lambda *args: ("sdpa", "sdpa")
        counts = {"plain generate batched": sum(a == b for a, b in zip(batched, plain))}
        for name, kernel in runs.items():
            original, attention.kernels = attention.kernels, kernel
            try:
                ours = paged.generate(
                    model,
                    tokenizer,
                    texts,
                    max_new_tokens=limit,
                    batch_size=cfg.eval.batch_size,
                    add_special_tokens=special,
                    desc=None,
                    stats=(stats := {}),
                )
            finally:
                attention.kernels = original
            counts[f"{name} ({stats['kernel']})"] = sum(a.text == b for a, b in zip(ours, plain))
        torch.backends.cuda.matmul.allow_tf32 = tf32
        print(
            f"{model.device} {str(dtype).replace('torch.', '')}, up to {limit} new tokens, {target.name}: equal "
            f"to plain generate one prompt at a time: "
            + ", ".join(f"{name} {count}/{len(texts)}" for name, count in counts.items()),
            flush=True,
        )


if __name__ == "__main__":
    main(sys.argv[1:])
