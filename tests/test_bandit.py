"""Regime W as a bandit (rollout.allocation=thompson): the budget follows the reward, every arm keeps its floor,
records are reproducible, resumable and the same under two processes; per-arm credit in stats, PNG and W&B."""

import json
from collections import Counter
from pathlib import Path

import pytest

from looper import bandit, pipeline
from looper.artifacts import ArtifactStore
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

FAST_W = [o for o in FAST if not o.startswith("arms.")]  # FAST tunes the `single` arm-set's arm

# a scripted reward: the `equations` arm's trajectories earn 0.5 (s_wm of s_end 1 and s_path 0), every other arm's 0
BANDIT = [
    "arms=regime_w",
    "rollout.allocation=thompson",
    "rollout.budget=32",
    "rollout.rounds=4",
    "reward.scorer._target_=tests.scorers.arm_scorer",
    "reward.alpha=0",
    "reward.beta=1",
    "reward.length_penalty=0",
    "model.max_new_tokens=24",
]


def _build(cfg, sft_dir, out: Path) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    rollout.build(cfg, {"sft": sft_dir}, out)
    return rollout.read_trajectories(out)


def _killed_and_resumed(artifacts, overrides: list[str], lines: int, tmp_path: Path) -> list[dict]:
    """The records of a bandit rollout SIGKILLed once its rounds file holds `lines` records, then run again."""
    cache = cache_sharing_models(artifacts, tmp_path / "cache")
    args = [f"paths.artifacts={cache}", *overrides, "stage=rollout"]
    kill_when_written([*args, f"hydra.run.dir={tmp_path / 'a'}"], "rollout/*.partial/rounds.rank0.jsonl", lines, cache)
    result = looper_cli(*args, f"hydra.run.dir={tmp_path / 'b'}")
    assert result.returncode == 0, result.stderr[-3000:]
    return rollout.read_trajectories(
        next(p for p in cache.glob("rollout/*") if p.is_dir() and not p.name.endswith(".partial"))
    )


def _cfg(artifacts, *overrides):
    return compose(f"paths.artifacts={artifacts}", *FAST_W, *BANDIT, *overrides)


def test_the_bandit_sends_the_budget_to_the_arm_that_earns_reward_and_keeps_every_floor(artifacts, tiny_sft, tmp_path):
    cfg = _cfg(artifacts, "rollout.num_questions=6")
    assert bandit.plan(cfg) == [8, 8, 8, 8]
    records = _build(cfg, tiny_sft[3], tmp_path / "out")
    assert len(records) == 6 * 32 and {r["allocation"] for r in records} == {"thompson"}
    per_question = Counter((r["question_id"], r["arm"]) for r in records)
    assert all(per_question[q, arm] >= 1 for q in {r["question_id"] for r in records} for arm in cfg.arms)  # floors
    by_round = Counter((r["round"], r["arm"]) for r in records)
    assert all(by_round[0, arm] == 6 for arm in cfg.arms)  # round 0: the floor, one per arm and question
    later = sum(by_round[k, "equations"] for k in (1, 2, 3))
    assert later >= 0.8 * 3 * 6 * 8  # once it has data, the bandit spends most of each round on the rewarding arm
    keys = [(r["question_id"], r["arm"], r["sample"]) for r in records]
    assert len(set(keys)) == len(keys)  # each arm's samples numbered on across rounds: every trajectory its own seed
    assert {r["scored_by"] if "scored_by" in r else "final" for r in records} == {"final"}
    assert all(r["s_end"] == float(r["arm"] == "equations") for r in records)  # the final, full scoring
    again = _build(cfg, tiny_sft[3], tmp_path / "again")
    assert again == records  # reproducible


def test_per_question_statistics_also_find_the_arm(artifacts, tiny_sft, tmp_path):
    cfg = _cfg(artifacts, "rollout.num_questions=2", "rollout.bandit_stats=question")
    records = _build(cfg, tiny_sft[3], tmp_path / "out")
    assert sum(r["arm"] == "equations" for r in records) > 2 * 32 / 2


def test_a_killed_bandit_rollout_resumes_to_the_same_records_and_two_processes_give_them_too(
    artifacts, tiny_sft, tmp_path
):
    smaller = [o.replace("budget=32", "budget=16").replace("rounds=4", "rounds=3") for o in BANDIT]  # 8, 4, 4
    overrides = [*FAST_W, *smaller, "rollout.num_questions=6", "rollout.batch_size=16"]
    reference = _build(compose(f"paths.artifacts={artifacts}", *overrides), tiny_sft[3], tmp_path / "reference")
    # killed after round 0 (6 questions x 8 records), in round 1 or just after it
    assert _killed_and_resumed(artifacts, overrides, 6 * 8 + 8, tmp_path) == reference

    two = cache_sharing_models(artifacts, tmp_path / "two")
    result = looper_on_two_processes(
        f"paths.artifacts={two}", f"hydra.run.dir={tmp_path / 'c'}", *overrides, "stage=rollout"
    )
    assert result.returncode == 0, each_rank(result)
    artifact = next(p for p in two.glob("rollout/*") if p.is_dir() and not p.name.endswith(".partial"))
    assert sorted(p.name for p in artifact.glob("rounds.rank*.jsonl")) == ["rounds.rank0.jsonl", "rounds.rank1.jsonl"]
    assert rollout.read_trajectories(artifact) == reference


def test_the_plans_bandit_spends_8_samples_over_8_arms_learning_across_questions_and_resumes_after_a_kill(
    artifacts, tiny_sft, tmp_path
):
    plan = [o for o in BANDIT if not o.startswith(("rollout.allocation", "rollout.budget", "rollout.rounds"))]
    sequential = ["rollout.allocation=thompson_sequential", "rollout.budget=8", "rollout.warmup=0.2", "rollout.waves=2"]
    overrides = [*FAST_W, *plan, *sequential, "rollout.num_questions=10", "rollout.batch_size=16"]
    cfg = compose(f"paths.artifacts={artifacts}", *overrides)
    assert len(cfg.arms) == 8 and bandit.sizes(cfg) == [8, 8, 8]
    waves = bandit.waves(cfg, [{"id": i} for i in range(10)])
    assert [waves[i] for i in range(10)] == [0, 0, 1, 1, 1, 1, 2, 2, 2, 2]  # warm-up: the first 20%
    reference = _build(cfg, tiny_sft[3], tmp_path / "reference")
    assert len(reference) == 10 * 8 and {r["allocation"] for r in reference} == {"thompson_sequential"}
    warm = Counter(r["arm"] for r in reference if r["round"] == 0)
    assert warm == {arm: 2 for arm in cfg.arms}  # spread evenly: every arm once a question
    later = [r["arm"] for r in reference if r["round"] > 0]
    assert len(later) == 8 * 8 and later.count("equations") >= 0.8 * len(later)  # the pooled posteriors found it
    keys = [(r["question_id"], r["arm"], r["sample"]) for r in reference]
    assert len(set(keys)) == len(keys)

    # killed after the warm-up (2 questions x 8 records), in the first wave or just after it
    assert _killed_and_resumed(artifacts, overrides, 2 * 8 + 8, tmp_path) == reference


def test_the_demo_with_a_bandit_writes_per_arm_credit_to_stats_png_and_wandb(artifacts, tiny_sft, tmp_path):
    run_dir = tmp_path / "run"
    result = looper_cli(
        f"paths.artifacts={artifacts}",
        f"hydra.run.dir={run_dir}",
        *FAST_W,
        *BANDIT[:4],
        "rollout.num_questions=8",
        "stage=preferences",
        "logger=wandb",
        "logger.mode=offline",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (run_dir / "arm_credit.png").stat().st_size > 10_000
    made = [json.loads(line) for line in (run_dir / "artifacts.jsonl").read_text().splitlines()]
    stats = json.loads((Path(next(r["path"] for r in made if r["stage"] == "preferences")) / "stats.json").read_text())
    credit = stats["arm_credit"]
    assert set(credit["arms"]) == set(compose("arms=regime_w").arms) and len(credit["rounds"]) == 4
    assert sum(a["samples"] for a in credit["arms"].values()) == 8 * 32
    pairs = stats["pairs"]
    assert (
        sum(a["chosen"] for a in credit["arms"].values())
        == sum(a["rejected"] for a in credit["arms"].values())
        == pairs
    )
    tables = [p.name for p in run_dir.rglob("*.table.json")]
    assert any(name.startswith("preferences/arm_credit") or "arm_credit" in name for name in tables), tables
    assert any("allocation" in name for name in tables), tables


def test_a_reward_sweep_under_a_bandit_builds_a_rollout_per_reward_and_under_uniform_shares_one(artifacts):
    def key(*overrides):
        cfg = compose(f"paths.artifacts={artifacts}", *FAST_W, *overrides)
        return pipeline.stage_spec(cfg, ArtifactStore(artifacts), "rollout", {"sft": artifacts / "sft" / "0123"})

    bandit_ = ["arms=regime_w", "rollout.allocation=thompson", "rollout.budget=32"]
    assert key(*bandit_, "reward.beta=0.1") != key(*bandit_, "reward.beta=0.9")  # the bandit allocates by the reward
    assert key(*bandit_[:1], "reward.beta=0.1") == key(*bandit_[:1], "reward.beta=0.9")  # applied after the rollout


def test_reading_the_rounds_skips_a_line_another_process_is_still_writing(tmp_path):
    done = [{"question_id": "q1", "round": 0, "arm": "a", "sample": 0}, {"question_id": "q2", "round": 0}]
    (tmp_path / "rounds.rank0.jsonl").write_text("".join(json.dumps(r) + "\n" for r in done))
    # rank 1 has finished round 0 and is halfway through writing a round-1 record
    (tmp_path / "rounds.rank1.jsonl").write_text(
        json.dumps({"question_id": "q3", "round": 0}) + '\n{"question_id": "q4", "ro'
    )
    assert [r["question_id"] for r in bandit.read_rounds(tmp_path, 1)] == ["q1", "q2", "q3"]
    (tmp_path / "rounds.rank1.jsonl").write_text(
        json.dumps({"question_id": "q3", "round": 0}) + "\n" + json.dumps({"question_id": "q4", "round": 1}) + "\n"
    )
    assert [r["question_id"] for r in bandit.read_rounds(tmp_path, 1)] == ["q1", "q2", "q3"]  # not the later round
    assert len(bandit.read_rounds(tmp_path, 2)) == 4


@pytest.mark.slow
@pytest.mark.parametrize("allocation, rollouts", [("thompson", 2), ("uniform", 1)])
def test_a_beta_sweep_builds_one_sft_and_a_rollout_per_beta_only_under_a_bandit(
    artifacts, tiny_sft, tmp_path, allocation, rollouts
):
    cache = cache_sharing_models(artifacts, tmp_path / "cache")
    built = lambda stage: {p.name for p in (cache / stage).glob("*") if p.is_dir() and "." not in p.name}
    models = built("sft")
    result = looper_cli(
        "-m",
        f"paths.artifacts={cache}",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
        "debug=fast",
        "reward.beta=0.1,0.9",
        f"rollout.allocation={allocation}",
        "rollout.budget=32",
        "rollout.num_questions=4",
        "stage=rollout",
        "logger=none",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert built("sft") == models and len(built("rollout")) == rollouts  # the session's SFT, reused by both jobs


def test_arm_credit_is_drawn_only_where_there_are_arms_to_compare(tmp_path):
    from looper import credit

    one = {"arms": {"plain": {"accuracy": 0.5, "mean_reward": 0.4, "chosen_share": 1, "rejected_share": 1}}}
    assert credit.plot({**one, "rounds": [{"plain": 1600}]}, tmp_path / "one.png") is None
    two = {"arms": {**one["arms"], "equations": one["arms"]["plain"]}, "rounds": [{"plain": 8, "equations": 8}]}
    assert credit.plot(two, tmp_path / "two.png").stat().st_size > 1000
