"""Evaluation: prompts, per-example records, resume after an interruption, the batch check, and the report."""

import dataclasses
import json

import pytest
import torch

from looper import models, pipeline, prompts
from looper.artifacts import ArtifactStore
from looper.engine.kernels import attention
from looper.engine.paged import PagedGenerator
from looper.prompts import PLATINUM_PROMPT
from looper.stages import evaluation
from tests.conftest import looper_cli, shared_file


def test_the_official_platinum_prompt_wraps_the_question_in_the_model_format(tiny_sft):
    cfg, _, base, _ = tiny_sft
    tokenizer = models.load_tokenizer(base, cfg.model)
    prompt = prompts.build_prompt(cfg.model, tokenizer, "How many?", official=True)
    assert prompt == cfg.model.prompt_template.format(question=PLATINUM_PROMPT.format(question="How many?"))
    assert 'in the format "Answer: XXX" with no extra formatting.' in prompt


def test_k_shot_examples_never_include_the_scored_question(fast_cfg, tiny_sft):
    cfg = fast_cfg("eval.shots=2")
    tokenizer = models.load_tokenizer(tiny_sft[2], cfg.model)
    pool = evaluation.shot_pool("synthetic_test", cfg)
    assert len(pool) == 3
    scored = pool[0]  # the worst case: the scored question is in the pool
    prompt = evaluation.prompt_for(cfg, tokenizer, scored, pool)
    assert prompt.count(scored["question"]) == 1 and prompt.endswith(
        cfg.model.prompt_template.format(question=scored["question"])
    )
    assert pool[1]["answer"] in prompt and pool[2]["answer"] in prompt


@pytest.mark.data
def test_records_carry_every_scorer_and_the_summary_splits_by_cleaning_status(fast_cfg, tiny_sft):
    path = shared_file("gsm8k_platinum", "test.jsonl")
    cfg = fast_cfg(
        f"eval.platinum_path={path}", "eval.num_questions=40", "eval.targets=[base]", "eval.datasets=[gsm8k_platinum]"
    )
    artifact = pipeline.evaluate(cfg, ArtifactStore(cfg.paths.artifacts), "base", "gsm8k_platinum")
    records = evaluation.read_predictions(artifact)
    assert len(records) == 40 and len({r["id"] for r in records}) == 40
    for key in (
        "id",
        "question",
        "gold",
        "completion",
        "num_tokens",
        "finish_reason",
        "cleaning_status",
        "pred_strict",
        "correct_strict",
        "pred_flexible",
        "correct_flexible",
        "pred_platinum",
        "correct_platinum",
    ):
        assert key in records[0]
    summary = json.loads((artifact / "summary.json").read_text())
    assert sum(block["n"] for block in summary["by_status"].values()) == 40
    figures = summary["generation"]  # how fast it ran (looper/throughput.py)
    assert figures["sequences"] == 40 and figures["real_tokens"] == sum(r["num_tokens"] for r in records)
    assert figures["slots"] == min(cfg.eval.batch_size, 40) and figures["tokens_per_s"] > 0


def test_an_interrupted_evaluation_resumes_without_redoing_finished_questions(fast_cfg, tiny_sft, monkeypatch):
    cfg = fast_cfg("eval.num_questions=24", "eval.batch_size=3", "eval.max_new_tokens=40")
    store = ArtifactStore(cfg.paths.artifacts)
    original = PagedGenerator.generate

    def crash_after_twelve(self, requests, on_result=None, desc=None):
        finished = []

        def record_then_maybe_crash(index, output):
            on_result(index, output)  # written and flushed
            finished.append(index)
            if len(finished) == 12:
                raise KeyboardInterrupt  # as if killed right after the twelfth answer

        return original(self, requests, record_then_maybe_crash, desc)

    monkeypatch.setattr(PagedGenerator, "generate", crash_after_twelve)
    with pytest.raises(KeyboardInterrupt):
        pipeline.evaluate(cfg, store, "sft", "synthetic_test")
    shard = next((store.root / "eval").glob("*.partial/predictions.rank0.jsonl"))
    first = [json.loads(line) for line in shard.read_text().splitlines()]
    assert len(first) == 12
    with open(shard, "a") as handle:
        handle.write('{"id": "torn')  # killed mid-write
    decoded = []
    monkeypatch.setattr(
        PagedGenerator,
        "generate",
        lambda self, requests, **kw: decoded.extend(requests) or original(self, requests, **kw),
    )
    records = evaluation.read_predictions(pipeline.evaluate(cfg, store, "sft", "synthetic_test"))
    assert len(decoded) == 12
    by_id = {r["id"]: r for r in records}
    assert len(records) == 24 and len(by_id) == 24 and all(by_id[r["id"]] == r for r in first)


def test_the_batch_check_passes_on_the_real_path_and_catches_a_broken_mask(tiny_sft, monkeypatch):
    cfg, _, _, sft_dir = tiny_sft
    model, tokenizer = models.load_target(str(sft_dir), cfg.model)
    problems = evaluation.eval_problems("synthetic_test", cfg)[:8]
    texts = [prompts.build_prompt(cfg.model, tokenizer, p["question"]) for p in problems]
    assert evaluation.batch_consistency(cfg, model, tokenizer, texts)["differ"] == 0
    # the classic bug: prompts of one prefill attend to each other (packed, or after a shared prefix: every prompt
    # reads the entries of the prefill's first prompts instead of its own)
    packed, after_prefix = attention.packed_attention, attention.prefix_attention

    def as_one(module, query, key, value, starts, max_length, *args, **kwargs):
        return packed(module, query, key, value, starts[[0, -1]], int(starts[-1]), *args, **kwargs)

    def one_slot(module, query, keys, values, packing, scaling):
        wrong = dataclasses.replace(packing, history=torch.cat([packing.history[:n] for n in packing.key_lengths]))
        return after_prefix(module, query, keys, values, wrong, scaling)

    monkeypatch.setattr(attention, "packed_attention", as_one)
    monkeypatch.setattr(attention, "prefix_attention", one_slot)
    assert evaluation.batch_consistency(cfg, model, tokenizer, texts)["differ"] > 0


@pytest.mark.data
def test_the_report_has_intervals_paired_deltas_and_a_plot(artifacts, tiny_sft, tmp_path):
    path = shared_file("gsm8k_platinum", "test.jsonl")
    from tests.conftest import FAST

    result = looper_cli(
        f"paths.artifacts={artifacts}",
        f"hydra.run.dir={tmp_path}",
        *FAST,
        "stage=eval",
        "eval.datasets=[gsm8k_platinum]",
        f"eval.platinum_path={path}",
        "eval.num_questions=60",
        "eval.check_batch_consistency=4",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = (tmp_path / "report.md").read_text()
    for text in (
        "## gsm8k_platinum",
        "| base |",
        "| sft |",
        "| dpo |",
        "### By cleaning_status",
        "consensus",
        "### Paired deltas",
        "base → sft",
        "sft → dpo",
        "McNemar p",
    ):
        assert text in report, text
    assert "% [" in report  # accuracies carry their intervals
    assert (tmp_path / "accuracy.png").stat().st_size > 1000


@pytest.mark.data
def test_a_killed_platinum_evaluation_finishes_on_rerun_without_recomputing(artifacts, tiny_sft, tmp_path):
    path = shared_file("gsm8k_platinum", "test.jsonl")
    from tests.conftest import FAST, kill_when_written

    overrides = [
        f"paths.artifacts={artifacts}",
        *FAST,
        "stage=eval",
        "eval.datasets=[gsm8k_platinum]",
        f"eval.platinum_path={path}",
        "eval.targets=[base]",
        "eval.num_questions=null",
        "eval.batch_size=16",
        "eval.max_new_tokens=24",
    ]
    partial_file = kill_when_written(
        [*overrides, f"hydra.run.dir={tmp_path / 'a'}"], "eval/*.partial/predictions.rank0.jsonl", 200, artifacts
    )
    done_at_kill = sum(1 for _ in open(partial_file))
    assert done_at_kill < 1209
    result = looper_cli(*overrides, f"hydra.run.dir={tmp_path / 'b'}")
    assert result.returncode == 0, result.stderr[-3000:]
    resumed = [line for line in (result.stdout + result.stderr).splitlines() if "resuming" in line]
    assert len(resumed) == 1
    # every complete line is kept; SIGKILL may have torn the last one, which is dropped and redone
    assert any(f"{n} of 1209 already done" in resumed[0] for n in (done_at_kill, done_at_kill - 1))
    final = partial_file.parent.with_name(partial_file.parent.name.replace(".partial", ""))
    ids = [json.loads(line)["id"] for line in (final / "predictions.jsonl").read_text().splitlines()]
    assert len(ids) == 1209 and len(set(ids)) == 1209


def test_two_processes_give_the_same_predictions_as_one(artifacts, tiny_sft, fast_cfg, tmp_path):
    from tests.conftest import FAST, cache_sharing_models, each_rank, looper_on_two_processes

    overrides = ["eval.targets=[sft]", "eval.num_questions=10", "eval.max_new_tokens=30"]
    cfg = fast_cfg(*overrides)
    reference = evaluation.read_predictions(
        pipeline.evaluate(cfg, ArtifactStore(cfg.paths.artifacts), "sft", "synthetic_test")
    )
    cache = cache_sharing_models(artifacts, tmp_path / "cache")
    result = looper_on_two_processes(
        f"paths.artifacts={cache}",
        f"hydra.run.dir={tmp_path / 'run'}",
        *FAST,
        *overrides,
        "stage=eval",
    )
    assert result.returncode == 0, each_rank(result)
    (artifact,) = [
        p
        for p in (cache / "eval").iterdir()
        if p.is_dir() and json.loads((p / "summary.json").read_text())["dataset"] == "synthetic_test"
    ]
    assert sorted(p.name for p in artifact.glob("predictions.rank*.jsonl")) == [
        "predictions.rank0.jsonl",
        "predictions.rank1.jsonl",
    ], result.stdout[-4000:]
    assert evaluation.read_predictions(artifact) == reference
    assert (tmp_path / "run" / "report.md").exists()


def test_sampled_evaluation_reports_mean_accuracy_with_an_interval_over_questions(fast_cfg, tiny_sft, tmp_path):
    from tests.conftest import cache_sharing_models

    cfg = fast_cfg(
        "eval.temperature=0.7",
        "eval.samples=3",
        "eval.num_questions=8",
        "eval.max_new_tokens=30",
        f"paths.artifacts={cache_sharing_models(tiny_sft[1].root, tmp_path / 'cache')}",
    )
    artifact = pipeline.evaluate(cfg, ArtifactStore(cfg.paths.artifacts), "sft", "synthetic_test")
    records = evaluation.read_predictions(artifact)
    assert len(records) == 24 and sorted({r["sample"] for r in records}) == [0, 1, 2]
    assert len({(r["id"], r["sample"]) for r in records}) == 24
    assert len({r["completion"] for r in records}) > 8  # the samples of a question differ
    summary = json.loads((artifact / "summary.json").read_text())
    low, high = summary["ci_strict"]
    assert (summary["questions"], summary["samples"]) == (8, 3) and low <= summary["acc_strict"] <= high
    again = evaluation.read_predictions(
        pipeline.evaluate(
            fast_cfg(
                "eval.temperature=0.7",
                "eval.samples=3",
                "eval.num_questions=8",
                "eval.max_new_tokens=30",
                "eval.batch_size=5",
                f"paths.artifacts={cache_sharing_models(tiny_sft[1].root, tmp_path / 'b')}",
            ),
            ArtifactStore(tmp_path / "b"),
            "sft",
            "synthetic_test",
        )
    )
    assert again == records  # per-row seeds: the same samples whatever the batching


def test_the_demo_objective_comes_from_the_dev_split_not_the_test_set(fast_cfg):
    cfg = fast_cfg()
    assert cfg.eval.datasets == ["synthetic_test"] and evaluation.objective_dataset(cfg) == "synthetic_dev"
    assert (
        evaluation.objective_dataset(fast_cfg("eval.select_on=synthetic_test", "eval.select_on_test=true"))
        == "synthetic_test"
    )


def test_a_prompt_the_models_context_cannot_hold_is_refused_with_the_count(tiny_sft, caplog):
    model, tokenizer = models.load_target(str(tiny_sft[3]), tiny_sft[0].model)
    context = model.config.max_position_embeddings
    fits, too_long = "Tom has 3 apples.", " ".join(["apples"] * (2 * context))
    with pytest.raises(ValueError, match=rf"eval x: 1 of 2 prompts are as long as the model's context of {context}"):
        prompts.check_context(model, tokenizer, [fits, too_long], 16, "eval x")
    prompts.check_context(model, tokenizer, [fits], 16, "eval x")  # fits: nothing said
    assert "leave fewer than" not in caplog.text
    near = " ".join(["apples"] * (context - 20))
    prompts.check_context(model, tokenizer, [near], 64, "eval x")
    assert "1 of 1 prompts leave fewer than 64 new tokens" in caplog.text


def test_the_accuracy_figure_is_in_percent_with_value_labels_and_names_the_run(tmp_path, monkeypatch):
    import matplotlib.axes

    from looper import eval_report

    labels, limits = [], []
    bar_label, set_ylim = matplotlib.axes.Axes.bar_label, matplotlib.axes.Axes.set_ylim
    monkeypatch.setattr(
        matplotlib.axes.Axes, "bar_label", lambda self, bars, **kw: labels.append(bars) or bar_label(self, bars, **kw)
    )
    monkeypatch.setattr(
        matplotlib.axes.Axes, "set_ylim", lambda self, *a, **kw: limits.append(a) or set_ylim(self, *a, **kw)
    )
    results = [
        {"dataset": "synthetic_test", "target": t, "n": 40, "acc_strict": acc, "correct_strict": int(40 * acc)}
        for t, acc in (("base", 0.25), ("sft", 0.7))
    ]
    eval_report.plot(results, ["strict"], tmp_path / "accuracy.png", "accuracy: 2026-12-03/10-00-00-pipeline-demo")
    heights = [round(b.get_height(), 1) for bars in labels for b in bars]
    assert heights == [25.0, 70.0] and (0, 105) in limits  # percent, as the tables give it, each bar labelled
    assert (tmp_path / "accuracy.png").stat().st_size > 1000


def test_a_reused_evaluation_does_not_report_its_truncation_again(fast_cfg, tmp_path, monkeypatch):
    from looper import eval_dashboard, throughput

    cfg = fast_cfg("eval.datasets=[synthetic_dev]", "eval.targets=[base]", "logger=none")
    cell = tmp_path / "eval" / "cell"
    cell.mkdir(parents=True)
    (cell / "summary.json").write_text(json.dumps({"dataset": "synthetic_dev", "n": 4, "truncated": 0.5}))
    reported = []
    monkeypatch.setattr(throughput, "report_truncation", lambda *args: reported.append(args))
    monkeypatch.setattr(evaluation, "read_predictions", lambda artifact: [])
    monkeypatch.setattr(eval_dashboard, "log", lambda *args: None)
    store = ArtifactStore(tmp_path)
    for made in (True, False):  # built by this run, then reused by the next
        store.made = [cell] if made else []
        evaluation.run(cfg, store, lambda target: "base-path", lambda target, dataset, path: cell)
    assert len(reported) == 1 and reported[0][1] == 0.5
