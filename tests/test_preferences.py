"""Preference pairs from hand-made scored trajectories: both strategies, caps, margins, ties, identical texts."""

import pytest

from looper.coherence import scorer_rewards
from looper.config import PreferencesConfig, RewardConfig
from looper.stages.preferences import build_pairs, pair_stats, question_pairs, trajectory_rewards

REWARD = RewardConfig(alpha=1.0, beta=0.5, length_penalty=0.0, w_end=1.0, w_path=0.0, w_cf=0.0)


def r(text, correct, s_end, question="q1", tokens=10):
    return {
        "question_id": question,
        "question": "Q?",
        "text": text,
        "correct": correct,
        "s_end": s_end,
        "s_path": 0.0,
        "s_cf": None,
        "num_tokens": tokens,
        "arm": "a",
    }


def settings(**kw):
    return PreferencesConfig(**{"strategy": "correctness_first", "margin": 0.1, "max_pairs_per_question": 1, **kw})


def texts(found):
    return [(c["text"], rj["text"], kind) for c, rj, kind in found]


def test_correctness_first_pairs_best_correct_with_worst_incorrect_then_coherence():
    records = [
        r("right, coherent", True, 0.9),
        r("right, odd", True, 0.2),
        r("wrong, coherent", False, 0.8),
        r("wrong, odd", False, 0.1),
    ]
    found, reason = question_pairs(records, REWARD, settings())
    assert reason == "" and texts(found) == [
        ("right, coherent", "wrong, odd", "correctness"),
        ("right, coherent", "right, odd", "coherence"),
    ]


def test_the_cap_applies_per_type():
    records = [r(f"right {i}", True, i / 10) for i in range(6)] + [r(f"wrong {i}", False, i / 10) for i in range(3)]
    found, _ = question_pairs(records, REWARD, settings(max_pairs_per_question=2))
    kinds = [kind for _, _, kind in found]
    assert kinds.count("correctness") == 2 and kinds.count("coherence") == 2
    assert texts(found)[:2] == [("right 5", "wrong 0", "correctness"), ("right 4", "wrong 1", "correctness")]
    assert texts(found)[2:] == [("right 5", "right 0", "coherence"), ("right 4", "right 1", "coherence")]


def test_all_wrong_gives_no_pair_and_says_why():
    assert question_pairs([r("a", False, 0.5), r("b", False, 0.1)], REWARD, settings()) == ([], "all_wrong")


def test_all_correct_pairs_on_coherence_only_when_the_gap_reaches_the_margin():
    found, _ = question_pairs([r("a", True, 0.9), r("b", True, 0.5)], REWARD, settings(margin=0.3))
    assert texts(found) == [("a", "b", "coherence")]  # s_wm gap 0.4 >= 0.3
    found, reason = question_pairs([r("a", True, 0.9), r("b", True, 0.5)], REWARD, settings(margin=0.5))
    assert found == [] and reason == "all_correct_and_coherence_gap_below_margin"


def test_ties_in_coherence_make_no_pair():
    found, _ = question_pairs([r("a", True, 0.5), r("b", True, 0.5)], REWARD, settings(margin=0.0))
    assert found == []


def test_identical_texts_are_never_paired():
    found, reason = question_pairs([r("same", True, 0.9), r("same", False, 0.1)], REWARD, settings())
    assert found == [] and reason == "identical_texts"


def test_a_trajectory_is_not_paired_with_itself_in_the_middle():
    records = [r(f"t{i}", True, i / 10) for i in range(3)]  # odd count: t1 would meet itself
    found, _ = question_pairs(records, REWARD, settings(margin=0.0, max_pairs_per_question=5))
    assert texts(found) == [("t2", "t0", "coherence")]


def test_reward_extremes_pairs_highest_with_lowest_when_the_gap_is_large_enough():
    records = [r("best", True, 1.0), r("mid", True, 0.0), r("worst", False, 0.0)]
    found, _ = question_pairs(records, REWARD, settings(strategy="reward_extremes", margin=1.0))
    assert texts(found) == [("best", "worst", "reward")]  # rewards 1.5, 1.0, 0.0
    found, reason = question_pairs(records, REWARD, settings(strategy="reward_extremes", margin=2.0))
    assert found == [] and reason == "reward_gap_below_margin"


def test_rewards_are_recomputed_with_the_current_weights():
    records = [r("short", True, 0.0, tokens=10), r("long", True, 1.0, tokens=500), r("wrong", False, 0.0)]
    lengthy = RewardConfig(alpha=1.0, beta=0.0, length_penalty=1.0, length_unit=100)
    found, _ = question_pairs(records, lengthy, settings(strategy="reward_extremes", margin=0.0))
    assert texts(found)[0] == ("short", "long", "reward")  # 0.9 vs -4.0: length dominates
    coherent = RewardConfig(alpha=0.0, beta=1.0, length_penalty=0.0, w_end=1.0)
    found, _ = question_pairs(records, coherent, settings(strategy="reward_extremes", margin=0.0))
    assert texts(found)[0][0] == "long"


def test_pairs_carry_rewards_components_and_stats_count_them():
    trajectories = [r("a", True, 0.9), r("b", False, 0.1), r("c", False, 0.2, question="q2")]
    pairs, unpaired, _ = build_pairs(trajectories, REWARD, settings())
    assert len(pairs) == 1 and unpaired == {"all_wrong": 1}
    pair = pairs[0]
    assert pair["chosen_reward"] == pytest.approx(1.45) and pair["rejected_reward"] == pytest.approx(0.05)
    assert pair["chosen_components"]["correct"] is True and pair["pair_type"] == "correctness"
    stats = pair_stats(pairs, unpaired, 2)
    assert stats["pairs_by_type"] == {"correctness": 1} and stats["reward_gap"]["mean"] == pytest.approx(1.4)


def scored(text, correct, reward, s_wm=None, sample=0):
    """A record a reward-protocol scorer scored (reward.scorer_returns=reward): its own reward, no components."""
    return {**r(text, correct, None), "s_end": None, "s_path": None, "reward": reward, "s_wm": s_wm, "sample": sample}


def test_a_scorers_own_reward_decides_the_pairs_whatever_alpha_and_beta_say():
    records = [scored("long and wrong", False, 0.9, sample=0), scored("right", True, 0.2, sample=1)]
    records.append(scored("worst", True, -1.0, sample=2))
    for reward in (REWARD, RewardConfig(alpha=10.0, beta=0.0, length_penalty=5.0)):
        found, _ = question_pairs(records, reward, settings(strategy="reward_extremes", margin=0.0))
        assert texts(found) == [("long and wrong", "worst", "reward")]
    pairs, _, membership = build_pairs(records, REWARD, settings(strategy="reward_extremes", margin=0.0))
    assert (pairs[0]["chosen_reward"], pairs[0]["rejected_reward"]) == (0.9, -1.0)
    rows = trajectory_rewards(records, REWARD, membership)
    assert [(row["reward"], row["pairs"]) for row in rows] == [
        (0.9, ["q1/reward/0"]),
        (0.2, []),
        (-1.0, ["q1/reward/0"]),
    ]


def test_correctness_first_ranks_a_scorers_correct_trajectories_by_its_s_wm_else_by_its_reward():
    with_s_wm = [scored("a", True, 0.1, s_wm=0.9, sample=0), scored("b", True, 0.8, s_wm=0.1, sample=1)]
    found, _ = question_pairs(with_s_wm, REWARD, settings())
    assert texts(found) == [("a", "b", "coherence")]  # its s_wm, not its reward
    without = [scored("a", True, 0.1, sample=0), scored("b", True, 0.8, sample=1)]
    found, _ = question_pairs(without, REWARD, settings())
    assert texts(found) == [("b", "a", "coherence")]


@pytest.mark.parametrize(
    "values, message",
    [
        ([1.0], "returned 1 values for 2 trajectories"),
        ([1.0, float("nan")], "trajectory 1 the reward nan"),
        ([{"s_wm": 0.5}, 1.0], "trajectory 0 the reward None"),
        ("high", "returned str values"),
    ],
)
def test_a_reward_scorer_that_returns_the_wrong_thing_fails_naming_it(values, message):
    trajectories = [r("a", True, 0.0), r("b", False, 0.0)]
    with pytest.raises(ValueError, match="my.scorer") as error:
        scorer_rewards(values, trajectories, "my.scorer")
    assert message in str(error.value)
