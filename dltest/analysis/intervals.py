"""Exact confidence bounds and tests for accuracies measured on a finite sample of inputs.

An accuracy measured on n inputs is a binomial share: on 1000 inputs a true 98% shows up
anywhere between about 97.1% and 98.8% (95% interval). A gate that compares the point estimate
with a bar passes or fails on that noise; these functions let it decide on exact bounds.

- :func:`clopper_pearson`: the exact (Clopper-Pearson) interval of a share ``k / n``, one- or
  two-sided, from the beta distribution. It never covers less than the stated confidence.
- :func:`mcnemar_exact`: the exact McNemar test for two classifiers scored on the **same**
  inputs. Only the discordant inputs (right for one, wrong for the other) carry information;
  under "no change" each discordant input is a fair coin. ``tolerance`` turns it into a
  test of "the drop is no larger than ``tolerance``" (the coin's bias that such a drop implies).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from scipy.stats import beta, binomtest

from dltest.errors import DltestError

SIDES = ("two-sided", "lower", "upper")


@dataclass(frozen=True)
class Interval:
    """A share ``estimate = k / n`` and its exact interval ``[low, high]`` at ``confidence``."""

    k: int
    n: int
    low: float
    high: float
    confidence: float
    side: str = "two-sided"

    @property
    def estimate(self) -> float:
        return self.k / self.n


def check_confidence(confidence: float) -> float:
    """``confidence`` must lie in (0, 1): 0.95 means 95%."""
    value = float(confidence)
    if not 0 < value < 1 or math.isnan(value):
        raise DltestError(f"confidence must be in (0, 1), e.g. 0.95, got {confidence}")
    return value


def _check_counts(k: int, n: int) -> None:
    if int(n) != n or n < 1:
        raise DltestError(f"a share needs n >= 1 inputs, got n={n}")
    if int(k) != k or not 0 <= k <= n:
        raise DltestError(f"a count must lie in [0, n={n}], got {k}")


def clopper_pearson(k: int, n: int, confidence: float = 0.95, side: str = "two-sided") -> Interval:
    """The exact interval of the share ``k / n``.

    ``side="lower"`` gives the one-sided bound ``[low, 1]`` (the true share is at least ``low``
    with probability ``confidence``), ``"upper"`` gives ``[0, high]``, ``"two-sided"`` splits
    ``1 - confidence`` between both tails. The bounds are beta quantiles: ``low`` is the
    ``alpha`` quantile of Beta(k, n - k + 1) (0 when k = 0), ``high`` the ``1 - alpha``
    quantile of Beta(k + 1, n - k) (1 when k = n).
    """
    _check_counts(k, n)
    confidence = check_confidence(confidence)
    if side not in SIDES:
        raise DltestError(f"side must be one of {', '.join(SIDES)}, got {side!r}")
    alpha = 1 - confidence if side != "two-sided" else (1 - confidence) / 2
    low = 0.0 if k == 0 else float(beta.ppf(alpha, k, n - k + 1))
    high = 1.0 if k == n else float(beta.ppf(1 - alpha, k + 1, n - k))
    if side == "lower":
        high = 1.0
    elif side == "upper":
        low = 0.0
    return Interval(int(k), int(n), low, high, confidence, side)


def lower_bound(k: int, n: int, confidence: float = 0.95) -> float:
    """One-sided exact lower bound of the share ``k / n``."""
    return clopper_pearson(k, n, confidence, "lower").low


def upper_bound(k: int, n: int, confidence: float = 0.95) -> float:
    """One-sided exact upper bound of the share ``k / n``."""
    return clopper_pearson(k, n, confidence, "upper").high


@dataclass(frozen=True)
class McNemarResult:
    """Paired comparison of a baseline and a candidate on the same ``n`` inputs.

    ``lost``: inputs the baseline got right and the candidate wrong; ``gained``: the reverse.
    ``drop = (lost - gained) / n`` is the exact change of the share. ``p_value`` is the one-sided
    exact probability, under a true drop of ``tolerance``, of seeing at least ``lost`` losses
    among the ``lost + gained`` discordant inputs: small means the drop exceeds the tolerance.
    """

    lost: int
    gained: int
    n: int
    tolerance: float
    p_value: float

    @property
    def drop(self) -> float:
        return (self.lost - self.gained) / self.n

    @property
    def discordant(self) -> int:
        return self.lost + self.gained


def mcnemar_exact(lost: int, gained: int, n: int, tolerance: float = 0.0) -> McNemarResult:
    """Exact McNemar test that the share dropped by more than ``tolerance`` (absolute).

    Conditional on the m = lost + gained discordant inputs, ``lost`` is Binomial(m, q). No change
    is q = 1/2 (the classic exact McNemar test); a drop of ``tolerance`` means
    (2q - 1) m / n = tolerance, i.e. q0 = (1 + tolerance n / m) / 2. A q0 of 1 or more cannot be
    exceeded (fewer discordant inputs than the tolerance allows to lose): p = 1.
    """
    for name, value in (("lost", lost), ("gained", gained)):
        if int(value) != value or value < 0:
            raise DltestError(f"{name} must be a count >= 0, got {value}")
    if int(n) != n or n < lost + gained or n < 1:
        raise DltestError(f"n must be >= lost + gained and >= 1, got n={n}")
    if not 0 <= tolerance < 1:
        raise DltestError(f"tolerance must be in [0, 1), got {tolerance}")
    m = lost + gained
    q0 = 0.5 * (1 + tolerance * n / m) if m else 1.0
    if q0 >= 1:
        p_value = 1.0
    else:
        p_value = float(binomtest(int(lost), int(m), q0, alternative="greater").pvalue)
    return McNemarResult(int(lost), int(gained), int(n), float(tolerance), p_value)


def inputs_for_half_width(half_width: float, share: float = 0.5, confidence: float = 0.95) -> int:
    """The smallest n whose exact two-sided interval around ``share`` is at most ``half_width`` wide
    on either side (found by bisection on the Clopper-Pearson bounds, not the normal rule)."""
    confidence = check_confidence(confidence)
    if not 0 < half_width < 0.5:
        raise DltestError(f"half_width must be in (0, 0.5), got {half_width}")
    if not 0 <= share <= 1:
        raise DltestError(f"share must be in [0, 1], got {share}")

    def fits(n: int) -> bool:
        iv = clopper_pearson(round(share * n), n, confidence)
        return max(iv.estimate - iv.low, iv.high - iv.estimate) <= half_width

    lo, hi = 1, 2
    while not fits(hi):
        lo, hi = hi, hi * 2
    while hi - lo > 1:  # the width shrinks with n up to rounding of k; bisection finds the first fit
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if fits(mid) else (mid, hi)
    return hi


def smallest_passing_count(bar: float, n: int, confidence: float = 0.95) -> int | None:
    """The fewest correct inputs out of ``n`` whose one-sided exact lower bound reaches ``bar``
    (what a model must measure to pass a minimum on ``n`` inputs); None when even n of n falls short."""
    if not 0 <= bar <= 1:
        raise DltestError(f"bar must be in [0, 1], got {bar}")
    if lower_bound(n, n, confidence) < bar:
        return None
    lo, hi = -1, n  # lower_bound grows with k: find the first k that reaches the bar
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if lower_bound(mid, n, confidence) >= bar else (mid, hi)
    return hi
