"""Intervals, tests and verdicts against answers known by hand or from the textbook."""

import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from common.stats import (
    NO_DIFFERENCE,
    bootstrap_ci,
    bootstrap_difference,
    compare,
    mcnemar_exact,
    mean_ci,
    summary,
    t_difference,
    wilson_interval,
)


def test_mean_ci_is_the_student_t_interval():
    estimate = mean_ci([1, 2, 3, 4, 5])
    half = 2.7764451 * math.sqrt(2.5) / math.sqrt(5)  # t(0.975, 4) s / sqrt(n)
    assert estimate.value == 3
    assert (estimate.low, estimate.high) == pytest.approx((3 - half, 3 + half))
    assert estimate.n == 5


def test_one_seed_claims_nothing():
    estimate = mean_ci([2.0])
    assert math.isinf(estimate.low) and math.isinf(estimate.high)
    assert compare([2.0], [1.0], higher_is_better=True, paired=False).verdict == NO_DIFFERENCE


def test_wilson_interval_textbook_value():
    estimate = wilson_interval(8, 10)
    assert estimate.value == 0.8
    assert (estimate.low, estimate.high) == pytest.approx((0.4902, 0.9433), abs=1e-4)
    assert wilson_interval(0, 20).low == 0.0 and wilson_interval(20, 20).high == 1.0
    for n in range(1, 60):  # the interval holds k / n exactly at both ends (no rounding past it)
        for k in (0, n):
            e = wilson_interval(k, n)
            assert e.low <= e.value <= e.high
    with pytest.raises(ValueError, match="successes"):
        wilson_interval(11, 10)


def test_mcnemar_exact_binomial():
    a = [True] * 10 + [False] * 2 + [True] * 30 + [False] * 5
    b = [False] * 10 + [True] * 2 + [True] * 30 + [False] * 5
    result = mcnemar_exact(a, b)
    assert (result.only_a, result.only_b) == (10, 2)
    assert result.p_value == pytest.approx(2 * (1 + 12 + 66) / 4096)
    assert mcnemar_exact(a, a).p_value == 1.0
    with pytest.raises(ValueError, match="same length"):
        mcnemar_exact([True], [True, False])


def test_welch_difference_matches_scipy():
    a, b = [3.1, 2.9, 3.4, 3.0], [2.1, 2.6, 2.2, 2.9, 2.4]
    ours = t_difference(a, b, paired=False)
    reference = scipy_stats.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
    assert (ours.low, ours.high) == pytest.approx((reference.low, reference.high))


def test_paired_difference_is_the_interval_of_the_differences():
    a, b = [10.0, 12.0, 11.0], [9.0, 11.5, 9.8]
    paired = t_difference(a, b, paired=True)
    direct = mean_ci(np.subtract(a, b))
    assert (paired.value, paired.low, paired.high) == pytest.approx((direct.value, direct.low, direct.high))


def test_bootstrap_mean_interval_matches_the_normal_one_on_a_large_sample():
    x = np.random.default_rng(0).normal(5.0, 2.0, size=4_000)
    estimate = bootstrap_ci(x, resamples=4_000)
    half = 1.96 * x.std(ddof=1) / math.sqrt(x.size)
    assert estimate.value == pytest.approx(x.mean())
    assert estimate.high - estimate.low == pytest.approx(2 * half, rel=0.1)
    median = bootstrap_ci(x, statistic=np.median, resamples=500)
    assert median.value == pytest.approx(np.median(x))


def test_paired_bootstrap_sees_a_shift_that_unpaired_noise_hides():
    rng = np.random.default_rng(1)
    item_difficulty = rng.normal(0, 5, size=200)
    a = item_difficulty + 0.5 + rng.normal(0, 0.2, size=200)
    b = item_difficulty
    assert bootstrap_difference(a, b, paired=True).excludes(0)
    assert not bootstrap_difference(a, b, paired=False).excludes(0)


@pytest.mark.parametrize("higher_is_better, expected", [(True, "adaptive better"), (False, "full better")])
def test_compare_names_the_better_side_only_when_the_interval_excludes_zero(higher_is_better, expected):
    clear = compare([0.95, 0.96, 0.94], [0.50, 0.52, 0.49], higher_is_better=higher_is_better, paired=True,
                    names=("adaptive", "full"))
    assert clear.verdict == expected
    assert clear.difference.value == pytest.approx(0.4466667, abs=1e-6)
    assert "adaptive - full" in clear.sentence()
    overlapping = compare([0.95, 0.90, 0.97], [0.93, 0.96, 0.91], higher_is_better=True, paired=False)
    assert overlapping.verdict == NO_DIFFERENCE


def test_compare_refuses_an_unknown_method_and_bad_input():
    with pytest.raises(ValueError, match="method"):
        compare([1, 2], [1, 2], higher_is_better=True, paired=True, method="z")
    with pytest.raises(ValueError, match="non-finite"):
        mean_ci([1.0, float("nan")])
    with pytest.raises(ValueError, match="empty"):
        mean_ci([])
    with pytest.raises(ValueError, match="same length"):
        t_difference([1, 2], [1], paired=True)


def test_summary_holds_values_and_seeds():
    out = summary([1.0, 2.0, 3.0], seeds=[0, 1, 2])
    assert out["mean"] == 2.0 and out["seeds"] == [0, 1, 2] and out["values"] == [1.0, 2.0, 3.0]
    assert out["ci"][0] < 2.0 < out["ci"][1]
    with pytest.raises(ValueError, match="one seed per value"):
        summary([1.0], seeds=[0, 1])
