"""One answer parser: strict, flexible and platinum extraction, and numbers normalised the same way everywhere."""

import json

import pytest

from looper.answers import extract, is_correct, math_verify_available, normalize_number, same_answer
from tests.conftest import shared_file


@pytest.mark.parametrize(
    "text,expected", [("1,234", "1234"), ("$18.00", "18"), ("-7", "-7"), ("3.50", "3.50"), ("no number", None)]
)
def test_normalize_number(text, expected):
    assert normalize_number(text) == expected


def test_strict_reads_only_the_last_answer_line():
    assert extract("5+3=8\n#### 8", "strict") == "8"
    assert extract("#### 7\nthen\n#### 1,200", "strict") == "1200"
    assert extract("the answer is 8", "strict") is None


def test_flexible_reads_the_last_number():
    assert extract("5+3=8 apples, so 8 in total.", "flexible") == "8"
    assert extract("It costs $1,250.00", "flexible") == "1250"


@pytest.mark.parametrize(
    "text,gold,correct",
    [
        ("Work...\nAnswer: 18", "18", True),
        ("**Answer:** 18", "18", True),
        ("Answer: $18.00", "18", True),
        ("Answer: 1,234", "1234", True),
        ("First Answer: 3\nfinal answer: 5", "5", True),
        ("so \\boxed{42} is it", "42", True),
        ("Answer: \\boxed{\\text{7}}", "7", True),
        ("Answer: -3 degrees", "-3", True),
        ("the total is 12\n#### 12", "12", True),
        ("I cannot tell", "5", False),
        ("Answer: 17", "18", False),
        ("Thus:\n18 apples\n\n", "18", True),  # no answer line, no box: the last line
        ("She has 2 bags.\nAnswer:\n\\boxed{12}", "12", True),  # no space after 'answer:': first box in the text
        (
            "I had 3 apples. Answer:18",
            "18",
            False,
        ),  # no space after 'answer:': the text's first number (3), as published
        ("Answer: 7\n\nAnswer: 9", "9", True),  # several answer lines: the last
        ("Answer: 1,234,567", "1234567", True),
        ("Answer: 12.50", "12.5", True),
        ("Answer: \\boxed{\\frac{1}{2}}", "0.5", False),  # a box holding LaTeX is not read as one
        ("## Answer: **42**", "42", True),
    ],
)
def test_platinum_follows_the_benchmark_rules(text, gold, correct):
    assert is_correct(text, gold, "platinum") is correct


def test_model_output_is_never_evaluated():
    assert extract("Answer: __import__('os').system('echo pwned')", "platinum") is None
    assert is_correct("#### 2+2", "4", "strict") is False


@pytest.mark.slow
@pytest.mark.data
@pytest.mark.parametrize("parts", [("gsm8k", "train.jsonl"), ("gsm8k", "test.jsonl"), ("gsm8k_platinum", "test.jsonl")])
@pytest.mark.parametrize("scorer", ["strict", "flexible", "platinum", "math_verify"])
def test_every_gold_solution_scores_correct(parts, scorer):
    if scorer == "math_verify" and not math_verify_available():
        pytest.skip("Math-Verify is not installed (extra `math`)")
    path = shared_file(*parts)
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    golds = [row["answer"].rsplit("####", 1)[1] for row in rows]
    wrong = [i for i, (row, gold) in enumerate(zip(rows, golds)) if not is_correct(row["answer"], gold, scorer)]
    assert wrong == [], f"{len(wrong)} of {len(rows)} wrong, first: {rows[wrong[0]]['answer'][-80:]!r}"


def test_math_verify_compares_values_not_strings():
    if not math_verify_available():
        pytest.skip("Math-Verify is not installed (extra `math`)")
    assert is_correct("so the answer is \\boxed{18}", "18", "math_verify")
    assert is_correct("#### 18.0", "18", "math_verify")
    assert not is_correct("#### 17", "18", "math_verify")


THINK = "</think>"


@pytest.mark.parametrize(
    "text,truncated,expected",
    [
        ("<think>\n5+3=8\n</think>\n\nThe answer is \\boxed{8}.", False, "8"),  # closed think + boxed final
        ("<think>\nmaybe \\boxed{7}? no: 5+3=8\n</think>\n\n\\boxed{8}", False, "8"),  # a draft box inside think loses
        ("<think>\n5+3=8 so \\boxed{8}", False, None),  # the think block never closed: unanswered
        ("<think>\n5+3=8\n</think>\n\n\\boxed{8}", True, None),  # hit the token limit: unanswered
        (
            "The answer is \\boxed{8}.",
            False,
            None,
        ),  # no think tags in think mode: the block (opened by the prompt) never
        # closed
    ],
)
def test_a_reasoning_model_is_read_after_its_think_block(text, truncated, expected):
    for scorer in ("platinum", "flexible"):
        assert extract(text, scorer, THINK, truncated) == expected
    assert is_correct(text, "8", "platinum", THINK, truncated) is (expected == "8")


def test_a_plain_model_is_read_as_before_whatever_tags_it_writes():
    assert extract("<think>\n5+3=8 so \\boxed{8}", "platinum") == "8"
    assert extract("The answer is \\boxed{8}.", "platinum", None, True) == "8"  # truncation matters in think mode


def test_answers_compare_as_exact_numbers():
    assert same_answer("18.50", "18.5") and same_answer("-0.5", "-.5") and not same_answer("18", None)
    assert not is_correct("#### " + "9" * 400, "9" * 399 + "8", "strict")  # no float overflow to inf == inf
    assert is_correct("#### 18.50", "18.5", "strict")


def test_math_verify_scores_in_a_scorer_thread_as_on_the_main_thread():
    pytest.importorskip("math_verify")
    import threading

    text = "So the total is \\boxed{42}."
    on_main = (extract(text, "math_verify"), is_correct(text, "42", "math_verify"))
    in_thread = []
    worker = threading.Thread(
        target=lambda: in_thread.append((extract(text, "math_verify"), is_correct(text, "42", "math_verify")))
    )
    worker.start()
    worker.join()
    assert in_thread == [on_main] and on_main[1] is True
