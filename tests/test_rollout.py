"""Rollouts: record schema, reproducibility, a scorer plugged in by config, resume after SIGKILL, two processes."""

import json
from pathlib import Path

from looper import pipeline, scoring
from looper.artifacts import ArtifactStore
from looper.seeds import row_seed
from looper.stages import rollout
from tests.conftest import (
    FAST,
    cache_sharing_models,
    compose,
    each_rank,
    kill_when_written,
    looper_cli,
    looper_on_two_processes,
)

RECORD_KEYS = {
    "question_id",
    "arm",
    "family",
    "sample",
    "seed",
    "text",
    "reasoning",
    "answer",
    "correct",
    "num_tokens",
    "finish_reason",
    "equations",
    "s_end",
    "s_path",
    "s_cf",
    "s_wm",
}


def _build(cfg, sft_dir, out: Path) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    rollout.build(cfg, {"sft": sft_dir}, out)
    return rollout.read_trajectories(out)


def _regime_w(artifacts, *overrides):
    plain_arm = [o for o in FAST if not o.startswith("arms.")]  # FAST tunes the `single` arm-set's arm
    return compose(
        f"paths.artifacts={artifacts}",
        *plain_arm,
        "arms=regime_w",
        "arms.equations.samples=2",
        "rollout.num_questions=4",
        *overrides,
    )


def test_records_keep_the_raw_components_and_are_reproducible(artifacts, tiny_sft, tmp_path):
    cfg = _regime_w(artifacts, "rollout.batch_size=7")
    first = _build(cfg, tiny_sft[3], tmp_path / "a")
    assert len(first) == 4 * 9 and RECORD_KEYS <= set(first[0])
    assert {r["family"] for r in first} == {"compute", "reflective"}
    assert all(r["s_cf"] is not None for r in first)  # cf_samples=2 by default
    again = _build(_regime_w(artifacts, "rollout.batch_size=32"), tiny_sft[3], tmp_path / "b")
    assert again == first  # another batch size, same records
    stats = json.loads((tmp_path / "a" / "stats.json").read_text())
    assert set(stats["arms"]) == set(cfg.arms) and stats["questions"] == 4


def test_batches_per_call_sets_the_rows_of_each_generate_call_and_no_record(artifacts, tiny_sft, tmp_path, monkeypatch):
    calls = []
    run = rollout.Sampler.run
    monkeypatch.setattr(
        rollout.Sampler, "run", lambda self, jobs, on_result=None: calls.append(len(jobs)) or run(self, jobs, on_result)
    )
    records, specs = [], []
    for batches in (1, 3):  # 9 trajectories a question, batches of 9: a question a batch
        cfg = _regime_w(
            artifacts,
            "rollout.batch_size=9",
            f"rollout.batches_per_call={batches}",
            "reward.scorer._target_=tests.scorers.length_scorer",
            "+reward.scorer.unit=30",
        )
        calls.clear()
        records.append(_build(cfg, tiny_sft[3], tmp_path / str(batches)))
        specs.append(pipeline.stage_spec(cfg, ArtifactStore(artifacts), "rollout", {"sft": tiny_sft[3]}))
        assert calls == {1: [9, 9, 9, 9], 3: [27, 9]}[batches]  # (no continuations with this scorer)
        # each call's generation figures are kept with the artifact (looper/throughput.py)
        figures = json.loads((tmp_path / str(batches) / "stats.json").read_text())["generation"]
        assert figures["calls"] == len(calls) and figures["sequences"] == 36 and figures["slots"] == 9
        assert figures["real_tokens"] == sum(r["num_tokens"] for r in records[-1])
        assert 0 < figures["slot_occupancy"] <= 1 and 0 < figures["prefill_share"] < 1
    assert records[0] == records[1] and specs[0] == specs[1]  # one artifact either way


def test_a_scorer_plugs_in_through_config_alone(artifacts, tiny_sft, tmp_path):
    result = looper_cli(
        f"paths.artifacts={artifacts}",
        f"hydra.run.dir={tmp_path}",
        *FAST,
        "stage=rollout",
        "rollout.num_questions=3",
        "reward.scorer._target_=tests.scorers.length_scorer",
        "+reward.scorer.unit=30",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    made = [json.loads(line) for line in (tmp_path / "artifacts.jsonl").read_text().splitlines()]
    records = rollout.read_trajectories(Path(next(r["path"] for r in made if r["stage"] == "rollout")))
    assert {r["scored_by"] for r in records} == {"length"} and {r["s_path"] for r in records} == {0.3}
    assert all(r["s_cf"] is None for r in records)


def test_a_scorer_in_the_plans_shape_sets_the_reward_the_records_and_pairs_carry(artifacts, tiny_sft, tmp_path):
    from looper.stages import preferences

    plans = (
        "reward.scorer_returns=reward",
        "reward.scorer._target_=tests.scorers.longest_wins",
        "rollout.num_questions=3",
    )
    cfg = _regime_w(artifacts, *plans, "+reward.scorer.per_char=0.5")
    records = _build(cfg, tiny_sft[3], tmp_path / "rollout")
    assert all(r["reward"] == 0.5 * len(r["text"]) and r["s_end"] is None and r["s_wm"] is None for r in records)
    extremes = ("preferences.strategy=reward_extremes", "preferences.margin=0", "preferences.max_pairs_per_question=1")
    built = {}
    for alpha in (0.0, 5.0):  # the scorer's reward is the reward: alpha and beta do not apply
        out = tmp_path / f"pairs-{alpha}"
        out.mkdir()
        settings = _regime_w(artifacts, *plans, "+reward.scorer.per_char=0.5", *extremes, f"reward.alpha={alpha}")
        preferences.build(settings, {"rollout": tmp_path / "rollout", "sft": tiny_sft[3]}, out)
        built[alpha] = (out / "pairs.jsonl").read_text()
        for pair in map(json.loads, built[alpha].splitlines()):
            texts = [len(r["text"]) for r in records if r["question_id"] == pair["question_id"]]
            assert (len(pair["chosen"]), len(pair["rejected"])) == (max(texts), min(texts))  # longest vs shortest
            assert pair["chosen_reward"] == 0.5 * max(texts)
        rows = [json.loads(line) for line in (out / preferences.REWARDS).read_text().splitlines()]
        assert [row["reward"] for row in rows] == [rec["reward"] for rec in records]
        assert sum(len(row["pairs"]) for row in rows) == 2 * len(built[alpha].splitlines())
    assert built[0.0] == built[5.0] and built[0.0]


def test_a_rollout_killed_half_way_resumes_to_the_same_records(artifacts, tiny_sft, fast_cfg, tmp_path):
    # 32 questions of 8 samples: two generate calls of 16 questions (batch 8, 16 batches a call); killed after the first
    overrides = [*FAST, "rollout.num_questions=32", "rollout.batch_size=8", "reward.cf_samples=1"]
    reference = _build(fast_cfg(*overrides[len(FAST) :]), tiny_sft[3], tmp_path / "reference")
    killed_cache = cache_sharing_models(artifacts, tmp_path / "cache")
    args = [f"paths.artifacts={killed_cache}", *overrides, "stage=rollout"]
    kill_when_written(
        [*args, f"hydra.run.dir={tmp_path / 'a'}"], "rollout/*.partial/trajectories.rank0.jsonl", 8 * 8, killed_cache
    )
    result = looper_cli(*args, f"hydra.run.dir={tmp_path / 'b'}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming" in result.stdout + result.stderr
    resumed = rollout.read_trajectories(
        next(p for p in killed_cache.glob("rollout/*") if p.is_dir() and not p.name.endswith(".partial"))
    )
    keys = [(r["question_id"], r["arm"], r["sample"]) for r in resumed]
    assert len(keys) == len(set(keys)) == 32 * 8
    assert resumed == reference


def test_two_processes_give_the_same_records_as_one(artifacts, tiny_sft, fast_cfg, tmp_path):
    overrides = [*FAST, "rollout.num_questions=10", "reward.cf_samples=1"]
    reference = _build(fast_cfg(*overrides[len(FAST) :]), tiny_sft[3], tmp_path / "reference")
    result = looper_on_two_processes(
        f"paths.artifacts={artifacts}",
        f"hydra.run.dir={tmp_path / 'run'}",
        *overrides,
        "stage=rollout",
    )
    assert result.returncode == 0, each_rank(result)
    made = [json.loads(line) for line in (tmp_path / "run" / "artifacts.jsonl").read_text().splitlines()]
    artifact = Path(next(r["path"] for r in made if r["stage"] == "rollout"))
    assert sorted(p.name for p in artifact.glob("trajectories.rank*.jsonl")) == [
        "trajectories.rank0.jsonl",
        "trajectories.rank1.jsonl",
    ]
    assert rollout.read_trajectories(artifact) == reference


def test_a_chunks_continuations_are_decoded_together_and_give_the_same_records(artifacts, tiny_sft):
    from hydra.utils import instantiate

    from looper import models
    from looper.data import load_splits

    cfg = _regime_w(artifacts)
    model, tokenizer = models.load_target(str(tiny_sft[3]), cfg.model)
    sampler = scoring.Sampler(cfg, model, tokenizer)
    scorer = instantiate(cfg.reward.scorer, _partial_=True)
    problems = load_splits(cfg.data)["train"][:3]
    trajectories = []
    for problem in problems:
        keys = [
            (name, arm, k, row_seed(cfg.seed, problem["id"], name, k))
            for name, arm in cfg.arms.items()
            for k in range(arm.samples)
        ]
        outputs = sampler.run([(sampler.prompt(problem["question"], arm), arm, seed) for _, arm, _, seed in keys])
        trajectories.append(scoring.trajectory_records(cfg, problem, list(zip(keys, outputs))))
    calls = []
    run = sampler.run
    sampler.run = lambda jobs: calls.append(len(jobs)) or run(jobs)
    one_by_one = [
        scoring.score_question(cfg, scorer, p, t, sampler.continuations(p, t)) for p, t in zip(problems, trajectories)
    ]
    assert len(calls) == 3  # one continuation batch per question
    rows, calls[:] = sum(calls), []
    together = scoring.score_together(cfg, sampler, scorer, problems, trajectories)
    assert calls == [rows] and rows > 0  # the same continuations, in one batch
    assert together == one_by_one


def test_a_scorer_stuck_on_a_question_fails_the_run_naming_it(artifacts, tiny_sft, tmp_path):
    import time

    import pytest

    cfg = _regime_w(
        artifacts,
        "rollout.num_questions=2",
        "reward.scorer._target_=tests.scorers.stuck_scorer",
        "+reward.scorer.seconds=60",
        "rollout.scorer_timeout_s=1",
    )
    start = time.time()
    with pytest.raises(RuntimeError, match=r"rollout.scorer_timeout_s=1 s on question 'synthetic-train-0'"):
        _build(cfg, tiny_sft[3], tmp_path / "stuck")
    assert time.time() - start < 30  # well before the scorer would have returned


def test_the_rollout_bar_counts_each_question_as_its_rows_finish_within_one_generate_call(
    artifacts, tiny_sft, tmp_path, monkeypatch
):
    cfg = _regime_w(artifacts, "rollout.num_questions=6", "rollout.batch_size=8", "rollout.batches_per_call=8")
    seen, calls = [], []

    class Bar:  # tqdm's interface as the rollout uses it, recording each update and whether a call was running
        def __init__(self, total, initial, **kwargs):
            self.n = initial

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def update(self, k):
            self.n += k
            seen.append((k, bool(calls) and calls[-1] == "running"))

        def set_postfix(self, **kwargs):
            pass

    run = rollout.Sampler.run

    def tracked(self, jobs, on_result=None):
        calls.append("running")
        try:
            return run(self, jobs, on_result=on_result)
        finally:
            calls.append("done")

    monkeypatch.setattr(rollout, "tqdm", Bar)
    monkeypatch.setattr(rollout.Sampler, "run", tracked)
    _build(cfg, tiny_sft[3], tmp_path / "r")
    assert [k for k, _ in seen] == [1] * 6  # one step per question, not one jump at the end
    assert all(during for _, during in seen) and calls.count("running") >= 1  # while the call still generated
