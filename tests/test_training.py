"""SFT and DPO train what they should and nothing else; DPO's reference really is the SFT policy."""

import json
from pathlib import Path

import pytest
import torch

from looper import pipeline, training
from looper.data import synthetic_splits
from looper.models import load_tokenizer
from looper.prompts import build_prompt
from looper.stages import dpo, sft


def _snapshot(model) -> dict:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def _changed(before: dict, model, select) -> list[str]:
    return [n for n, p in model.named_parameters() if select(n) and not torch.equal(before[n], p.detach())]


def _pairs_dir(cfg, tokenizer_path, tmp_path, n=8):
    """Hand-made pairs: the gold solution is chosen, the same solution with a wrong result is rejected."""
    tokenizer = load_tokenizer(tokenizer_path, cfg.model)
    rows = []
    for problem in synthetic_splits(cfg.data)["train"][:n]:
        wrong = problem["answer"].replace(f"#### {problem['gold']}", f"#### {int(problem['gold']) + 1}")
        rows.append(
            {
                "prompt": build_prompt(cfg.model, tokenizer, problem["question"]),
                "chosen": problem["answer"],
                "rejected": wrong,
            }
        )
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path


def test_full_sft_changes_the_weights(tiny_sft, tmp_path):
    cfg, _, base, _ = tiny_sft
    trainer = sft.make_trainer(cfg, base, tmp_path)
    trainer.args.max_steps = 2
    before = _snapshot(trainer.model)
    trainer.train()
    assert len(_changed(before, trainer.model, lambda n: True)) > 0


def test_sft_loss_covers_the_completion_only(tiny_sft, tmp_path):
    cfg, _, base, _ = tiny_sft
    trainer = sft.make_trainer(cfg, base, tmp_path)
    example = trainer.train_dataset[0]
    labels = example["labels"]  # -100: no loss on that token
    prompt_ids = trainer.processing_class(
        sft.training_examples(cfg, trainer.processing_class)[0]["prompt"], add_special_tokens=False
    )["input_ids"]
    assert labels[: len(prompt_ids)] == [-100] * len(prompt_ids)
    assert all(label != -100 for label in labels[len(prompt_ids) :])
    assert labels[-1] == trainer.processing_class.eos_token_id  # the completion ends with EOS


def test_padding_free_batches_give_the_padded_loss(fast_cfg, tiny_sft, tmp_path):
    _, _, base, _ = tiny_sft
    losses = {}
    for padding_free in (True, False):
        trainer = sft.make_trainer(fast_cfg(f"sft.padding_free={str(padding_free).lower()}"), base, tmp_path)
        rows = [trainer.train_dataset[i] for i in range(6)]
        assert len({len(r["input_ids"]) for r in rows}) > 1, "the batch should need padding"
        batch = trainer.data_collator(rows)
        assert ("attention_mask" in batch) is not padding_free
        assert batch["input_ids"].shape[0] == (1 if padding_free else 6)
        with torch.no_grad():
            losses[padding_free] = trainer.model(**{k: v for k, v in batch.items() if torch.is_tensor(v)}).loss.item()
    # sequences stay apart inside the flattened row: attention across a boundary would change the loss
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)


def test_sft_leaves_out_examples_over_max_length(fast_cfg, tiny_sft, tmp_path):
    _, _, base, _ = tiny_sft
    everything = sft.make_trainer(fast_cfg(), base, tmp_path).train_dataset
    lengths = sorted(len(r) for r in everything["input_ids"])
    cut = lengths[len(lengths) // 2]
    kept = sft.make_trainer(fast_cfg(f"sft.max_length={cut}"), base, tmp_path).train_dataset
    assert len(kept) == sum(length <= cut for length in lengths) < len(everything)
    assert max(len(r) for r in kept["input_ids"]) <= cut


def test_lora_sft_trains_the_adapter_and_leaves_the_base(fast_cfg, tiny_sft, tmp_path):
    _, _, base, _ = tiny_sft
    cfg = fast_cfg("lora=r64")
    trainer = sft.make_trainer(cfg, base, tmp_path)
    trainer.args.max_steps = 2
    before = _snapshot(trainer.model)
    trainer.train()
    assert _changed(before, trainer.model, lambda n: "lora_" in n)
    assert _changed(before, trainer.model, lambda n: "lora_" not in n) == []


def _dpo_trains_policy_only(cfg, sft_dir, tmp_path):
    trainer = dpo.make_trainer(cfg, sft_dir, _pairs_dir(cfg, str(sft_dir), tmp_path), tmp_path)
    trainer.args.max_steps = 2
    model = trainer.model
    # with dropout off the policy equals the reference before training
    assert dpo.reference_margin(trainer)["max_abs_margin"] <= cfg.dpo.reference_tolerance
    before = _snapshot(model)
    trainer.train()
    assert (
        abs(dpo.first_step(trainer.state.log_history)["rewards/margins"]) < 1e-3
    )  # TRL's training-mode first step: dropout noise at most
    assert _changed(before, model, lambda n: ".default." in n), "the policy adapter did not train"
    assert _changed(before, model, lambda n: ".ref." in n) == [], "the reference adapter moved"
    assert _changed(before, model, lambda n: "lora_" not in n) == [], "base weights moved"
    return trainer


def test_dpo_after_lora_sft_trains_the_policy_against_a_frozen_copy(fast_cfg, tiny_sft, tmp_path):
    cfg = fast_cfg("lora=r64", "sft.max_steps=5")
    lora_sft = pipeline.artifact(cfg, tiny_sft[1], "sft")
    trainer = _dpo_trains_policy_only(cfg, lora_sft, tmp_path)
    assert set(trainer.model.peft_config) == {"default", "ref"}


def test_dpo_after_full_sft_trains_a_fresh_lora_over_the_frozen_sft_model(tiny_sft, tmp_path):
    cfg, _, _, full_sft = tiny_sft
    trainer = _dpo_trains_policy_only(cfg, full_sft, tmp_path)
    assert set(trainer.model.peft_config) == {"default"}  # reference = adapters disabled = the SFT model


def test_the_exported_dpo_adapter_has_no_reference_copy(fast_cfg, tiny_sft, tmp_path):
    cfg = fast_cfg("lora=r64", "sft.max_steps=5", "dpo.max_steps=1")
    lora_sft = pipeline.artifact(cfg, tiny_sft[1], "sft")
    out = tmp_path / "dpo"
    out.mkdir()
    dpo.build(cfg, {"sft": lora_sft, "preferences": _pairs_dir(cfg, str(lora_sft), tmp_path)}, out)
    assert (out / "adapter_config.json").exists() and not (out / "ref").exists()
    assert json.loads((out / "reference_check.json").read_text())["ok"] is True


def test_padding_free_dpo_gives_the_padded_loss_without_computing_padding(tiny_sft, tmp_path, fast_cfg):
    losses, shapes = {}, {}
    for padding_free in (True, False):
        cfg = fast_cfg(f"dpo.padding_free={str(padding_free).lower()}", "dpo.precompute_ref_log_probs=false")
        trainer = dpo.make_trainer(cfg, tiny_sft[3], _pairs_dir(cfg, str(tiny_sft[3]), tmp_path), tmp_path)
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
        assert (batch["attention_mask"] == 0).any(), "the batch should need padding"
        embed = trainer.model.get_input_embeddings()
        hook = embed.register_forward_hook(lambda m, args, out, key=padding_free: shapes.update({key: args[0].shape}))
        trainer.model.eval()
        with torch.no_grad():
            losses[padding_free] = trainer.compute_loss(trainer.model, batch).item()
        hook.remove()
    # the layers saw the real tokens as one row (the padded batch: 8 rows, chosen and rejected, padded to the longest)
    assert shapes[True] == (1, int(batch["attention_mask"].sum())) and shapes[False] == batch["input_ids"].shape
    # sequences stay apart inside the row: attention across a boundary would change the loss
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)


@pytest.mark.parametrize("precompute", [True, False])
def test_dpo_reference_log_probs_can_be_precomputed(tiny_sft, tmp_path, precompute, fast_cfg):
    cfg = fast_cfg(f"dpo.precompute_ref_log_probs={str(precompute).lower()}")
    trainer = dpo.make_trainer(cfg, tiny_sft[3], _pairs_dir(cfg, str(tiny_sft[3]), tmp_path), tmp_path)
    assert ("ref_chosen_logps" in trainer.train_dataset.column_names) is precompute
    # every file of the dataset, the cached reference log-probs included, lies in the run's directory (which all
    # processes share), not in a per-process temporary directory that other ranks cannot read
    files = [f["filename"] for f in trainer.train_dataset.cache_files]
    assert files and all(Path(f).is_relative_to(tmp_path / "trainer" / "pairs") for f in files)


def test_an_adapter_loaded_for_inference_is_merged_into_its_base(fast_cfg, tiny_sft):
    from peft import PeftModel

    from looper import models

    cfg = fast_cfg("lora=r64", "sft.max_steps=5")
    lora_sft = str(pipeline.artifact(cfg, tiny_sft[1], "sft"))
    merged, tokenizer = models.load_target(lora_sft, cfg.model, cfg.lora)
    assert not isinstance(merged, PeftModel) and not any("lora_" in n for n, _ in merged.named_parameters())
    base = models.load_causal_lm(models.adapter_base(lora_sft), cfg.model).eval()
    ids = tokenizer(["Q: 3 + 4 = ?"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        plain = base(ids).logits
        unmerged = PeftModel.from_pretrained(base, lora_sft).eval()(ids).logits
        assert (unmerged - plain).abs().max() > 1e-3  # the adapter matters
        torch.testing.assert_close(merged(ids).logits, unmerged, atol=1e-4, rtol=1e-4)


def test_a_diverged_training_fails_and_saves_nothing(tiny_sft, tmp_path):
    cfg, store, base, _ = tiny_sft
    trainer = sft.make_trainer(cfg, base, tmp_path)
    training.ensure_finite("sft", trainer, 1.0, "sft.learning_rate")  # a healthy model passes
    with torch.no_grad():
        next(p for p in trainer.model.parameters() if p.requires_grad).fill_(float("nan"))
    with pytest.raises(RuntimeError, match="sft: training diverged .* Lower sft.learning_rate"):
        training.ensure_finite("sft", trainer, 1.0, "sft.learning_rate")
    trainer.state.log_history.append({"loss": float("nan")})
    with pytest.raises(RuntimeError, match="losses .*nan"):
        training.ensure_finite("sft", trainer, 1.0, "sft.learning_rate")


def test_an_adapter_with_nan_weights_refuses_to_load(fast_cfg, tiny_sft, tmp_path):
    from safetensors.torch import load_file, save_file

    from looper import models

    cfg = fast_cfg("lora=r64", "sft.max_steps=5")
    adapter = pipeline.artifact(cfg, tiny_sft[1], "sft")
    broken = tmp_path / "adapter"
    import shutil

    shutil.copytree(adapter, broken)
    weights = load_file(broken / "adapter_model.safetensors")
    save_file({k: torch.full_like(v, float("nan")) for k, v in weights.items()}, broken / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=f"the adapter {broken} holds NaN or inf weights"):
        models.load_target(str(broken), cfg.model)
