"""The reference coherence scorer on hand-made trajectories: every formula, edge cases, and the reward."""

import pytest

from looper.coherence import cut, reference_scorer, reward_of, s_end_and_path, split_reasoning, weighted
from looper.config import RewardConfig


def t(answer, reasoning, text=None):
    return {
        "answer": answer,
        "reasoning": reasoning,
        "text": text or f"{reasoning}\n#### {answer}",
        "correct": answer == "9",
        "arm": "a",
        "family": "compute",
        "sample": 0,
    }


def test_full_agreement_gives_s_end_one():
    scored = s_end_and_path([t("9", "16-3-4=<<16-3-4=9>>9")] * 3)
    assert [s["s_end"] for s in scored] == [1.0, 1.0, 1.0]


def test_partial_agreement_counts_the_other_trajectories():
    scored = s_end_and_path([t("9", ""), t("9", ""), t("7", ""), t("5", "")])
    assert [s["s_end"] for s in scored] == pytest.approx([1 / 3, 1 / 3, 0.0, 0.0])


def test_a_trajectory_with_no_answer_scores_zero():
    scored = s_end_and_path([t(None, "16-3-4=<<16-3-4=9>>9"), t(None, "16-3-4=<<16-3-4=9>>9")])
    assert [(s["s_end"], s["s_path"]) for s in scored] == [(0.0, 0.0), (0.0, 0.0)]


def test_a_single_trajectory_has_no_one_to_agree_with():
    assert s_end_and_path([t("9", "4+5=9")])[0]["s_end"] == 0.0


def test_one_false_equation_lowers_validity():
    good = t("18", "16-3-4=<<16-3-4=9>>9 eggs. 9*2=<<9*2=18>>18 dollars.")
    bad = t("18", "16-3-4=<<16-3-4=9>>9 eggs. 9*2=<<9*2=19>>18 dollars.")  # 9*2=19 does not hold
    scored = s_end_and_path([good, bad])
    # R(good) = {9, 18}, R(bad) = {9, 19}: Jaccard 1/3; validity 1 and 1/2
    assert scored[0]["s_path"] == pytest.approx(1 * 1 / 3)
    assert scored[1]["s_path"] == pytest.approx(0.5 * 1 / 3)
    assert scored[1]["equations"][1] == ["9*2", "19", False]


def test_disjoint_intermediate_paths_share_nothing():
    scored = s_end_and_path([t("12", "2*6=12"), t("12", "3+4=7 and 7+5=12"), t("12", "20-8=12")])
    # R = {12}, {7, 12}, {12}: each agrees with the others on the answer; overlap only in the final result
    assert scored[0]["s_path"] == pytest.approx((1 / 2 + 1) / 2)
    assert s_end_and_path([t("12", "2*5=10"), t("12", "3+4=7")])[0]["s_path"] == 0.0


def test_plain_text_equations_count_too():
    scored = s_end_and_path([t("18", "She sells 16 - 3 - 4 = 9 eggs at $2: 9 * $2 = $18"), t("18", "9 x 2 = 18")])
    assert scored[0]["equations"] == [["16 - 3 - 4", "9", True], ["9 * $2", "$18", True]]
    assert scored[0]["s_path"] == pytest.approx(1 / 2)


def test_no_equations_means_no_checkable_work():
    assert s_end_and_path([t("5", "it is five"), t("5", "five")])[0]["s_path"] == 0.0


def test_s_cf_resamples_from_the_cut_and_counts_agreement():
    calls = []

    def generate(requests, n):
        calls.append((requests, n))
        return [["9 more\n#### 9", "#### 9", "#### 4", "nothing"] for _ in requests]

    trajectories = [t("9", "16-3-4=<<16-3-4=9>>9 eggs in all"), t(None, "no idea")]
    reward = RewardConfig(cf_samples=4, cf_cut=0.5)
    scored = reference_scorer(
        question="q",
        gold="9",
        trajectories=trajectories,
        generate=generate,
        extract_answer=lambda text: text.rsplit("#### ", 1)[1] if "#### " in text else None,
        reward=reward,
    )
    assert [s["s_cf"] for s in scored] == [0.5, 0.0]
    ((requests, n),) = calls
    assert n == 4 and [index for index, _ in requests] == [0]  # no answer: nothing to be robust about
    assert requests[0][1] == cut(trajectories[0]["reasoning"], 0.5)


def test_cf_samples_zero_turns_s_cf_off_and_its_weight_drops_out():
    reward = RewardConfig(cf_samples=0, w_end=1.0, w_path=3.0, w_cf=100.0)
    scored = reference_scorer(
        question="q",
        gold="9",
        trajectories=[t("9", "4+5=9"), t("9", "4+5=9")],
        generate=None,
        extract_answer=lambda x: None,
        reward=reward,
    )
    assert scored[0]["s_cf"] is None
    assert weighted(scored[0], reward) == pytest.approx((1 * 1.0 + 3 * 1.0) / 4)


def test_s_wm_is_the_weighted_mean_of_active_components():
    reward = RewardConfig(w_end=1, w_path=2, w_cf=1)
    assert weighted({"s_end": 1.0, "s_path": 0.5, "s_cf": 0.0}, reward) == pytest.approx(2 / 4)
    assert weighted({"s_end": 1.0, "s_path": 0.5, "s_cf": None}, RewardConfig(w_end=0, w_path=0)) == 0.0


def test_reward_combines_correctness_coherence_and_length():
    record = {"correct": True, "s_end": 1.0, "s_path": 0.0, "s_cf": None, "num_tokens": 250}
    reward = RewardConfig(alpha=1.0, beta=0.5, length_penalty=0.01, length_unit=100, w_end=1, w_path=1)
    assert reward_of(record, reward) == pytest.approx(1.0 + 0.5 * 0.5 - 0.01 * 2.5)


def test_reasoning_stops_at_the_answer_line_and_cuts_keep_words_whole():
    assert split_reasoning("a=1\nb=2\n#### 3") == "a=1\nb=2"
    assert split_reasoning("work\n**Answer:** 3") == "work"
    assert split_reasoning("no marker") == "no marker"
    assert cut("alpha beta gamma delta", 0.5) == "alpha beta"


def test_cuts_end_on_a_token_boundary_never_inside_a_word_or_an_annotation():
    # the model's next token carries the space (` gamma`), so the cut ends before the whitespace
    assert cut("alpha beta gamma delta", 0.5) == "alpha beta"
    assert cut("16-6=<<16-6=10>>10 and", 0.4) == ""  # no boundary before the cut: resample from the start
    assert cut("so <<16 - 6 = 10>>10 apples are left over", 0.3) == "so"  # a cut inside `<<...>>` moves before it


def test_s_end_compares_answers_as_numbers():
    scored = s_end_and_path([t("18.50", ""), t("18.5", ""), t("18", "")])
    assert [s["s_end"] for s in scored] == [0.5, 0.5, 0.0]


def test_the_reasoning_of_a_think_trace_is_its_think_block():
    text = "<think>\n2+3=5\n</think>\n\nSo \\boxed{5}"
    assert split_reasoning(text, "</think>") == "<think>\n2+3=5"
    assert split_reasoning("<think>\nstill thinking 2+3=5", "</think>") == "<think>\nstill thinking 2+3=5"


def test_latex_traces_earn_s_path_like_plain_ones():
    latex = t("12", r"First \(3 \times 4 = 12\).")
    plain = t("12", "First 3 * 4 = 12.")
    scored = s_end_and_path([latex, plain])
    assert scored[0]["s_path"] == scored[1]["s_path"] == 1.0
