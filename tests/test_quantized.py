"""Generation over a quantized base: rollouts and evaluation serve the model as trained (the 4- or 8-bit base,
dequantized once, with the adapter), and how it is served enters the identities of what is generated."""

import pytest
import torch

from looper import models, pipeline, prompts
from looper.artifacts import ArtifactStore
from tests.conftest import compose


def test_how_a_quantized_base_is_served_enters_the_rollout_identity_and_nothing_else_does(tmp_path):
    store, up = ArtifactStore(tmp_path), {"sft": tmp_path / "sft" / "0123"}
    settings = ("auto", "always", "never")

    def rollout_spec(*overrides):
        return pipeline.stage_spec(compose(*overrides), store, "rollout", up)

    plain = [rollout_spec("lora=r64", f"generation.dequantize={d}") for d in settings]
    assert plain[0] == plain[1] == plain[2] and "generation.dequantize" not in plain[0]["reads"]  # full precision
    for bits in ("4bit", "8bit"):
        served = [rollout_spec(f"lora=qlora_{bits}", f"generation.dequantize={d}") for d in settings]
        assert [s["reads"]["generation.dequantize"] for s in served] == list(settings)
        assert {s["reads"]["lora.quantization"] for s in served} == {bits}
    with pytest.raises(Exception, match="generation.dequantize"):
        compose("generation.dequantize=sometimes")


def _adapter_over(base: str, out) -> str:
    """A LoRA adapter with random (non-zero) weights over `base`, saved to `out`."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base)
    torch.manual_seed(0)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(model, config).save_pretrained(str(out))
    AutoTokenizer.from_pretrained(base).save_pretrained(str(out))
    return str(out)


@pytest.mark.gpu
@pytest.mark.parametrize("bits", ["4bit", "8bit"])
def test_generation_serves_the_dequantized_base_with_the_adapter_and_matches_the_model_as_trained(
    fast_cfg, tiny_sft, tmp_path, bits
):
    pytest.importorskip("bitsandbytes")
    from looper.data import synthetic_splits
    from looper.engine.paged import generate

    cfg = fast_cfg(f"lora=qlora_{bits}", "model.dtype=float32")
    adapter = _adapter_over(tiny_sft[2], tmp_path / "adapter")
    trained, tokenizer = models.load_target(adapter, cfg.model, cfg.lora)  # as SFT and DPO compute
    served, _ = models.load_for_generation(adapter, cfg.model, cfg.lora, "always")
    assert models.is_quantized(trained) and not models.is_quantized(served)
    assert models.quantized_layers(trained) and not models.quantized_layers(served)
    questions = [p["question"] for p in synthetic_splits(cfg.data)["test"][:8]]
    texts = [prompts.build_prompt(cfg.model, tokenizer, q) for q in questions]
    ours = [g.text for g in generate(served, tokenizer, texts, max_new_tokens=24, batch_size=8, desc=None)]
    theirs = [g.text for g in generate(trained, tokenizer, texts, max_new_tokens=24, batch_size=8, desc=None)]
    assert sum(a == b for a, b in zip(ours, theirs)) >= (8 if bits == "4bit" else 7)  # LLM.int8 rounds activations
