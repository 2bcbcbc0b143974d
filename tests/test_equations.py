"""Equations found in reasoning text and checked by the safe parser (never eval)."""

import json
import re

import pytest

from looper.equations import annotations, check, evaluate, find_equations
from tests.conftest import shared_file


@pytest.mark.parametrize(
    "text,lhs,rhs,holds",
    [
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
    ],
)
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


@pytest.mark.data
def test_every_gsm8k_train_annotation_parses_and_holds():
    path = shared_file("gsm8k", "train.jsonl")
    total, failing = 0, []
    for line in path.read_text().splitlines():
        answer = json.loads(line)["answer"]
        found = annotations(answer)
        assert len(found) == len(re.findall(r"<<.*?>>", answer)), answer  # none escapes the scanner
        for lhs, rhs in found:
            total += 1
            if not check(lhs, rhs).holds:
                failing.append(f"<<{lhs}={rhs}>>")
    assert total > 20000 and failing == []


@pytest.mark.parametrize(
    "text,expected",
    [
        (r"\(3 \times 4 = 12\)", [("3 * 4", "12", True)]),
        (r"\(2 \cdot 5 = 11\)", [("2 * 5", "11", False)]),
        (r"\(10 \div 4 = 2.5\)", [("10 / 4", "2.5", True)]),
        (r"\(\frac{12}{4} = 3\)", [("(12)/(4)", "3", True)]),
        (r"\[ \dfrac{3}{4} \times 8 = 6 \]", [("(3)/(4) * 8", "6", True)]),
    ],
)
def test_latex_operators_and_fractions_are_read(text, expected):
    assert [(e.lhs, e.rhs, e.holds) for e in find_equations(text)] == expected


def test_every_link_of_a_chain_is_checked():
    assert [(e.lhs, e.rhs, e.holds) for e in find_equations("16 - 3 - 4 = 13 - 4 = 9")] == [
        ("16 - 3 - 4", "13 - 4", True),
        ("13 - 4", "9", True),
    ]
    assert [(e.lhs, e.rhs, e.holds) for e in find_equations("2 * 3 = 6 = 7")] == [("2 * 3", "6", True)]
    # `6 = 7` has no operator on either side: not an equation; a false last link of an expression is caught
    assert [e.holds for e in find_equations("2 * 3 = 6 = 3 + 5")] == [True, False]


def test_a_running_calculation_is_read_step_by_step():
    equations = find_equations("2+3=5+1=6")
    assert [(e.lhs, e.rhs, e.holds, e.result) for e in equations] == [("2+3", "5", True, "5"), ("5+1", "6", True, "6")]


def test_a_chain_link_between_expressions_has_no_stated_result():
    (first, second) = find_equations("16 - 3 - 4 = 13 - 4 = 9")
    assert first.result is None and second.result == "9"
