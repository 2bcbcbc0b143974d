"""The artifact cache: built once, reused after, keyed by its inputs, never trusted unless complete."""

import json

import pytest

from looper.artifacts import ArtifactError, ArtifactStore, artifact_key, is_complete


def _builder(calls):
    def build(out):
        calls.append(out)
        (out / "result.txt").write_text("ok")

    return build


def test_a_complete_artifact_is_reused_not_rebuilt(tmp_path):
    store, calls = ArtifactStore(tmp_path), []
    first = store.ensure("sft", {"lr": 1}, _builder(calls))
    second = ArtifactStore(tmp_path).ensure("sft", {"lr": 1}, _builder(calls))
    assert first == second and len(calls) == 1 and is_complete(first)
    assert (first / "result.txt").read_text() == "ok"


def test_a_changed_upstream_key_gives_a_new_downstream_artifact(tmp_path):
    store, calls = ArtifactStore(tmp_path), []
    sft_a = store.ensure("sft", {"lr": 1}, _builder(calls))
    sft_b = store.ensure("sft", {"lr": 2}, _builder(calls))
    rollout_a = store.ensure("rollout", {"sft": sft_a.name}, _builder(calls))
    rollout_b = store.ensure("rollout", {"sft": sft_b.name}, _builder(calls))
    assert sft_a != sft_b and rollout_a != rollout_b and len(calls) == 4


def test_a_failed_build_leaves_nothing_that_looks_complete(tmp_path):
    store = ArtifactStore(tmp_path)

    def crash(out):
        (out / "half.txt").write_text("half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        store.ensure("sft", {"lr": 1}, crash)
    final = store.path("sft", {"lr": 1})
    assert not final.exists() and final.with_name(final.name + ".partial").exists()


def test_an_incomplete_directory_is_redone(tmp_path):
    store, calls = ArtifactStore(tmp_path), []
    final = store.path("sft", {"lr": 1})
    final.mkdir(parents=True)
    (final / "stale.txt").write_text("from a crash")  # no DONE marker
    store.ensure("sft", {"lr": 1}, _builder(calls))
    assert len(calls) == 1 and is_complete(final) and not (final / "stale.txt").exists()


def test_a_resumable_build_keeps_its_partial_work(tmp_path):
    store = ArtifactStore(tmp_path)
    partial = store.path("eval", {"n": 1}).with_name(store.path("eval", {"n": 1}).name + ".partial")
    partial.mkdir(parents=True)
    (partial / "predictions.jsonl").write_text("done\n")
    seen = []
    store.ensure("eval", {"n": 1}, lambda out: seen.append((out / "predictions.jsonl").read_text()), resumable=True)
    assert seen == ["done\n"]


def test_the_key_depends_on_content_not_order():
    assert artifact_key({"a": 1, "b": [1, 2]}) == artifact_key({"b": [1, 2], "a": 1})
    assert artifact_key({"a": 1}) != artifact_key({"a": 2})


def test_the_run_records_what_it_used_and_made(tmp_path):
    record = tmp_path / "run" / "artifacts.jsonl"
    ArtifactStore(tmp_path / "a", record).ensure("sft", {"x": 1}, _builder([]))
    ArtifactStore(tmp_path / "a", record).ensure("sft", {"x": 1}, _builder([]))
    statuses = [json.loads(line)["status"] for line in record.read_text().splitlines()]
    assert statuses == ["made", "reused"]


def test_a_copied_cache_keeps_its_keys(tmp_path):
    import shutil

    store = ArtifactStore(tmp_path / "a")
    base = store.ensure("base", {"x": 1}, _builder([]))
    spec = {"base": store.identity(str(base))}
    shutil.copytree(tmp_path / "a", tmp_path / "b", symlinks=True)
    moved = ArtifactStore(tmp_path / "b")
    assert {"base": moved.identity(str(moved.path("base", {"x": 1})))} == spec
    assert store.identity("GAIR/Abel-7B-002") == {"hub": "GAIR/Abel-7B-002", "revision": "main"}


def _made(tmp_path, files: dict) -> tuple:
    store = ArtifactStore(tmp_path / "cache")

    def build(out):
        for name, text in files.items():
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            (out / name).write_text(text)

    return store, store.ensure("rollout", {"x": 1}, build)


@pytest.mark.parametrize(
    "damage,problem",
    [
        (lambda d: (d / "trajectories.jsonl").write_text("{}\n" * 800), "trajectories.jsonl has .* bytes"),  # cut
        (
            lambda d: (d / "trajectories.jsonl").write_text("{}\n" * 1599 + "[]\n"),
            "does not match its recorded SHA-256",
        ),
        (lambda d: (d / "trajectories.jsonl").unlink(), "trajectories.jsonl is missing"),
        (lambda d: (d / "adapter" / "weights.bin").write_bytes(b"garbage!"), "adapter/weights.bin has 8 bytes"),
        (lambda d: (d / "manifest.json").unlink(), "manifest.json is missing"),  # it is never re-certified
        (lambda d: (d / "spec.json").write_text('{"x": 2}'), "spec.json hashes to .*not to the directory's key"),
    ],
)
def test_a_damaged_artifact_stops_the_run_naming_the_file_and_the_fix(tmp_path, damage, problem):
    store, made = _made(tmp_path, {"trajectories.jsonl": "{}\n" * 1600, "adapter/weights.bin": "w" * 64})
    damage(made)
    with pytest.raises(ArtifactError, match=problem + r".*python -m looper.artifacts discard"):
        ArtifactStore(tmp_path / "cache").ensure("rollout", {"x": 1}, lambda out: None)


def test_discarding_a_damaged_artifact_rebuilds_it(tmp_path):
    from looper import artifacts

    store, made = _made(tmp_path, {"trajectories.jsonl": "{}\n" * 4})
    (made / "trajectories.jsonl").write_text("{}\n")
    artifacts.main(["discard", str(made)])
    rebuilt = []
    ArtifactStore(tmp_path / "cache").ensure("rollout", {"x": 1}, lambda out: rebuilt.append(out))
    assert rebuilt and (made / "manifest.json").exists() and list(made.parent.glob("*.discarded-*"))
    artifacts.main(["verify", str(made)])


def test_full_verification_hashes_every_file(tmp_path, monkeypatch):
    from looper import artifacts

    store, made = _made(tmp_path, {"model.safetensors": "a" * 1000})
    (made / "model.safetensors").write_text("b" * 1000)  # same size
    monkeypatch.setattr(artifacts, "QUICK_HASH_LIMIT", 100)  # a large file: quick checks its size only
    ArtifactStore(tmp_path / "cache").ensure("rollout", {"x": 1}, lambda out: None)
    with pytest.raises(ArtifactError, match="model.safetensors does not match"):
        ArtifactStore(tmp_path / "cache", verify="full").ensure("rollout", {"x": 1}, lambda out: None)


def test_a_local_model_rebuilt_with_other_weights_gets_a_new_identity(tmp_path):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    store = ArtifactStore(tmp_path / "cache")
    identities = []
    for seed in (0, 1, 1):
        torch.manual_seed(seed)
        LlamaForCausalLM(
            LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
        ).save_pretrained(tmp_path / "model")
        identities.append(store.identity(str(tmp_path / "model")))
    assert identities[0] != identities[1] and identities[1] == identities[2]
    (tmp_path / "model").rename(tmp_path / "moved")
    assert store.identity(str(tmp_path / "moved")) == identities[2]  # by content: moving it changes no key
    weights = tmp_path / "moved" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 1  # one bit in the middle of the weights
    weights.write_bytes(bytes(data))
    assert store.identity(str(tmp_path / "moved")) != identities[2]


def test_a_swapped_artifact_directory_is_refused_and_a_file_in_its_place_is_named(tmp_path):
    store = ArtifactStore(tmp_path)
    one = store.ensure("sft", {"lr": 1}, _builder([]))
    two = store.ensure("sft", {"lr": 2}, _builder([]))
    one.rename(tmp_path / "sft" / "aside")
    two.rename(one)  # lr=2's artifact where lr=1's belongs
    with pytest.raises(ArtifactError, match="renamed or swapped"):
        ArtifactStore(tmp_path).ensure("sft", {"lr": 1}, _builder([]))
    (tmp_path / "sft" / artifact_key({"lr": 3})).write_text("not a directory")
    with pytest.raises(ArtifactError, match="should be an artifact directory but is a file"):
        ArtifactStore(tmp_path).ensure("sft", {"lr": 3}, _builder([]))


def test_an_adapter_over_a_cached_model_follows_its_cache_when_copied_and_the_original_removed(tmp_path):
    import shutil

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from looper import models
    from looper.config import ModelConfig

    cache = tmp_path / "cache"
    LlamaForCausalLM(
        LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    ).save_pretrained(cache / "sft" / "full")
    base = AutoModelForCausalLM.from_pretrained(str(cache / "sft" / "full"))  # a full fine-tuned SFT, in the cache
    get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(str(cache / "dpo" / "policy"))
    models.portable_adapter(cache / "dpo" / "policy", cache)
    shutil.copytree(cache, tmp_path / "copy")
    shutil.rmtree(cache)
    policy = str(tmp_path / "copy" / "dpo" / "policy")
    assert models.adapter_base(policy) == str(tmp_path / "copy" / "sft" / "full")
    loaded = models.load_causal_lm(models.adapter_base(policy), ModelConfig(dtype="float32"))
    assert loaded.config.hidden_size == 16
