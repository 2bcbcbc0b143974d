"""Statistics for accuracy reports: how sure each number and each difference is.

- Wilson score interval for one accuracy (k correct of n), better behaved than the normal interval near 0 and 1;
  with several sampled answers per question, a normal interval over the questions' mean scores.
- Paired deltas between two targets on the same questions: a percentile bootstrap interval over questions, and the
  exact McNemar test (two-sided binomial test on the discordant pairs).
"""

import math

import numpy as np


def wilson(correct: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval for a proportion correct/n; (0, 1) when n is 0."""
    if n == 0:
        return 0.0, 1.0
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def mean_interval(values: list[float], z: float = 1.959964) -> tuple[float, float]:
    """95% normal interval of the mean of per-question scores (e.g. the share of a question's sampled answers that
    are correct): the questions, not the samples, are the independent units."""
    if not values:
        return 0.0, 1.0
    mean = sum(values) / len(values)
    if len(values) == 1:
        return mean, mean
    variance = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    half = z * math.sqrt(variance / len(values))
    return max(0.0, mean - half), min(1.0, mean + half)


def mcnemar_exact(a: list[bool], b: list[bool]) -> float:
    """Two-sided exact McNemar p-value for paired verdicts: P(as extreme a split of the discordant pairs | p=1/2)."""
    only_a = sum(x and not y for x, y in zip(a, b))
    only_b = sum(y and not x for x, y in zip(a, b))
    n = only_a + only_b
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(only_a, only_b) + 1)) / 2**n
    return min(1.0, 2 * tail)


def paired_bootstrap(a: list[bool], b: list[bool], resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% percentile bootstrap interval of accuracy(b) - accuracy(a), resampling questions (pairs) with replacement;
    a question's verdict may be a share of sampled answers correct."""
    if not a:
        return 0.0, 0.0
    diffs = np.asarray(b, dtype=np.float64) - np.asarray(a, dtype=np.float64)
    picks = np.random.default_rng(seed).integers(0, len(diffs), size=(resamples, len(diffs)))
    low, high = np.quantile(diffs[picks].mean(axis=1), [0.025, 0.975])
    return float(low), float(high)
