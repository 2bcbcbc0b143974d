"""Equations found in reasoning text and checked by the safe parser (never eval)."""

import json
import re

import pytest

from looper.equations import _ANNOTATION, check, evaluate, find_equations
from tests.conftest import shared_file


@pytest.mark.parametrize("text,lhs,rhs,holds", [
    ("16 - 3 - 4 = 9 eggs", "16 - 3 - 4", "9", True),
    ("9 * $2 = $18", "9 * $2", "$18", True),
    ("3 x 4 = 12", "3 x 4", "12", True),
    ("12 ÷ 4 = 3", "12 ÷ 4", "3", True),
    ("3 × 4 = 13", "3 × 4", "13", False),
    ("(2 + 3) * 4 = 20", "(2 + 3) * 4", "20", True),
    ("1,200 / 4 = 300", "1,200 / 4", "300", True),
    ("0.5 * 7 = 3.5", "0.5 * 7", "3.5", True),
    ("50% * 8 = 4", "50% * 8", "4", True),
    ("-5 + 2 = -3", "-5 + 2", "-3", True),
])
def test_plain_text_equations(text, lhs, rhs, holds):
    (equation,) = find_equations(text)
    assert (equation.lhs, equation.rhs, equation.holds) == (lhs, rhs, holds)


def test_annotations_take_precedence_over_the_plain_text_around_them():
    equations = find_equations("She pays 2*5=$<<2*5=10>>10, then 10+1=<<10+1=11>>11.")
    assert [(e.lhs, e.rhs) for e in equations] == [("2*5", "10"), ("10+1", "11")]


def test_rounding_is_allowed_to_the_decimals_shown():
    assert check("10/3", "3.33").holds and check("10/3", "3.333").holds
    assert not check("10/3", "3.4").holds and not check("10/3", "3").holds


def test_the_parser_rejects_anything_but_arithmetic():
    for text in ("__import__('os')", "2**10", "abs(-3)", "1 +", "(1 + 2"):
        with pytest.raises((ValueError, ZeroDivisionError)):
            evaluate(text)
    assert not check("7/0", "1").holds


def test_python_floor_division_and_unary_plus_from_gsm8k_annotations():
    assert evaluate("560//10") == 56 and evaluate("+30+46") == 76 and evaluate("3*+6") == 18


def test_every_gsm8k_train_annotation_parses_and_holds():
    path = shared_file("gsm8k", "train.jsonl")
    total, failing = 0, []
    for line in path.read_text().splitlines():
        answer = json.loads(line)["answer"]
        annotations = _ANNOTATION.findall(answer)
        assert len(annotations) == len(re.findall(r"<<.*?>>", answer)), answer  # none escapes the pattern
        for lhs, rhs in annotations:
            total += 1
            if not check(lhs, rhs).holds:
                failing.append(f"<<{lhs}={rhs}>>")
    assert total > 20000 and failing == []
