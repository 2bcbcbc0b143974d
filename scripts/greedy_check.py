"""Greedy decoding through looper's generation path against plain `model.generate`, prompt by prompt, on a trained
model: the SFT policy of the configuration given as Hydra overrides (built first if the cache has none; the default
is the tiny demo's). Prints how many outputs are identical, in the model's dtype and in float32.

    python scripts/greedy_check.py                              # tiny demo SFT, 64 synthetic test questions
    python scripts/greedy_check.py experiment=abel_platinum     # the 7B SFT adapter of that experiment
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hydra import compose, initialize_config_dir  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from looper import generation, models, sft  # noqa: E402
from looper.artifacts import ArtifactStore  # noqa: E402
from looper.config import register_configs  # noqa: E402
from looper.data import load_splits  # noqa: E402


def main(overrides: list[str], n: int = 64) -> None:
    register_configs()
    with initialize_config_dir(config_dir=str(Path(__file__).resolve().parents[1] / "conf"), version_base="1.3"):
        cfg = OmegaConf.to_object(compose(config_name="config", overrides=["logger=none", *overrides]))
    target = sft.run(cfg, ArtifactStore(Path(cfg.paths.artifacts)))
    model, tokenizer = models.load_target(str(target), cfg.model)
    problems = load_splits(cfg.data)["test"][:n]
    prompts = [models.build_prompt(cfg.model, tokenizer, p["question"]) for p in problems]
    limit = cfg.eval.max_new_tokens or cfg.model.max_new_tokens
    special = cfg.model.prompt_format != "chat"
    for dtype in (model.dtype, torch.float32):
        model.to(dtype)
        tf32 = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        ours = generation.generate(model, tokenizer, prompts, max_new_tokens=limit, batch_size=cfg.eval.batch_size,
                                   add_special_tokens=special, desc=None)
        same = 0
        for prompt, output in zip(prompts, ours):
            encoded = tokenizer(prompt, return_tensors="pt", add_special_tokens=special).to(model.device)
            plain = model.generate(**encoded, max_new_tokens=limit, do_sample=False,
                                   pad_token_id=tokenizer.pad_token_id)[0, encoded["input_ids"].shape[1]:]
            same += tokenizer.decode(plain, skip_special_tokens=True) == output.text
        torch.backends.cuda.matmul.allow_tf32 = tf32
        print(f"{model.device} {str(dtype).replace('torch.', '')}: looper greedy == plain generate for {same} of "
              f"{len(prompts)} prompts (up to {limit} new tokens, {target.name})", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
