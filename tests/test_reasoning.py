"""Reasoning models (R1-distill style): one BOS everywhere, SFT and DPO in the model's think format, the arm in the
user turn, the benchmark's reasoning-model prompt, and truncated or unclosed traces scored as unanswered."""

import importlib.util
import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from looper import models, prompts
from looper.config import ArmConfig
from looper.data import synthetic_splits
from looper.engine.paged import generate
from looper.stages import dpo, evaluation, sft
from tests.conftest import ROOT

# the R1-style tokenizer of scripts/reasoning_probe.py (which builds the GPU probe's model)
_spec = importlib.util.spec_from_file_location("reasoning_probe", ROOT / "scripts" / "reasoning_probe.py")
probe = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(probe)
USER, ASSISTANT = probe.USER, probe.ASSISTANT
R1_OVERRIDES = [
    "model.prompt_format=chat",
    "model.reasoning=think",
    "model.system_prompt=user",
    "model.completion_template='{reasoning}\n</think>\n\n**Final Answer**\n\\[\n\\boxed{{{answer}}}\n\\]'",
]


def _r1_model(directory, cfg, bos_in_template: bool):
    """A tiny random Llama with a locally trained tokenizer and an R1-style chat template; the template writes BOS
    itself, or the tokenizer adds it (its special tokens)."""
    texts = [row["question"] + " " + row["answer"] for row in synthetic_splits(cfg.data)["train"][:300]]
    fast = probe.r1_tokenizer(texts, 300, bos_in_template)
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(fast),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=2048,
            bos_token_id=fast.bos_token_id,
            eos_token_id=fast.eos_token_id,
            pad_token_id=fast.pad_token_id,
        )
    )
    model.save_pretrained(directory)
    fast.save_pretrained(directory)
    return str(directory)


@pytest.fixture(params=[True, False], ids=["template-writes-bos", "tokenizer-adds-bos"])
def r1(request, fast_cfg, tmp_path):
    """(cfg, model directory, tokenizer) of a reasoning model with an R1-style template."""
    base = fast_cfg(*R1_OVERRIDES, "sft.num_examples=4", "sft.padding_free=false")
    path = _r1_model(tmp_path / "r1", base, request.param)
    cfg = fast_cfg(*R1_OVERRIDES, "sft.num_examples=4", "sft.padding_free=false", f"model.name_or_path={path}")
    return cfg, path, models.load_tokenizer(path, cfg.model)


def _one_bos(ids: list[int], tokenizer) -> bool:
    return ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1


def test_sft_trains_on_generations_prompt_ids_then_the_completion_with_one_bos(r1, tmp_path):
    cfg, path, tokenizer = r1
    trainer = sft.make_trainer(cfg, path, tmp_path)
    example = sft.training_examples(cfg, tokenizer)[0]
    prompt_ids = prompts.encode_prompt(tokenizer, example["prompt"])  # what generate() feeds the model
    completion_ids = tokenizer(example["completion"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    row = trainer.train_dataset[0]
    assert row["input_ids"] == prompt_ids + completion_ids and _one_bos(row["input_ids"], tokenizer)
    assert row["labels"][: len(prompt_ids)] == [-100] * len(prompt_ids)


def test_generation_tokenizes_prompts_with_one_bos(r1):
    cfg, path, tokenizer = r1
    prompt = prompts.build_prompt(cfg.model, tokenizer, "How many?")
    assert _one_bos(prompts.encode_prompt(tokenizer, prompt), tokenizer)
    model = models.load_causal_lm(path, cfg.model)
    seen = []
    original = model.forward

    def spy(*args, **kwargs):
        seen.append(kwargs.get("input_ids", args[0] if args else None))
        return original(*args, **kwargs)

    model.forward = spy
    generate(model, tokenizer, [prompt], max_new_tokens=1, batch_size=1, desc=None)
    first = seen[0].flatten().tolist()
    assert first[: len(prompts.encode_prompt(tokenizer, prompt))] == prompts.encode_prompt(tokenizer, prompt)


def test_dpo_trains_on_generations_prompt_ids_then_each_completion_with_one_bos(r1, tmp_path):
    cfg, path, tokenizer = r1
    prompt = prompts.build_prompt(cfg.model, tokenizer, "How many?")
    chosen, rejected = "2+3=5\n</think>\n\n\\boxed{5}", "2+3=6\n</think>\n\n\\boxed{6}"
    (tmp_path / "pairs.jsonl").write_text(json.dumps({"prompt": prompt, "chosen": chosen, "rejected": rejected}) + "\n")
    trainer = dpo.make_trainer(cfg, path, tmp_path, tmp_path)
    row = trainer.train_dataset[0]
    assert row["prompt_ids"] == prompts.encode_prompt(tokenizer, prompt) and _one_bos(row["prompt_ids"], tokenizer)
    assert row["chosen_ids"] == tokenizer(chosen, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert tokenizer.bos_token_id not in row["chosen_ids"] + row["rejected_ids"]


def test_an_sft_completion_thinks_closes_the_block_and_ends_in_a_box(r1):
    cfg, _, tokenizer = r1
    example = sft.training_examples(cfg, tokenizer)[0]
    assert example["prompt"].endswith("<think>\n")  # the template opened the think block
    gold = synthetic_splits(cfg.data)["train"][0]["gold"]
    assert "</think>" in example["completion"] and example["completion"].rstrip().endswith(f"\\boxed{{{gold}}}\n\\]")
    assert "<<" not in example["completion"]  # GSM8K's calculator annotations are not R1's format


def test_a_completion_opens_the_think_block_when_the_prompt_did_not(r1):
    cfg, _, _ = r1
    completion = prompts.build_completion(cfg.model, "2+3=5\n#### 5", prompt="<｜User｜>q<｜Assistant｜>")
    assert completion.startswith("<think>\n2+3=5\n</think>")


def test_arms_go_in_the_user_turn_for_models_that_advise_against_a_system_prompt(r1):
    cfg, _, tokenizer = r1
    arm = ArmConfig(system_prompt="You are a patient teacher.", style="Explain each step.")
    prompt = prompts.build_prompt(cfg.model, tokenizer, "How many?", arm)
    assert f"{USER}You are a patient teacher.\n\nHow many?\nExplain each step.{ASSISTANT}" in prompt


def test_reasoning_models_get_the_benchmarks_prompt_without_think_step_by_step(r1):
    cfg, _, tokenizer = r1
    official = prompts.build_prompt(cfg.model, tokenizer, "How many?", official=True)
    assert "Answer: XXX" in official and "Think step-by-step" not in official


def test_a_truncated_or_unclosed_trace_is_recorded_and_unanswered(r1):
    cfg, _, _ = r1
    problem = {"id": "q", "question": "How many?", "gold": "8"}
    closed = "<think>\n5+3=8\n</think>\n\nAnswer: 8"
    record = evaluation.scored(problem, closed, 9, "stop", ["platinum"], cfg.model)
    assert (record["truncated"], record["think_closed"], record["correct_platinum"]) == (False, True, True)
    cut = evaluation.scored(problem, closed, 9, "length", ["platinum"], cfg.model)
    assert (cut["truncated"], cut["pred_platinum"], cut["correct_platinum"]) == (True, None, False)
    unclosed = evaluation.scored(problem, "<think>\n5+3=8, Answer: 8", 9, "stop", ["platinum"], cfg.model)
    assert (unclosed["think_closed"], unclosed["pred_platinum"]) == (False, None)


def test_the_reference_check_stops_dpo_when_the_policy_does_not_start_at_the_reference(r1, tmp_path):
    cfg, path, tokenizer = r1
    prompt = prompts.build_prompt(cfg.model, tokenizer, "How many?")
    (tmp_path / "pairs.jsonl").write_text(
        json.dumps({"prompt": prompt, "chosen": "5 </think> 5", "rejected": "6 </think> 6"}) + "\n"
    )
    trainer = dpo.make_trainer(cfg, path, tmp_path, tmp_path)
    assert dpo._check_reference(cfg, trainer)["max_abs_margin"] == 0.0  # fresh LoRA: the policy is the reference
    with torch.no_grad():  # move the policy's adapter away from the reference
        for name, parameter in trainer.model.named_parameters():
            if "lora_B" in name:
                parameter.add_(0.5)
    with pytest.raises(RuntimeError, match="dpo.reference_tolerance"):
        dpo._check_reference(cfg, trainer)
