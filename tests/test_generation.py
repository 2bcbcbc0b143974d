"""The shared generation path: greedy equals plain `generate`, and seeded sampling is reproducible row by row."""

import dataclasses
import json
import warnings

import pytest
import torch

from looper import models, prompts
from looper.engine import cache, runner, scheduler
from looper.engine.kernels import fused
from looper.engine.paged import generate
from looper.engine.runner import AttentionSwitch
from looper.engine.sampling import seeded_choice


def _prompts(cfg, tokenizer, n=6):
    from looper.data import synthetic_splits

    return [prompts.build_prompt(cfg.model, tokenizer, p["question"]) for p in synthetic_splits(cfg.data)["test"][:n]]


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_greedy_equals_plain_generate_one_prompt_at_a_time(fixed_model, attention):
    cfg, model, tokenizer = fixed_model
    model.set_attn_implementation(attention)
    prompts = _prompts(cfg, tokenizer, n=12)
    limits = [3 + 7 * k for k in range(len(prompts))]  # rows end at different steps: slots are refilled mid-decode
    finished = []
    ours = generate(
        model,
        tokenizer,
        prompts,
        max_new_tokens=limits,
        batch_size=4,
        refill_at=0.25,
        on_result=lambda i, g: finished.append(i),
    )
    assert sorted(finished) == list(range(len(prompts)))
    for prompt, limit, result in zip(prompts, limits, ours):
        encoded = tokenizer(prompt, return_tensors="pt")
        plain = model.generate(**encoded, max_new_tokens=limit, do_sample=False)[0, encoded["input_ids"].shape[1] :]
        assert result.text == tokenizer.decode(plain, skip_special_tokens=True)
        ended = plain[-1].item() == tokenizer.eos_token_id
        assert result.num_tokens == len(plain) and result.finish_reason == ("stop" if ended else "length")


def test_a_rows_sample_does_not_depend_on_its_batch(fixed_model):
    cfg, model, tokenizer = fixed_model
    prompts = _prompts(cfg, tokenizer) * 2
    seeds = list(range(100, 100 + len(prompts)))
    kwargs = {"max_new_tokens": 40, "temperature": 1.0, "top_p": 0.95}
    alone = [generate(model, tokenizer, [p], batch_size=1, seeds=[s], **kwargs)[0].text for p, s in zip(prompts, seeds)]
    batched = [g.text for g in generate(model, tokenizer, prompts, batch_size=5, seeds=seeds, **kwargs)]
    reversed_ = [g.text for g in generate(model, tokenizer, prompts[::-1], batch_size=12, seeds=seeds[::-1], **kwargs)][
        ::-1
    ]
    assert alone == batched == reversed_
    assert len(set(batched[:6]) | set(batched[6:])) > 6, "different seeds should give different samples"


def test_seeded_sampling_draws_from_the_tempered_top_p_distribution():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    counts = torch.zeros(4)
    for seed in range(4000):
        counts[
            seeded_choice(logits, torch.tensor([seed]), torch.tensor([0]), torch.tensor([1.0]), torch.tensor([0.9]))
        ] += 1
    # top_p=0.9 keeps 0.5, 0.3, 0.15 (0.95 >= 0.9 first reached there); renormalised: 0.526, 0.316, 0.158, 0
    assert counts[3] == 0
    assert torch.allclose(counts[:3] / 4000, torch.tensor([0.526, 0.316, 0.158]), atol=0.03)


def test_refill_at_changes_how_often_slots_are_refilled_and_never_the_outputs(fixed_model):
    cfg, model, tokenizer = fixed_model
    prompts = _prompts(cfg, tokenizer, n=12)
    limits = [3 + 7 * k for k in range(len(prompts))]
    runs = {}
    for refill_at in (0.25, 1.0):  # one free slot of four triggers a refill / only an all-free batch does
        stats = {}
        texts = [
            g.text
            for g in generate(
                model,
                tokenizer,
                prompts,
                max_new_tokens=limits,
                batch_size=4,
                refill_at=refill_at,
                stats=stats,
                desc=None,
            )
        ]
        runs[refill_at] = (texts, stats)
    assert runs[0.25][0] == runs[1.0][0]
    assert runs[0.25][1]["prefills"] > runs[1.0][1]["prefills"]
    assert runs[0.25][1]["decode_steps"] < runs[1.0][1]["decode_steps"]  # fewer idle slots, fewer steps
    for _, stats in runs.values():  # the drain: the steps after the last prompt started
        assert 0 < stats["drain_steps"] < stats["decode_steps"] and stats["drain_seconds"] > 0
    stats = {}  # all prompts start at once: every step is a drain step
    generate(model, tokenizer, prompts, max_new_tokens=limits, batch_size=len(prompts), stats=stats, desc=None)
    assert stats["drain_steps"] == stats["decode_steps"] > 0


def test_generate_attends_with_its_own_function_and_gives_the_models_back(fixed_model):
    cfg, model, tokenizer = fixed_model
    model.set_attn_implementation("eager")
    generate(model, tokenizer, _prompts(cfg, tokenizer, n=2), max_new_tokens=3, batch_size=2, desc=None)
    assert model.config._attn_implementation == "eager"

    class Model:  # set_attn_implementation as transformers models have it; flash_attention_2 needs flash_attn
        device, dtype = torch.device("cpu"), torch.float32

        def __init__(self, implementation):
            self.config = type("Config", (), {"_attn_implementation": implementation})()
            self.seen = []

        def set_attn_implementation(self, name):
            self.seen.append(name)
            self.config._attn_implementation = name

    flash = Model("flash_attention_2")
    with AttentionSwitch(flash):
        assert flash.config._attn_implementation == "looper_slots"
    assert flash.seen == ["looper_slots", "flash_attention_2"]


def test_generation_compile_runs_the_decode_step_through_torch_compile_with_the_same_outputs(tiny_sft, monkeypatch):
    from torch._dynamo.utils import counters

    from looper.stages import rollout

    monkeypatch.setattr(fused, "COMPILE_BACKEND", "eager")  # dynamo traces the step; no C++ build on a CPU
    cfg, _, _, sft_dir = tiny_sft
    model, tokenizer = models.load_target(str(sft_dir), cfg.model)
    arm = next(iter(cfg.arms.values()))
    jobs = [(p, arm, 11 * k) for k, p in enumerate(_prompts(cfg, tokenizer, n=10))]
    outputs = {}
    for compiled in (False, True):
        monkeypatch.setattr(cfg.generation, "compile", compiled)  # (the session's cfg: restored afterwards)
        traced = counters["stats"]["unique_graphs"]
        outputs[compiled] = [g.text for g in rollout.Sampler(cfg, model, tokenizer).run(jobs)]
        assert (counters["stats"]["unique_graphs"] > traced) == compiled
    assert outputs[True] == outputs[False]


def test_generation_compile_also_compiles_the_prefills_mlps_and_rotary_embedding_and_restores_them(
    tiny_sft, monkeypatch
):
    from torch._dynamo.utils import counters
    from transformers.models.llama import modeling_llama

    monkeypatch.setattr(fused, "COMPILE_BACKEND", "eager")
    cfg, _, _, sft_dir = tiny_sft
    model, tokenizer = models.load_target(str(sft_dir), cfg.model)
    prompts, original = _prompts(cfg, tokenizer, n=6), modeling_llama.apply_rotary_pos_emb
    plain = [g.text for g in generate(model, tokenizer, prompts, max_new_tokens=12, batch_size=4, desc=None)]
    seen = []
    patched = fused.Patched.__enter__
    mlps = [m for m in model.modules() if type(m).__name__ == "LlamaMLP"]

    def entered(self):  # what the forward runs with (the first: a prefill's)
        patched(self)
        seen.append((modeling_llama.apply_rotary_pos_emb, [vars(m).get("forward") for m in mlps]))
        return self

    monkeypatch.setattr(fused.Patched, "__enter__", entered)
    torch._dynamo.reset()  # so that this test traces its graphs whatever ran before it
    fused._compiled.cache_clear()
    runner.compiled_decode_logits.cache_clear()
    traced, stats = counters["stats"]["unique_graphs"], {}
    compiled = [
        g.text
        for g in generate(
            model, tokenizer, prompts, max_new_tokens=12, batch_size=4, desc=None, compile_decode=True, stats=stats
        )
    ]
    assert compiled == plain
    assert stats["compiled_prefill"] == ["LlamaMLP", "apply_rotary_pos_emb"]
    rotary, forwards = seen[0]
    assert rotary is not original and len(forwards) == model.config.num_hidden_layers and all(forwards)
    assert counters["stats"]["unique_graphs"] >= traced + 3  # the decode step, an MLP, the rotary embedding
    assert modeling_llama.apply_rotary_pos_emb is original  # restored
    assert not any("forward" in vars(m) for m in model.modules())


def test_generation_compile_leaves_a_quantized_model_uncompiled(tiny_sft, monkeypatch, caplog):

    monkeypatch.setattr(fused, "COMPILE_BACKEND", "eager")
    cfg, _, _, sft_dir = tiny_sft
    model, tokenizer = models.load_target(str(sft_dir), cfg.model)
    monkeypatch.setattr(model.config, "quantization_config", {"quant_method": "bitsandbytes"}, raising=False)
    stats = {}
    generate(
        model,
        tokenizer,
        _prompts(cfg, tokenizer, n=2),
        max_new_tokens=4,
        batch_size=2,
        stats=stats,
        compile_decode=True,
        desc=None,
    )
    assert stats["compiled_decode"] is False and "not for a quantized model" in caplog.text


def test_identical_prompts_are_prefilled_once_and_sample_as_if_alone(fixed_model):
    cfg, model, tokenizer = fixed_model
    prompts = _prompts(cfg, tokenizer, n=3) * 4  # three questions, four samples each (as arms=single samples)
    seeds = list(range(7, 7 + len(prompts)))
    kwargs = {"max_new_tokens": 24, "temperature": 1.0, "top_p": 0.95}
    stats = {}
    shared = [
        g.text
        for g in generate(model, tokenizer, prompts, batch_size=12, seeds=seeds, stats=stats, desc=None, **kwargs)
    ]
    alone = [
        generate(model, tokenizer, [p], batch_size=1, seeds=[s], desc=None, **kwargs)[0].text
        for p, s in zip(prompts, seeds)
    ]
    assert shared == alone
    assert stats["prefill_shared"] == 9
    distinct_tokens = sum(len(tokenizer(p)["input_ids"]) for p in prompts[:3])
    assert stats["prefill_tokens"] == distinct_tokens - stats["prefix_shared_tokens"]
    # the samples of a prompt hold its full KV pages together: each other sample has only its last, partial page
    first = {}
    generate(model, tokenizer, prompts, batch_size=12, max_new_tokens=1, stats=first, desc=None)
    page, lengths = cache.PAGE, [len(tokenizer(p)["input_ids"]) for p in prompts[:3]]
    assert first["peak_pages"] == sum(-(-n // page) + 3 * (-(-n // page) - n // page) for n in lengths)
    assert stats["kv_shared_positions"] > 0  # decode steps read the shared pages (once in memory)


def test_prompts_that_begin_alike_share_their_prefix_and_sample_as_if_alone(fixed_model):
    cfg, model, tokenizer = fixed_model
    questions = _prompts(cfg, tokenizer, n=6)
    preambles = ["Solve this with care and check every step twice.\n", "Answer briefly.\n"]  # two "arms"
    prompts = [p + q for p in preambles for q in questions] + [questions[0]]  # and one prompt with no preamble
    seeds = list(range(3, 3 + len(prompts)))
    kwargs = {"max_new_tokens": 16, "temperature": 1.0, "top_p": 0.95}
    stats = {}
    shared = [
        g.text
        for g in generate(
            model, tokenizer, prompts, batch_size=8, refill_at=0.5, seeds=seeds, stats=stats, desc=None, **kwargs
        )
    ]
    alone = [
        generate(model, tokenizer, [p], batch_size=1, seeds=[s], desc=None, **kwargs)[0].text
        for p, s in zip(prompts, seeds)
    ]
    assert shared == alone
    encoded = tokenizer(prompts)["input_ids"]
    assert stats["prefix_shared_tokens"] > 0
    assert stats["prefill_tokens"] == sum(map(len, encoded)) - stats["prefix_shared_tokens"]
    first = {}  # the full KV pages of a shared prefix serve every prompt after it
    generate(model, tokenizer, prompts, batch_size=len(prompts), max_new_tokens=1, stats=first, desc=None)
    assert first["prefix_shared_tokens"] > 2 * cache.PAGE
    assert first["peak_pages"] < sum(-(-len(ids) // cache.PAGE) for ids in encoded) - 2
    greedy = generate(model, tokenizer, prompts, batch_size=8, max_new_tokens=12, desc=None)
    for prompt, result in zip(prompts, greedy):
        single = tokenizer(prompt, return_tensors="pt")
        plain = model.generate(**single, max_new_tokens=12, do_sample=False)[0, single["input_ids"].shape[1] :]
        assert result.text == tokenizer.decode(plain, skip_special_tokens=True)


def test_later_prefills_read_a_prefix_from_the_pages_of_a_row_already_decoding(fixed_model, monkeypatch):
    cfg, model, tokenizer = fixed_model
    examples = "".join(f"Question: what is {a} plus {a + 1}?\nAnswer: {2 * a + 1}.\n" for a in range(2, 7))
    prompts = [examples + q for q in _prompts(cfg, tokenizer, n=8)]  # the same "few-shot" examples before each
    seeds = list(range(11, 11 + len(prompts)))
    limits = [5, 12, 7, 16, 6, 10, 8, 14]  # (rows end apart, so a refill finds a row still decoding)
    kwargs = {"temperature": 1.0, "top_p": 0.95, "desc": None}
    runs = {}
    for reading in (True, False):  # four slots: after the first prefill, one or two prompts a prefill
        if not reading:
            monkeypatch.setattr(scheduler.Scheduler, "_resident", lambda self, distinct: (None, [0] * len(distinct)))
        stats = {}
        runs[reading] = (
            [
                g.text
                for g in generate(
                    model,
                    tokenizer,
                    prompts,
                    max_new_tokens=limits,
                    batch_size=4,
                    refill_at=0.25,
                    seeds=seeds,
                    stats=stats,
                    **kwargs,
                )
            ],
            stats,
        )
    (read, stats), (computed, without) = runs[True], runs[False]
    alone = [
        generate(model, tokenizer, [p], max_new_tokens=n, batch_size=1, seeds=[s], **kwargs)[0].text
        for p, n, s in zip(prompts, limits, seeds)
    ]
    assert read == computed == alone
    examples_pages = len(tokenizer(examples)["input_ids"]) // cache.PAGE
    saved = stats["prefix_shared_tokens"] - without["prefix_shared_tokens"]
    # two later prefills, at least, each reading the examples' full pages (but the last, which the question may share)
    assert examples_pages >= 3 and saved >= 2 * (examples_pages - 1) * cache.PAGE
    assert stats["prefill_tokens"] == without["prefill_tokens"] - saved


def test_a_prompt_longer_than_a_prefill_is_computed_in_chunks_with_the_same_outputs(fixed_model, monkeypatch):
    cfg, model, tokenizer = fixed_model
    examples = "".join(f"Question: what is {a} plus {a + 1}?\nAnswer: {2 * a + 1}.\n" for a in range(2, 6))
    questions = _prompts(cfg, tokenizer, n=4)
    prompts = [examples + q for q in questions] + [examples + questions[0]]  # (the last: a second sample of one)
    seeds = list(range(21, 21 + len(prompts)))
    limits = [6, 11, 8, 13, 9]
    kwargs = {"temperature": 1.0, "top_p": 0.95, "desc": None}
    whole, chunked = {}, {}
    expected = [
        g.text
        for g in generate(
            model, tokenizer, prompts, max_new_tokens=limits, batch_size=3, seeds=seeds, stats=whole, **kwargs
        )
    ]
    monkeypatch.setattr(scheduler, "PREFILL_TOKENS", 24)  # every prompt is several times as long
    shortest = min(len(ids) for ids in tokenizer(prompts)["input_ids"])
    assert shortest > 3 * 24
    got = [
        g.text
        for g in generate(
            model, tokenizer, prompts, max_new_tokens=limits, batch_size=3, seeds=seeds, stats=chunked, **kwargs
        )
    ]
    assert got == expected
    assert chunked["prefills"] >= len(questions) * 3 > whole["prefills"]
    assert chunked["prefill_tokens"] >= whole["prefill_tokens"]  # (fewer prompts share one forward's prefix)
    greedy = generate(model, tokenizer, prompts[:2], max_new_tokens=10, batch_size=2, desc=None)
    for prompt, result in zip(prompts, greedy):
        single = tokenizer(prompt, return_tensors="pt")
        plain = model.generate(**single, max_new_tokens=10, do_sample=False)[0, single["input_ids"].shape[1] :]
        assert result.text == tokenizer.decode(plain, skip_special_tokens=True)


def test_shared_prefixes_group_neighbours_while_that_saves_tokens():

    a, b = [1, 2, 3, 4], [1, 2, 3, 5, 6]
    assert scheduler.shared_prefixes([a, b, [1, 2, 9], [7, 8]], 2) == [(0, 3, 2)]  # three share 2 (saves 4 > 3 by two)
    assert scheduler.shared_prefixes([a, b, [1, 9]], 2) == [(0, 2, 3)]  # the third shares too little
    assert scheduler.shared_prefixes([[1, 2], [1, 2, 3]], 1) == [(0, 2, 1)]  # each keeps a token of its own
    assert scheduler.shared_prefixes([[1, 2, 3], [4, 5, 6]], 1) == []


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_a_generate_call_keeps_no_reference_to_the_model(fixed_model, device):
    """After generating, dropping the model frees it: nothing the engine caches (kernel choices, the cache keyword,
    a layer's head size, on a GPU its graphs and merged projections) holds the model, so a pipeline's stages give
    their models' memory back."""
    import copy
    import gc
    import weakref

    _, model, tokenizer = fixed_model
    model = copy.deepcopy(model).to(device, torch.bfloat16 if device == "cuda" else torch.float32)
    generate(model, tokenizer, ["1 + 1", "2 + 3 ="], max_new_tokens=3, batch_size=2, desc=None)
    alive = weakref.ref(model)
    del model
    gc.collect()
    assert alive() is None


def test_host_values_reach_the_device_as_lists_or_tensors_in_the_asked_dtype():
    from looper.engine.cache import on

    cpu = torch.device("cpu")
    assert on(cpu, [3, 1]).dtype == torch.long and on(cpu, [3, 1]).tolist() == [3, 1]
    moved = on(cpu, torch.tensor([5, 0, 2]), torch.int32)  # (a plan's host tensors: entries, sources, history)
    assert moved.dtype == torch.int32 and moved.tolist() == [5, 0, 2]


def test_the_page_allocator_hands_out_shares_and_takes_back_pages_and_the_storage_table_follows():
    from looper.engine.cache import PAGE, KVStorage, PageAllocator

    pages = PageAllocator(slots=3, pages=8)
    storage = KVStorage(num_layers=1, slots=3, pages=8, pages_per_slot=4, device=torch.device("cpu"))
    assert len(pages.free) == 7  # page 0 is scratch
    pages.grow(0, 3)
    pages.share(1, 0, 2)  # slot 1 reads slot 0's first two (full) pages
    pages.grow(1, 1)
    storage.apply(pages.take_changes())
    assert pages.take_changes() is None  # (each change handed over once)
    assert storage.table.tolist() == [[1, 2, 3, 0], [1, 2, 4, 0], [0, 0, 0, 0]]
    assert pages.shared == 2 * PAGE and len(pages.free) == 3
    assert pages.entries(1, PAGE - 1, PAGE + 2).tolist() == [2 * PAGE - 1, 2 * PAGE, 2 * PAGE + 1]
    pages.release(0)  # pages 1 and 2 stay: slot 1 still holds them
    assert sorted(pages.free) == [3, 5, 6, 7] and pages.shared == 0
    pages.grow(2, 1)  # (the page slot 0 gave back)
    storage.apply(pages.take_changes())
    assert storage.table.tolist() == [[0, 0, 0, 0], [1, 2, 4, 0], [3, 0, 0, 0]]
    pages.keep([2, 1])
    storage.keep([2, 1])
    assert storage.table.tolist() == [[3, 0, 0, 0], [1, 2, 4, 0]] and pages.owned == [[3], [1, 2, 4]]
    pages.release(1)
    pages.release(0)
    assert sorted(pages.free) == list(range(1, 8)) and pages.shared == 0
    # the storage writes keys and values where it is told, and hands the model's own back untouched
    keys, values = torch.randn(3, 2, 4), torch.randn(3, 2, 4)
    assert storage.update(keys, values, 0) == (keys, values)
    buffer_keys, buffer_values = storage.write(0, keys, values, torch.tensor([5, 17, 40]))
    assert buffer_keys.shape == (8 * PAGE, 2, 4) and torch.equal(buffer_keys[[5, 17, 40]], keys)
    assert torch.equal(buffer_values[[5, 17, 40]], values) and not buffer_keys[6].any()


def test_a_kv_cache_smaller_than_the_slots_worst_case_preempts_and_resumes_rows_with_the_same_samples(
    fixed_model, monkeypatch, caplog
):

    cfg, model, tokenizer = fixed_model
    prompts = _prompts(cfg, tokenizer, n=10)
    kwargs = {"max_new_tokens": 48, "temperature": 3.0, "seeds": list(range(len(prompts))), "desc": None}
    roomy, tight = {}, {}
    roomy_rows = generate(model, tokenizer, prompts, batch_size=8, stats=roomy, logprobs=True, **kwargs)
    expected = [(g.text, g.num_tokens) for g in roomy_rows]
    longest = max(len(ids) for ids in tokenizer(prompts)["input_ids"])
    per_slot = scheduler.round_up(longest + 48 + 1, scheduler.WIDTH_STEP) // cache.PAGE
    assert roomy["kv_pages"] == 8 * per_slot and roomy["preempted"] == 0  # memory to spare: every slot's worst case
    page_bytes = cache.PAGE * cache.kv_bytes_per_position(model)
    pages = int(2.5 * per_slot)  # rows of ~84 positions: 6 pages each at the end, 3 at the start
    monkeypatch.setattr(cache, "free_bytes", lambda device: cache.working_bytes(model, 8) + (pages + 1) * page_bytes)
    with caplog.at_level("INFO", logger="looper.engine"):
        tight_rows = generate(model, tokenizer, prompts, batch_size=8, stats=tight, logprobs=True, **kwargs)
    got = [(g.text, g.num_tokens) for g in tight_rows]
    assert tight["kv_pages"] == pages and tight["slots"] == 8
    assert tight["preempted"] > 0 and tight["peak_pages"] <= pages < roomy["peak_pages"]
    assert got == expected  # rows preempted and resumed: the same samples
    for tight_row, roomy_row in zip(tight_rows, roomy_rows):  # and their log-probs, before and after the preemption
        assert tight_row.token_ids == roomy_row.token_ids and len(tight_row.logprobs) == tight_row.num_tokens
        assert tight_row.logprobs == pytest.approx(roomy_row.logprobs, abs=1e-4)
    assert "rows start while pages last" in caplog.text and "resumed later" in caplog.text
    monkeypatch.setattr(cache, "free_bytes", lambda device: cache.working_bytes(model, 8) + page_bytes)
    with pytest.raises(RuntimeError, match="not enough memory for the KV cache.*Lower max_new_tokens"):
        generate(model, tokenizer, prompts, batch_size=8, **kwargs)


def test_the_drain_halves_the_slots_and_its_rows_keep_their_samples(fixed_model, monkeypatch):
    cfg, model, tokenizer = fixed_model
    prompts = _prompts(cfg, tokenizer, n=16)
    limits = [4 + 3 * k for k in range(len(prompts))]  # rows end one after another: ever fewer live rows
    seeds = list(range(len(prompts)))
    kwargs = {"temperature": 1.0, "top_p": 0.95, "desc": None}
    kept, keep = [], scheduler.Scheduler.keep
    monkeypatch.setattr(scheduler.Scheduler, "keep", lambda self, slots: kept.append(len(slots)) or keep(self, slots))
    together = generate(model, tokenizer, prompts, max_new_tokens=limits, batch_size=16, seeds=seeds, **kwargs)
    assert kept == [8]  # 16 slots halved once half of the rows had ended (not below scheduler.MIN_SLOTS)
    alone = [
        generate(model, tokenizer, [p], max_new_tokens=n, batch_size=1, seeds=[s], **kwargs)[0].text
        for p, n, s in zip(prompts, limits, seeds)
    ]
    assert [g.text for g in together] == alone
    assert [g.num_tokens for g in together] == limits  # (the model never ends a row early: by construction)


def test_merged_projections_give_each_projection_its_output_and_the_model_back_after():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
    )
    model = LlamaForCausalLM(config.__class__(**{**config.to_dict(), "vocab_size": 50})).eval()
    ids = torch.randint(0, 50, (2, 7))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        merged = fused.MergedProjections(model)
        assert len(merged.groups) == 2  # one per layer
        layer = merged.groups[0]
        assert layer.linears[1].weight.data_ptr() == layer.weight[config.hidden_size :].data_ptr()  # views of it
        calls = []
        product = torch.nn.functional.linear
        with fused.Patched(merged.patches):
            with pytest.MonkeyPatch.context() as patch:
                patch.setattr(torch.nn.functional, "linear", lambda *a: calls.append(a[1].shape) or product(*a))
                got = model(input_ids=ids).logits
        merged.restore()
        after = model(input_ids=ids).logits
    torch.testing.assert_close(got, expected)  # (float32: one product or three, the same sums)
    q, k = config.hidden_size, config.num_key_value_heads * config.hidden_size // config.num_attention_heads
    assert calls.count(torch.Size([q + 2 * k, q])) == 2 and torch.Size([k, q]) not in calls  # once a layer
    assert torch.equal(after, expected)
    weights = {n: p for n, p in model.named_parameters()}
    assert all(torch.equal(weights[n], p) for n, p in before.items())
    shared = {p.untyped_storage().data_ptr() for p in model.parameters()}
    assert len(shared) == len(list(model.parameters()))  # each its own storage again: the model saves as before


def test_projections_under_a_lora_adapter_are_not_merged():
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, vocab_size=50
    )
    model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=4, target_modules=["v_proj"]))
    # (GRPO's live policy: generation computes what the trainer's forward does, three products)
    assert fused.MergedProjections(model).groups == []


def test_the_kernel_patches_are_set_inside_and_restored_after_even_on_an_error():
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama import modeling_llama

    model = LlamaForCausalLM(
        LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, vocab_size=50)
    )
    norms = [m for m in model.modules() if type(m).__name__ == "LlamaRMSNorm"]
    original = modeling_llama.apply_rotary_pos_emb
    patches = fused.norm_patches(norms) + fused.rotary_patches([modeling_llama])
    with pytest.raises(RuntimeError, match="inside"), fused.Patched(patches):
        assert all(vars(m)["forward"].keywords["weight"] is m.weight for m in norms)  # each norm its own weight
        assert modeling_llama.apply_rotary_pos_emb.args == (original,)
        raise RuntimeError("inside")
    assert modeling_llama.apply_rotary_pos_emb is original
    assert not any("forward" in vars(m) for m in model.modules())


def test_the_hf_backend_gives_the_paged_engines_greedy_outputs_in_float32(tiny_sft):
    from looper import engine
    from looper.engine.hf import HFGenerator
    from looper.engine.paged import PagedGenerator

    cfg, _, _, sft_dir = tiny_sft
    model, tokenizer = models.load_target(str(sft_dir), dataclasses.replace(cfg.model, dtype="float32"))
    prompts = _prompts(cfg, tokenizer, n=10)
    requests = [engine.Request(p, 4 + 6 * k) for k, p in enumerate(prompts)]  # rows end at their own limits
    finished = []
    with warnings.catch_warnings(record=True) as caught:  # looper's own calls use the current transformers names
        warnings.simplefilter("always")
        paged, paged_stats = PagedGenerator(model, tokenizer, batch_size=4).generate(requests)
        hf, hf_stats = HFGenerator(model, tokenizer, batch_size=4).generate(
            requests, on_result=lambda i, g: finished.append(i)
        )
    assert [str(w.message) for w in caught if issubclass(w.category, (DeprecationWarning, FutureWarning))] == []
    assert [(g.text, g.num_tokens, g.finish_reason) for g in hf] == [
        (g.text, g.num_tokens, g.finish_reason) for g in paged
    ]
    assert sorted(finished) == list(range(len(prompts))) and {g.finish_reason for g in hf} == {"stop", "length"}
    assert hf_stats.backend == "hf" and paged_stats.backend == "paged"
    assert hf_stats.real_tokens == paged_stats.real_tokens == sum(g.num_tokens for g in hf)


def test_the_hf_backend_samples_a_row_from_its_own_seed_whatever_its_batch(tiny_sft):
    from looper import engine
    from looper.engine.hf import HFGenerator

    cfg, _, _, sft_dir = tiny_sft
    model, tokenizer = models.load_target(str(sft_dir), cfg.model)
    prompts = _prompts(cfg, tokenizer, n=4)
    requests = [engine.Request(p, 24, temperature=1.0, top_p=0.95, seed=7 + k) for k, p in enumerate(prompts)]
    together, _ = HFGenerator(model, tokenizer, batch_size=4).generate(requests)
    alone = [HFGenerator(model, tokenizer, batch_size=1).generate([r])[0][0].text for r in requests[::-1]][::-1]
    assert [g.text for g in together] == alone
    reseeded, _ = HFGenerator(model, tokenizer, batch_size=4).generate(
        [engine.Request(r.prompt, r.max_new_tokens, r.temperature, r.top_p, r.seed + 100) for r in requests]
    )
    assert [g.text for g in reseeded] != alone


def test_auto_picks_paged_where_its_checks_pass_and_hf_where_they_fail_and_says_why(tiny_sft, monkeypatch, caplog):
    from looper import engine

    cfg, _, _, sft_dir = tiny_sft
    model, tokenizer = models.load_target(str(sft_dir), cfg.model)
    assert cfg.generation.backend == "auto"
    with caplog.at_level("INFO", logger="looper.engine"):
        assert engine.build(cfg.generation, model, tokenizer, 4).name == "paged"
        monkeypatch.setattr(type(model), "_supports_attention_backend", False)
        assert engine.build(cfg.generation, model, tokenizer, 4).name == "hf"
    assert "auto: paged" in caplog.text
    assert "does not attend through transformers' attention interface" in caplog.text
    monkeypatch.setattr(cfg.generation, "backend", "paged")  # asked for by name: no check, no fallback
    assert engine.build(cfg.generation, model, tokenizer, 4).name == "paged"


def test_a_third_backend_plugs_in_by_registering_one_generator(fast_cfg, tiny_sft, monkeypatch):
    """The seam a vLLM or SGLang backend would use: one Generator subclass, one register call, and rollout and eval
    run through it unchanged (here it serves the paged engine's outputs and counts the requests it saw)."""
    from looper import engine, pipeline
    from looper.artifacts import ArtifactStore
    from looper.engine.paged import PagedGenerator

    seen = []

    class Counting(engine.Generator):
        name = "counting"

        def generate(self, requests, on_result=None, desc=None):
            seen.extend(requests)
            results, stats = PagedGenerator(self.model, self.tokenizer, self.batch_size).generate(requests, on_result)
            stats.backend = self.name
            return results, stats

    monkeypatch.setitem(engine.BACKENDS, "counting", Counting)
    cfg = fast_cfg("generation.backend=counting", "eval.num_questions=6")
    artifact = pipeline.evaluate(cfg, ArtifactStore(cfg.paths.artifacts), "sft", "synthetic_test")
    assert len(seen) == 6 and all(isinstance(r, engine.Request) for r in seen)
    summary = json.loads((artifact / "summary.json").read_text())
    assert summary["generation"]["backend"] == "counting" and summary["n"] == 6
    paged = pipeline.evaluate(
        fast_cfg("generation.backend=paged", "eval.num_questions=6"),
        ArtifactStore(cfg.paths.artifacts),
        "sft",
        "synthetic_test",
    )
    assert artifact != paged  # the backend is part of an eval's identity (its samples may differ)
    assert (artifact / "predictions.jsonl").read_text() == (paged / "predictions.jsonl").read_text()


def test_an_unknown_backend_fails_at_start_naming_the_allowed_ones():
    from looper import preflight
    from tests.conftest import compose

    with pytest.raises(ValueError, match=r"generation.backend: got 'vllm'; allowed: auto, paged, hf"):
        preflight.check(compose("generation.backend=vllm"))


@pytest.mark.parametrize("backend", ["paged", "hf"])
def test_the_engines_logprobs_are_a_forward_pass_of_the_same_model(fixed_model, backend):
    from looper.engine import BACKENDS
    from looper.engine.interface import Request

    cfg, model, tokenizer = fixed_model
    texts = _prompts(cfg, tokenizer, n=4)
    # sampled at two temperatures and greedy, rows of different lengths
    settings = [(0.7, 0.9), (1.3, 1.0), (0.0, 1.0), (1.0, 0.5)]
    requests = [Request(p, 6 + 5 * k, t, top_p, seed=k) for k, (p, (t, top_p)) in enumerate(zip(texts, settings))]
    generator = BACKENDS[backend](model, tokenizer, 3)
    plain, _ = generator.generate(requests)
    got, _ = generator.generate(requests, logprobs=True)
    assert [g.text for g in got] == [g.text for g in plain] and plain[0].logprobs is None
    for request, g in zip(requests, got):
        assert g.prompt_ids == prompts.encode_prompt(tokenizer, request.prompt)
        assert len(g.token_ids) == len(g.logprobs) == g.num_tokens and tokenizer.decode(g.token_ids) == g.text
        ids = torch.tensor([g.prompt_ids + g.token_ids])
        with torch.no_grad():
            logits = model(ids).logits[0, len(g.prompt_ids) - 1 : -1].float()
        scale = request.temperature if request.temperature > 0 else 1.0
        expected = (logits / scale).log_softmax(-1).gather(1, torch.tensor(g.token_ids)[:, None])[:, 0]
        assert torch.allclose(torch.tensor(g.logprobs), expected, atol=1e-4), (backend, request.temperature)
