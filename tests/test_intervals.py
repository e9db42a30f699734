"""Exact intervals and McNemar's test against textbook values and scipy computed another way."""

from __future__ import annotations

import math

import pytest
from scipy.stats import binom, binomtest

from dltest.analysis.intervals import (
    clopper_pearson, inputs_for_half_width, lower_bound, mcnemar_exact, smallest_passing_count, upper_bound,
)
from dltest.errors import DltestError


@pytest.mark.parametrize("k, n, low, high", [
    (5, 10, 0.187086, 0.812914),  # the classic 95% interval of 5/10 (e.g. Agresti & Coull 1998, table 1)
    (0, 10, 0.0, 0.308497),  # 1 - 0.025 ** (1/10)
    (10, 10, 0.691503, 1.0),
    (1, 20, 0.001265, 0.248733),
])
def test_two_sided_matches_textbook_values(k, n, low, high):
    iv = clopper_pearson(k, n, 0.95)
    assert iv.low == pytest.approx(low, abs=1e-6) and iv.high == pytest.approx(high, abs=1e-6)
    assert iv.estimate == k / n


@pytest.mark.parametrize("k, n", [(0, 7), (3, 7), (7, 7), (297, 300), (981, 1000), (412, 1000)])
@pytest.mark.parametrize("confidence", [0.9, 0.95, 0.99])
def test_two_sided_matches_scipys_exact_interval(k, n, confidence):
    ref = binomtest(k, n).proportion_ci(confidence, method="exact")
    iv = clopper_pearson(k, n, confidence)
    assert iv.low == pytest.approx(ref.low, abs=1e-12) and iv.high == pytest.approx(ref.high, abs=1e-12)


def test_one_sided_bounds_solve_the_binomial_tail_equations():
    # the lower bound L of k/n at confidence c is the p with P(X >= k | n, p) = 1 - c
    for k, n in ((297, 300), (50, 100), (1, 5)):
        low = lower_bound(k, n, 0.95)
        assert binom.sf(k - 1, n, low) == pytest.approx(0.05, abs=1e-9)
        high = upper_bound(k, n, 0.95)
        assert binom.cdf(k, n, high) == pytest.approx(0.05, abs=1e-9)
    # all right: L = alpha ** (1/n); none right: the "rule of three" (U ~ 3/n), exactly 1 - alpha ** (1/n)
    assert lower_bound(100, 100, 0.95) == pytest.approx(0.05 ** (1 / 100), rel=1e-12)
    assert upper_bound(0, 100, 0.95) == pytest.approx(1 - 0.05 ** (1 / 100), rel=1e-12)
    assert lower_bound(0, 100) == 0.0 and upper_bound(100, 100) == 1.0
    # a one-sided bound is tighter than the two-sided one at the same confidence
    assert clopper_pearson(297, 300, 0.95).low < lower_bound(297, 300, 0.95) < 297 / 300
    iv = clopper_pearson(297, 300, 0.95, "lower")
    assert iv.high == 1.0 and iv.side == "lower"


def test_mcnemar_exact_is_the_binomial_test_on_discordant_inputs():
    # 10 lost, 2 gained: P(X >= 10 | 12, 1/2) = (C(12,10) + C(12,11) + C(12,12)) / 2^12 = 79 / 4096
    test = mcnemar_exact(10, 2, n=500)
    assert test.p_value == pytest.approx(79 / 4096, rel=1e-12)
    assert test.drop == pytest.approx(8 / 500) and test.discordant == 12
    # a tolerance of 0.02 on 100 inputs with 10 discordant: q0 = (1 + 0.02 * 100 / 10) / 2 = 0.6
    test = mcnemar_exact(8, 2, n=100, tolerance=0.02)
    assert test.p_value == pytest.approx(binom.sf(7, 10, 0.6), rel=1e-12)
    # fewer discordant inputs than the tolerance could lose: no evidence of a larger drop
    assert mcnemar_exact(3, 0, n=1000, tolerance=0.01).p_value == 1.0
    assert mcnemar_exact(0, 0, n=10).p_value == 1.0  # identical outcomes
    # gains make a drop less plausible
    assert mcnemar_exact(10, 8, 100).p_value > mcnemar_exact(10, 0, 100).p_value


def test_inputs_for_half_width():
    n = inputs_for_half_width(0.01, share=0.5, confidence=0.95)
    assert 9604 <= n <= 9800  # the normal approximation says 1.96^2 / (4 * 0.01^2) = 9604; exact needs a few more
    iv = clopper_pearson(round(0.5 * n), n)
    assert max(iv.estimate - iv.low, iv.high - iv.estimate) <= 0.01
    assert inputs_for_half_width(0.01, share=0.98) < n / 4  # accuracies near 1 need far fewer inputs


def test_smallest_passing_count_and_the_figures_in_docs_gate_md():
    for bar, n in ((0.98, 1000), (0.9, 300), (0.5, 40)):
        k = smallest_passing_count(bar, n)
        assert lower_bound(k, n) >= bar > lower_bound(k - 1, n)
    assert smallest_passing_count(0.999, 100) is None  # 100 of 100 cannot show 99.9%
    assert smallest_passing_count(0.0, 10) == 0
    # the tables of docs/gate.md
    assert [inputs_for_half_width(0.01, s) for s in (0.5, 0.98, 0.99)] == [9701, 1114, 769]
    assert [smallest_passing_count(0.98, n) / n for n in (300, 1000, 5000, 10000)] == [299 / 300, 0.988, 0.9834, 0.9824]
    assert lower_bound(297, 300) == pytest.approx(0.9744, abs=5e-5)


@pytest.mark.parametrize("call", [
    lambda: clopper_pearson(5, 0), lambda: clopper_pearson(11, 10), lambda: clopper_pearson(-1, 10),
    lambda: clopper_pearson(5, 10, 1.0), lambda: clopper_pearson(5, 10, math.nan),
    lambda: clopper_pearson(5, 10, side="left"), lambda: mcnemar_exact(5, 5, 8),
    lambda: mcnemar_exact(1, 1, 10, tolerance=1.0), lambda: inputs_for_half_width(0.7),
])
def test_bad_values_are_one_line_errors(call):
    with pytest.raises(DltestError):
        call()
