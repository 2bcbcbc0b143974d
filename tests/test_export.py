"""stage=export: the final adapter merged into its base, a standalone model that plain transformers loads."""

import dataclasses
import json

import pytest
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from looper import models, pipeline, prompts
from looper.artifacts import ArtifactStore
from looper.data import synthetic_splits
from looper.engine.paged import generate


def test_export_writes_a_model_plain_transformers_loads_with_the_dpo_policys_outputs_and_accuracy(fast_cfg, tiny_sft):
    cfg = fast_cfg("stage=export", "export.dtype=float32", "eval.num_questions=8")
    store = ArtifactStore(cfg.paths.artifacts)
    graph = pipeline.Pipeline(cfg, store)
    out = graph.artifact("export")
    assert (out / "config.json").exists() and not (out / "adapter_config.json").exists()
    card = (out / "README.md").read_text()
    assert "| synthetic_test | 8 |" in card and str(graph.artifact("dpo")) in card
    lineage = yaml.safe_load((out / "looper_config.yaml").read_text())  # what each stage that made it read
    assert list(lineage)[:4] == ["base", "sft", "rollout", "preferences"] and "dpo" in lineage and "eval" in lineage
    assert lineage["dpo"]["dpo.beta"] == cfg.dpo.beta and lineage["eval"]["eval.num_questions"] == 8

    exported = AutoModelForCausalLM.from_pretrained(str(out)).to(models.device())  # plain transformers, no PEFT
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    # the adapter over its base, in the exported dtype
    policy, policy_tokenizer = models.load_target(
        str(graph.artifact("dpo")), dataclasses.replace(cfg.model, dtype="float32")
    )
    assert exported.dtype == policy.dtype
    questions = [p["question"] for p in synthetic_splits(cfg.data)["test"][:8]]
    texts = [prompts.build_prompt(cfg.model, policy_tokenizer, q) for q in questions]
    ours = [g.text for g in generate(exported, tokenizer, texts, max_new_tokens=48, batch_size=8, desc=None)]
    theirs = [g.text for g in generate(policy, policy_tokenizer, texts, max_new_tokens=48, batch_size=8, desc=None)]
    assert ours == theirs

    evaluated = json.loads((pipeline.evaluate(cfg, store, str(out), "synthetic_test") / "summary.json").read_text())
    dpo = json.loads((pipeline.evaluate(cfg, store, "dpo", "synthetic_test") / "summary.json").read_text())
    assert evaluated["acc_strict"] == dpo["acc_strict"] and evaluated["n"] == dpo["n"] == 8
    assert graph.artifact("export") == out  # cached: asked again, nothing is rebuilt


def test_export_of_the_sft_model_needs_no_rollout(artifacts, fast_cfg, tiny_sft, tmp_path):
    from tests.conftest import cache_sharing_models

    cache = cache_sharing_models(artifacts, tmp_path / "cache")
    cfg = fast_cfg(f"paths.artifacts={cache}", "stage=export", "export.source=sft", "eval.datasets=[]")
    store = ArtifactStore(cfg.paths.artifacts)
    out = pipeline.Pipeline(cfg, store).artifact("export")
    assert not list(store.root.glob("rollout/*")) and not list(store.root.glob("dpo/*"))
    assert AutoModelForCausalLM.from_pretrained(str(out)).dtype.is_floating_point
    assert "No evaluation was run" in (out / "README.md").read_text()


@pytest.mark.gpu
def test_export_writes_a_bitsandbytes_copy_that_plain_transformers_loads(artifacts, fast_cfg, tiny_sft, tmp_path):
    pytest.importorskip("bitsandbytes")
    from tests.conftest import cache_sharing_models

    cache = cache_sharing_models(artifacts, tmp_path / "cache")
    cfg = fast_cfg(
        f"paths.artifacts={cache}", "stage=export", "export.source=sft", "export.quantized=8bit", "eval.datasets=[]"
    )
    out = pipeline.Pipeline(cfg, ArtifactStore(cfg.paths.artifacts)).artifact("export")
    quantized = AutoModelForCausalLM.from_pretrained(str(out / "quantized-8bit"), device_map={"": 0})
    assert models.is_quantized(quantized) and quantized.config.quantization_config.load_in_8bit
    tokenizer = AutoTokenizer.from_pretrained(str(out / "quantized-8bit"))
    prompt = prompts.build_prompt(cfg.model, tokenizer, synthetic_splits(cfg.data)["test"][0]["question"])
    assert generate(quantized, tokenizer, [prompt], max_new_tokens=8, batch_size=1, desc=None)[0].num_tokens > 0


def test_a_copied_cache_with_the_original_removed_serves_eval_and_export_without_a_rebuild(
    artifacts, fast_cfg, tiny_sft, tmp_path
):
    import shutil

    from tests.conftest import cache_sharing_models

    first = cache_sharing_models(artifacts, tmp_path / "first")  # the session's base and SFT, linked in
    cfg = fast_cfg(f"paths.artifacts={first}", "eval.num_questions=4", "eval.datasets=[synthetic_test]")
    made = pipeline.Pipeline(cfg, ArtifactStore(first)).artifact("dpo")  # rollout, pairs and a LoRA over the SFT
    shutil.copytree(first, tmp_path / "copy")  # links resolved: a self-contained cache
    shutil.rmtree(first)
    moved = fast_cfg(f"paths.artifacts={tmp_path / 'copy'}", "eval.num_questions=4", "eval.datasets=[synthetic_test]")
    store = ArtifactStore(tmp_path / "copy")
    graph = pipeline.Pipeline(moved, store)
    assert graph.artifact("dpo") == tmp_path / "copy" / "dpo" / made.name and store.made == []  # reused, not rebuilt
    evaluated = json.loads((pipeline.evaluate(moved, store, "dpo", "synthetic_test") / "summary.json").read_text())
    assert evaluated["n"] == 4
    exported = graph.artifact("export")
    assert AutoModelForCausalLM.from_pretrained(str(exported)).dtype.is_floating_point
    card = (exported / "README.md").read_text()
    assert str(tmp_path / "copy") in card and str(first) not in card  # merged into the copy's own SFT
