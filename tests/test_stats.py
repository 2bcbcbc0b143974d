"""The report's statistics against values computed by hand or known from the literature."""

import pytest

from looper.stats import mcnemar_exact, paired_bootstrap, wilson


def test_wilson_matches_the_textbook_value():
    low, high = wilson(81, 263)  # Wilson (1927) style example: p = 0.308
    assert low == pytest.approx(0.2553, abs=1e-3) and high == pytest.approx(0.3662, abs=1e-3)


def test_wilson_stays_inside_zero_one():
    assert wilson(0, 10)[0] == pytest.approx(0.0) and wilson(10, 10)[1] == pytest.approx(1.0)
    assert wilson(0, 0) == (0.0, 1.0)


def test_mcnemar_exact_on_discordant_counts():
    a = [True] * 10 + [False] * 2 + [True] * 5  # 10 only-a, 2 only-b, 5 both right
    b = [False] * 10 + [True] * 2 + [True] * 5
    # two-sided binomial: 2 * P(X <= 2 | n=12, p=1/2) = 2 * (1 + 12 + 66) / 4096
    assert mcnemar_exact(a, b) == pytest.approx(2 * 79 / 4096)
    assert mcnemar_exact(a, a) == 1.0


def test_paired_bootstrap_brackets_the_observed_difference():
    a = [i % 2 == 0 for i in range(400)]
    b = [i % 4 != 3 for i in range(400)]  # +25 points
    low, high = paired_bootstrap(a, b)
    assert low < 0.25 < high and high - low < 0.15
    assert paired_bootstrap(a, a) == (0.0, 0.0)
