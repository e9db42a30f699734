"""Sampling designs for estimating accuracy on an unlabeled pool, each with its estimator and interval.

A design draws the inputs to label from a pool of ``N`` inputs, knowing every input's selection
probability, and turns the labels of the drawn inputs into a point estimate of the pool's
accuracy ``theta = mean(y)`` (``y`` = 1 where the model is right) and a two-sided interval.
The target is the pool itself (a finite population): what is random is the draw, not the pool.

The designs see two numbers per input, both from the one inference pass:

- ``confidence``: the model's top softmax probability, read as its predicted probability of
  being right (the "prediction" of PPI++ and active inference, the strata of ``stratified``);
- ``score``: an uncertainty score (entropy, DeepGini, ...), high where errors are likely
  (the sampling weights of ``importance``).

Designs:

- ``srs``: simple random sampling without replacement; ``k / n`` with the exact
  Clopper-Pearson interval (valid at every n; conservative, as it ignores the finite pool).
- ``stratified``: strata of equal size by confidence; a compromise allocation, half of the
  budget proportional to the strata's sizes and half Neyman (``n_h ~ N_h S_h``, ``S_h =
  sqrt(p_h (1 - p_h))`` with ``p_h`` the stratum's mean confidence), at least 2 labels per
  stratum, simple random sampling inside each; the stratified mean. The proportional half
  guards against an overconfident model, whose confident strata Neyman would starve.
- ``importance``: ``n`` draws with replacement with probability ``q_i = (1 - u) s_i / sum(s)
  + u / N`` (``u`` = ``uniform_share``, default 0.5: mixing with the uniform bounds every
  weight ``1 / (N q_i)`` by ``1 / u``). With ``w = 1 / (N q)`` per draw, the estimate is
  ``lambda + mean(y w - lambda w)``: unbiased for every ``lambda``, as ``mean(w)`` has the known
  expectation 1. ``lambda = 1`` is the Hansen-Hurwitz estimate of the error rate (accuracy = 1 -
  it), the right one when errors are rare; ``lambda = 0`` the Hansen-Hurwitz estimate of the
  accuracy, the right one when right outcomes are rare (robust accuracy near 0%); ``lambda``
  is power-tuned on the draws, ``cov(y w, w) / var(w)`` clipped to [0, 1], as in ``ppi``.
- ``ppi``: PPI++ (Angelopoulos, Duchi, Zrnic 2023): a simple random sample, the estimate
  ``lambda mean_N(f) + mean_n(y - lambda f)`` with ``f`` the confidence and ``lambda`` tuned to
  the smallest variance, ``cov(y, f) / var(f)`` on the labels, clipped to [0, 1] (the pool's
  ``mean_N(f)`` is known exactly, so PPI++'s ``1 + n/N`` factor drops); finite-pool correction.
- ``active``: active inference (Zrnic & Candes 2024): draws with replacement with probability
  from the uncertainty, ``q_i ~ sqrt(f_i (1 - f_i))`` (the root of the expected (y - f)^2 under
  the model), mixed with the uniform as in ``importance``; the augmented inverse-probability-
  weighted estimate ``lambda mean_N(f) + mean_draws((y - lambda f) / (N q))``, ``lambda``
  power-tuned on the draws. Draws with replacement (the paper draws each input independently)
  keep the budget exact.

Intervals. ``srs`` is exact. The others are asymptotically valid (a central limit theorem):
their variance is the larger of the sample estimate and the variance a calibrated model
anticipates from its confidence (a small sample without errors otherwise claims zero
variance; for robust accuracy the caller scales the confidence by the observed survival share
or drops the floor, see :mod:`dltest.estimation.estimating`), and it becomes an interval as
Clopper-Pearson at the effective sample size ``p (1 - p) / variance`` shrunk by
``(z / t_{n-1})^2`` (Korn & Graubard 1998), which keeps the exact interval's shape near 100%
where a normal interval undercovers. For the designs that draw with replacement (``importance``,
``active``) the ``t`` takes the degrees of freedom of the draws' sample variance given their
excess kurtosis (:func:`variance_df`): weighted draws of rare outcomes are heavy-tailed, and a
small sample underestimates their variance. Their coverage is measured, not guaranteed:
docs/estimate.md gives it per pool and budget. Below a design's ``min_budget`` draws (200 for
``importance``, 100 for ``active``) the measured coverage fell under 94%, and the estimate says
that its interval is not valid (the gate refuses it).

Robust accuracy with plan-time attacks (``dltest estimate plan --attacks``): ``PoolScores.robust``
holds ``g = f * survived`` (:func:`robust_surrogate`), whether each prediction survived an attack
with the predicted label (or the share of several runs it survived, ``--attack-restarts``),
computed before any label. The weighted draws then aim at both figures
(:func:`aim_at_both`), and the estimators take another prediction of the outcome through
:meth:`Sample.with_prediction` and :meth:`Design.prediction_moments` (the calibrated surrogate of
:func:`dltest.estimation.estimating.calibrated_surrogate`). The draw stays fixed before the labels,
so every estimator stays design-unbiased whatever the surrogate's quality.

Everything here is numpy on arrays, so a benchmark can redraw a design thousands of times.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import numpy as np
from scipy.stats import beta, norm
from scipy.stats import t as t_dist

from dltest.analysis.intervals import clopper_pearson
from dltest.errors import DltestError

DEFAULT_STRATA = 5
DEFAULT_UNIFORM_SHARE = 0.5
DEFAULT_PROPORTIONAL_SHARE = 0.5
MIN_PER_STRATUM = 2
# Fewest draws for a valid interval, measured (docs/estimate.md): below them, coverage fell under 94%
# on a pool where the few errors hide among confident inputs (MNIST) or the model is overconfident
# (Fashion-MNIST). srs is exact; stratified and ppi covered >= 94% from 50 labels on.
IMPORTANCE_MIN_BUDGET = 200
ACTIVE_MIN_BUDGET = 100


@dataclass
class Sample:
    """The draws of one design over a pool of ``pool_size`` inputs.

    ``positions`` are pool positions in draw order (a position repeats when a design draws with
    replacement); ``probability`` is, per draw, the per-draw selection probability ``q_i`` (with
    replacement) or the inclusion probability ``pi_i`` (without). ``confidence`` is the model's
    confidence at each drawn position; ``pool_mean_confidence`` its mean over the whole pool.
    """

    design: str
    pool_size: int
    positions: np.ndarray
    probability: np.ndarray
    confidence: np.ndarray
    pool_mean_confidence: float
    with_replacement: bool
    moments: dict[str, float] = field(default_factory=dict)  # pool sums behind the variance floor
    strata: np.ndarray | None = None  # stratum of each draw (stratified)
    strata_sizes: np.ndarray | None = None  # N_h
    strata_mean_confidence: np.ndarray | None = None

    @property
    def labels_needed(self) -> int:
        """Distinct inputs to label (a repeated draw is labeled once)."""
        return len(np.unique(self.positions))

    def with_prediction(self, values: np.ndarray, moments: dict[str, Any]) -> "Sample":
        """The same draws with another prediction of the outcome in place of the confidence (the
        robust surrogate): ``values`` per draw, ``moments`` its pool sums as
        :meth:`Design.prediction_moments` gives them. The estimators read the prediction from
        ``confidence`` and the moments only, so they estimate with ``values``; the draws stay."""
        pool_moments = {k: float(v) for k, v in moments.items() if k != "strata_mean"}
        strata_mean = moments.get("strata_mean")
        return replace(self, confidence=np.asarray(values, float), pool_mean_confidence=pool_moments["mean_c"],
                       moments={**self.moments, **pool_moments},
                       strata_mean_confidence=self.strata_mean_confidence if strata_mean is None
                       else np.asarray(strata_mean, float))


@dataclass(frozen=True)
class Result:
    """A point estimate of a share and its two-sided interval at ``confidence``."""

    estimate: float
    low: float
    high: float
    standard_error: float
    confidence: float
    lam: float | None = None  # power-tuning parameter (ppi, active)

    @property
    def width(self) -> float:
        return self.high - self.low


@dataclass(frozen=True)
class PoolScores:
    """What a design knows of the pool: per input, the confidence and an uncertainty score, and
    optionally ``robust``, the label-free robust surrogate ``g = f * survived`` of plan-time
    attacks (:func:`robust_surrogate`): with it the weighted draws aim at both figures."""

    confidence: np.ndarray
    score: np.ndarray
    robust: np.ndarray | None = None

    def __post_init__(self) -> None:
        c, s = np.asarray(self.confidence, float), np.asarray(self.score, float)
        if c.ndim != 1 or s.shape != c.shape or len(c) == 0:
            raise DltestError(f"confidence and score must be two equally long non-empty vectors, got {c.shape} and {s.shape}")
        if not (np.isfinite(c).all() and np.isfinite(s).all()):
            raise DltestError("confidence and scores must be finite")
        object.__setattr__(self, "confidence", np.clip(c, 0.0, 1.0))
        object.__setattr__(self, "score", np.clip(s, 0.0, None))
        if self.robust is not None:
            g = np.asarray(self.robust, float)
            if g.shape != c.shape or not np.isfinite(g).all():
                raise DltestError(f"the robust surrogate needs one finite value per pool input ({len(c)}), got {g.shape}")
            object.__setattr__(self, "robust", np.clip(g, 0.0, 1.0))

    def __len__(self) -> int:
        return len(self.confidence)


# --- helpers ---------------------------------------------------------------------------------


def _normal(estimate: float, variance: float, confidence: float, lam: float | None = None, n: int = 0,
            df: float | None = None) -> Result:
    """The interval of a design-based estimate with ``variance`` from ``n`` labels: Clopper-Pearson
    at the effective sample size ``n_eff = p (1 - p) / variance``, shrunk by ``(z / t_{df})^2``
    (Korn & Graubard 1998; ``df = n - 1`` unless given), which keeps the exact interval's shape near 0 and 1 where a normal
    interval undercovers; ``p`` is kept ``1 / (2 n)`` away from 0 and 1 so that an all-correct
    sample keeps a width."""
    se = math.sqrt(max(variance, 0.0))
    point = min(max(float(estimate), 0.0), 1.0)
    edge = 0.5 / max(n, 1)
    p = min(max(point, edge), 1 - edge)
    if se == 0:
        return Result(float(estimate), point, point, 0.0, confidence, lam)
    n_eff = p * (1 - p) / se**2
    if n > 1:  # Korn & Graubard's degrees-of-freedom correction: n_eff (z / t_df)^2, df = n - 1 unless given
        n_eff *= (norm.ppf(0.5 + confidence / 2) / t_dist.ppf(0.5 + confidence / 2, df or (n - 1))) ** 2
    alpha = (1 - confidence) / 2
    k = point * n_eff
    low = 0.0 if k <= 0 else float(beta.ppf(alpha, k, n_eff - k + 1))
    high = 1.0 if k >= n_eff else float(beta.ppf(1 - alpha, k + 1, n_eff - k))
    return Result(float(estimate), low, high, se, confidence, lam)


def mix_with_uniform(weights: np.ndarray, uniform_share: float) -> np.ndarray:
    """Per-draw probabilities ``(1 - u) w / sum(w) + u / N``; all-zero weights give the uniform."""
    n = len(weights)
    total = float(weights.sum())
    if total <= 0:
        return np.full(n, 1.0 / n)
    return (1 - uniform_share) * weights / total + uniform_share / n


def robust_surrogate(confidence: np.ndarray, survived: np.ndarray) -> np.ndarray:
    """``g = f * survived``: a label-free prediction that an input is right AND robust. An attack
    with the model's predicted label is the attack with the true label wherever the prediction is
    right, and a wrong prediction is never robust: robust-and-right = right and the prediction
    survives. ``survived`` may be the share of several runs survived (in [0, 1])."""
    return np.asarray(confidence, float) * np.asarray(survived, float)


def aim_at_both(clean_rule: np.ndarray, pool: PoolScores) -> np.ndarray:
    """Draw weights for clean and robust accuracy: without a robust surrogate, ``clean_rule``
    itself; with one, the mean of ``clean_rule`` and the robust rule ``sqrt(r (1 - r))``, each
    normalised to sum 1, where ``r = (f + g) / 2``. ``g`` alone would give the inputs whose
    prediction the plan-time attack broke (``g = 0``) no weight, yet a random-start attack run
    again at estimate time spares 15-32% of the right ones (docs/estimate.md): the draw cannot
    know that share before the labels and takes even odds for them (``r = f / 2``)."""
    if pool.robust is None:
        return clean_rule
    r = (pool.confidence + pool.robust) / 2
    robust_rule = np.sqrt(r * (1 - r))
    rules = [rule / float(rule.sum()) for rule in (clean_rule, robust_rule) if float(rule.sum()) > 0]
    return sum(rules) / len(rules) if rules else clean_rule


def _check_budget(budget: int, pool_size: int) -> None:
    if int(budget) != budget or budget < 1 or budget > pool_size:
        raise DltestError(f"budget must be a count in [1, {pool_size}] (the pool), got {budget}")


def _floored_variance(terms: np.ndarray, anticipated: float) -> float:
    """Variance of the mean of ``terms`` (i.i.d. draws): the larger of their sample variance and
    ``anticipated``, the variance of one term that the model's confidence predicts. Rare errors
    are often missing from a small sample, whose variance then reads as (near) zero."""
    sample_var = float(np.var(terms, ddof=1)) if len(terms) > 1 else 0.0
    return max(sample_var, anticipated, 0.0) / len(terms)


def variance_df(terms: np.ndarray) -> float | None:
    """Degrees of freedom of the sample variance of ``terms``, heavy tails included: ``Var(s^2) =
    sigma^4 (2 / (n - 1) + kappa / n)`` with ``kappa`` the excess kurtosis, matched to a scaled
    chi-square's ``2 sigma^4 / df``: ``df = 2 / (2 / (n - 1) + kappa / n)`` (``n - 1`` for normal
    terms). Weighted draws of rare outcomes have heavy-tailed terms whose variance a small sample
    underestimates; the fewer degrees of freedom widen the interval for it. None: no variance."""
    n = len(terms)
    centred = np.asarray(terms, float) - float(np.mean(terms))
    m2 = float(np.mean(centred**2))
    if n < 3 or m2 <= 1e-15:
        return None
    excess = float(np.mean(centred**4)) / m2**2 - 3
    return max(1.0, 2 / (2 / (n - 1) + max(excess, 0.0) / n))



def _tuned_lambda(a: np.ndarray, b: np.ndarray, scale: float = 1.0) -> float:
    """The ``lambda`` in [0, 1] that minimises the sample variance of ``a - lambda b``
    (``cov(a, b) / (scale var(b))``); 1 when ``b`` does not vary (then lambda changes nothing)."""
    if len(a) < 2:
        return 1.0
    var_b = float(np.var(b, ddof=1))
    if var_b <= 0:
        return 1.0
    cov = float(np.cov(a, b, ddof=1)[0, 1])
    return float(np.clip(cov / (scale * var_b), 0.0, 1.0))


# --- designs ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Design:
    """A sampler with known selection probabilities and the estimator that goes with it."""

    name: str = ""
    summary: str = ""
    interval: str = ""  # the interval and why it is valid
    validity: str = "asymptotic"  # "exact": at every n; "asymptotic": a central limit theorem
    min_budget: int = 1  # fewer draws than this: the interval is not valid (its coverage fell below 94%)

    def invalid_reason(self, draws: int) -> str | None:
        """Why an interval from ``draws`` draws is not valid, or None when it is."""
        if draws >= self.min_budget:
            return None
        return (f"{self.name} needs at least {self.min_budget} draws for a valid interval (got {draws}): below that "
                "its measured coverage fell under 94% (docs/estimate.md)")

    def draw(self, pool: PoolScores, budget: int, rng: np.random.Generator) -> Sample:
        raise NotImplementedError

    def estimate(self, sample: Sample, y: np.ndarray, confidence: float = 0.95, survival: float = 1.0,
                 floor: bool = True) -> Result:
        """The estimate from ``y`` (0/1 outcome of every draw, in draw order). The variance floor
        assumes input i has outcome 1 with probability ``survival * f_i``: its confidence for
        clean accuracy (``survival = 1``); for robust accuracy, scaled by the share of the right
        inputs that survive the attack. ``floor=False``: the sample's variance alone."""
        raise NotImplementedError

    def options(self) -> dict:
        return {}

    def prediction_moments(self, pool: PoolScores, values: np.ndarray, budget: int) -> dict[str, Any]:
        """The pool sums the estimator needs of a prediction ``values`` (one per pool input) used in
        place of the confidence, under this design's draw of ``budget`` (as :func:`_sample` gives
        them for the confidence)."""
        v = np.asarray(values, float)
        return {"mean_c": float(v.mean()), "mean_c2": float((v * v).mean())}


@dataclass(frozen=True)
class SimpleRandom(Design):
    name: str = "srs"
    summary: str = "simple random sampling; k/n with the exact Clopper-Pearson interval"
    interval: str = "exact Clopper-Pearson (valid at every n; conservative)"
    validity: str = "exact"

    def draw(self, pool: PoolScores, budget: int, rng: np.random.Generator) -> Sample:
        n_pool = len(pool)
        _check_budget(budget, n_pool)
        positions = rng.choice(n_pool, size=budget, replace=False)
        return _sample(self.name, pool, positions, np.full(budget, budget / n_pool), False)

    def estimate(self, sample: Sample, y: np.ndarray, confidence: float = 0.95, survival: float = 1.0,
                 floor: bool = True) -> Result:
        y = _outcomes(y, sample)
        k, n = int(y.sum()), len(y)
        iv = clopper_pearson(k, n, confidence)
        p = k / n
        return Result(p, iv.low, iv.high, math.sqrt(p * (1 - p) / n), confidence)


@dataclass(frozen=True)
class Stratified(Design):
    name: str = "stratified"
    summary: str = "strata by confidence, Neyman allocation; the stratified mean"
    interval: str = ("per-stratum variances with the finite-pool correction, floored at the variance the confidence "
                     "anticipates; Clopper-Pearson at the effective sample size (asymptotically valid)")
    strata: int = DEFAULT_STRATA
    proportional_share: float = DEFAULT_PROPORTIONAL_SHARE

    def options(self) -> dict:
        return {"strata": self.strata, "proportional_share": self.proportional_share}

    def allocation(self, pool: PoolScores, budget: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(stratum of every pool input, N_h, n_h): equal-size strata by confidence, Neyman counts."""
        n_pool = len(pool)
        _check_budget(budget, n_pool)
        count = max(1, min(self.strata, budget // MIN_PER_STRATUM, n_pool))
        order = np.argsort(pool.confidence, kind="stable")
        stratum = np.empty(n_pool, dtype=np.int64)
        stratum[order] = np.arange(n_pool) * count // n_pool
        sizes = np.bincount(stratum, minlength=count)
        mean_conf = np.bincount(stratum, weights=pool.confidence, minlength=count) / sizes
        spread = np.sqrt(np.clip(mean_conf * (1 - mean_conf), 1e-6, None))
        # compromise allocation: a share of the budget proportional to N_h, the rest Neyman (N_h S_h)
        spread = self.proportional_share * spread.dot(sizes) / sizes.sum() + (1 - self.proportional_share) * spread
        return stratum, sizes, neyman_counts(sizes, spread, budget)

    def prediction_moments(self, pool: PoolScores, values: np.ndarray, budget: int) -> dict[str, Any]:
        stratum, sizes, _ = self.allocation(pool, budget)
        moments = super().prediction_moments(pool, values, budget)
        moments["strata_mean"] = (np.bincount(stratum, weights=np.asarray(values, float), minlength=len(sizes))
                                  / sizes).tolist()
        return moments

    def draw(self, pool: PoolScores, budget: int, rng: np.random.Generator) -> Sample:
        stratum, sizes, counts = self.allocation(pool, budget)
        chosen, probability, labels = [], [], []
        for h, (size, count) in enumerate(zip(sizes, counts)):
            members = np.flatnonzero(stratum == h)
            chosen.append(rng.choice(members, size=int(count), replace=False))
            probability.append(np.full(int(count), count / size))
            labels.append(np.full(int(count), h))
        positions = np.concatenate(chosen)
        sample = _sample(self.name, pool, positions, np.concatenate(probability), False)
        sample.strata = np.concatenate(labels)
        sample.strata_sizes = sizes
        sample.strata_mean_confidence = np.bincount(stratum, weights=pool.confidence, minlength=len(sizes)) / sizes
        return sample

    def estimate(self, sample: Sample, y: np.ndarray, confidence: float = 0.95, survival: float = 1.0,
                 floor: bool = True) -> Result:
        y = _outcomes(y, sample)
        if sample.strata is None or sample.strata_sizes is None:
            raise DltestError("a stratified estimate needs the strata of the plan")
        anticipated = survival * np.asarray(sample.strata_mean_confidence) if floor else None
        return stratified_estimate(y, sample.strata, np.asarray(sample.strata_sizes), anticipated, confidence)


def neyman_counts(sizes: np.ndarray, spread: np.ndarray, budget: int) -> np.ndarray:
    """Integer counts ``n_h ~ N_h S_h`` summing to ``budget``, each in [min(2, N_h), N_h]: a stratum
    whose share falls below its floor or above its size is fixed there and the rest reallocated;
    the last step rounds by largest remainders."""
    sizes = np.asarray(sizes, dtype=np.int64)
    floor = np.minimum(MIN_PER_STRATUM, sizes)
    counts = np.zeros(len(sizes), dtype=np.int64)
    fixed = np.zeros(len(sizes), dtype=bool)
    while not fixed.all():
        free = ~fixed
        left = budget - counts[fixed].sum()
        weights = np.where(free, sizes * spread, 0.0)
        if weights.sum() <= 0:
            weights = np.where(free, sizes.astype(float), 0.0)
        share = weights / weights.sum() * left
        low, high = free & (share < floor), free & (share > sizes)
        if low.any() or high.any():
            bound = low if low.any() else high
            counts[bound] = (floor if low.any() else sizes)[bound]
            fixed |= bound
            continue
        base = np.floor(share).astype(np.int64)
        order = [h for h in np.argsort(-(share - base), kind="stable") if free[h]]
        for h in order[: int(left - base[free].sum())]:
            base[h] += 1
        counts[free] = base[free]
        break
    while counts.sum() < budget:  # every stratum fixed with labels left: fill those with room
        room = sizes - counts
        counts[int(np.argmax(room))] += 1
    return counts


def stratified_estimate(y: np.ndarray, strata: np.ndarray, sizes: np.ndarray, anticipated: np.ndarray | None,
                        confidence: float = 0.95) -> Result:
    """``sum_h W_h ybar_h`` with the variance ``sum_h W_h^2 (1 - n_h/N_h) s_h^2 / n_h``, ``s_h^2``
    the larger of the labels' variance and ``p_h (1 - p_h)`` (``p_h = anticipated[h]``, e.g. the
    stratum's mean confidence: the variance a calibrated model anticipates)."""
    count = len(sizes)
    n_h = np.bincount(strata, minlength=count).astype(float)
    if (n_h < 1).any():
        raise DltestError("every stratum needs at least one label")
    k_h = np.bincount(strata, weights=y, minlength=count)
    weights = sizes / sizes.sum()
    mean_h = k_h / n_h
    sample_var = np.where(n_h > 1, (k_h - n_h * mean_h**2) / np.maximum(n_h - 1, 1), 0.0)
    s2 = sample_var if anticipated is None else np.maximum(sample_var, anticipated * (1 - anticipated))
    fpc = 1 - n_h / sizes
    variance = float((weights**2 * fpc * s2 / n_h).sum())
    return _normal(float((weights * mean_h).sum()), variance, confidence, n=len(y))


@dataclass(frozen=True)
class WeightedDraws(Design):
    """``n`` draws with replacement with per-draw probabilities ``q`` mixed with the uniform."""

    interval: str = ("the draws' variance, floored at the variance the confidence anticipates; Clopper-Pearson at the "
                     "effective sample size, t at the variance's kurtosis-based degrees of freedom (asymptotically "
                     "valid; weights bounded by 1/uniform_share)")
    uniform_share: float = DEFAULT_UNIFORM_SHARE

    def options(self) -> dict:
        return {"uniform_share": self.uniform_share}

    def probabilities(self, pool: PoolScores) -> np.ndarray:
        raise NotImplementedError

    def prediction_moments(self, pool: PoolScores, values: np.ndarray, budget: int) -> dict[str, Any]:
        v = np.asarray(values, float)
        scale = 1.0 / (len(v) ** 2 * self.probabilities(pool))
        moments = super().prediction_moments(pool, v, budget)
        moments.update(s0=float(scale.sum()), s1=float((v * scale).sum()), s2=float((v * v * scale).sum()))
        return moments

    def draw(self, pool: PoolScores, budget: int, rng: np.random.Generator) -> Sample:
        _check_budget(budget, len(pool))
        q = self.probabilities(pool)
        positions = rng.choice(len(pool), size=budget, replace=True, p=q)
        return _sample(self.name, pool, positions, q[positions], True, q)


@dataclass(frozen=True)
class Importance(WeightedDraws):
    name: str = "importance"
    summary: str = ("draws with probability from an uncertainty score (mixed with uniform); Hansen-Hurwitz with the "
                    "weights' known mean as a power-tuned control variate")
    min_budget: int = IMPORTANCE_MIN_BUDGET

    def probabilities(self, pool: PoolScores) -> np.ndarray:
        return mix_with_uniform(aim_at_both(pool.score, pool), self.uniform_share)

    def estimate(self, sample: Sample, y: np.ndarray, confidence: float = 0.95, survival: float = 1.0,
                 floor: bool = True) -> Result:
        y = _outcomes(y, sample)
        weight = 1.0 / (sample.pool_size * sample.probability)
        a = y * weight
        lam = _tuned_lambda(a, weight)  # 1: the error rate's Hansen-Hurwitz; 0: the accuracy's
        terms = a - lam * weight  # mean(weight) has the known expectation 1
        m = sample.moments
        # Var of a term if input i is right with probability survival * f_i
        second = survival * (1 - 2 * lam) * m["s1"] + lam**2 * m["s0"]
        anticipated = second - (survival * m["mean_c"] - lam) ** 2
        variance = _floored_variance(terms, anticipated if floor else 0.0)
        return _normal(lam + float(terms.mean()), variance, confidence, lam, n=len(y), df=variance_df(terms))


@dataclass(frozen=True)
class PredictionPowered(Design):
    name: str = "ppi"
    summary: str = "PPI++: simple random sample, the model's confidence as prediction, power-tuned lambda"
    interval: str = ("the residuals' variance with the finite-pool correction, floored at the variance the confidence "
                     "anticipates; Clopper-Pearson at the effective sample size (asymptotically valid)")

    def draw(self, pool: PoolScores, budget: int, rng: np.random.Generator) -> Sample:
        sample = SimpleRandom().draw(pool, budget, rng)
        sample.design = self.name
        return sample

    def estimate(self, sample: Sample, y: np.ndarray, confidence: float = 0.95, survival: float = 1.0,
                 floor: bool = True) -> Result:
        y = _outcomes(y, sample)
        f = sample.confidence
        n, n_pool = len(y), sample.pool_size
        lam = _tuned_lambda(y, f)
        residual = y - lam * f
        estimate = lam * sample.pool_mean_confidence + float(residual.mean())
        m = sample.moments
                # Var(y - lam f) if input i is right with probability survival * f_i
        rho = survival
        anticipated = rho * m["mean_c"] - (2 * lam * rho - lam**2) * m["mean_c2"] - ((rho - lam) * m["mean_c"]) ** 2
        variance = (1 - n / n_pool) * _floored_variance(residual, anticipated if floor else 0.0)
        return _normal(estimate, variance, confidence, lam, n=n)


@dataclass(frozen=True)
class ActiveInference(WeightedDraws):
    name: str = "active"
    summary: str = "active inference: draws with probability ~ sqrt(f(1-f)) (mixed with uniform), AIPW, power-tuned"
    min_budget: int = ACTIVE_MIN_BUDGET

    def probabilities(self, pool: PoolScores) -> np.ndarray:
        c = pool.confidence
        return mix_with_uniform(aim_at_both(np.sqrt(c * (1 - c)), pool), self.uniform_share)

    def estimate(self, sample: Sample, y: np.ndarray, confidence: float = 0.95, survival: float = 1.0,
                 floor: bool = True) -> Result:
        y = _outcomes(y, sample)
        weight = 1.0 / (sample.pool_size * sample.probability)
        a, b = y * weight, sample.confidence * weight
        lam = _tuned_lambda(a, b)
        terms = a - lam * b
        estimate = lam * sample.pool_mean_confidence + float(terms.mean())
        m = sample.moments
        # E[term^2] if input i is right with probability survival * f_i
        second = survival * m["s1"] - (2 * lam * survival - lam**2) * m["s2"]
        anticipated = second - ((survival - lam) * m["mean_c"]) ** 2
        variance = _floored_variance(terms, anticipated if floor else 0.0)
        return _normal(estimate, variance, confidence, lam, n=len(y), df=variance_df(terms))


def _sample(design: str, pool: PoolScores, positions: np.ndarray, probability: np.ndarray,
            with_replacement: bool, pool_probability: np.ndarray | None = None) -> Sample:
    """The draws and the pool moments their variance floor needs: the mean confidence and mean
    squared confidence, and for draws with replacement ``sum(c^k / q) / N^2`` for k = 0, 1, 2."""
    positions = np.asarray(positions, dtype=np.int64)
    c = pool.confidence
    moments = {"mean_c": float(c.mean()), "mean_c2": float((c * c).mean())}
    if pool_probability is not None:
        scale = 1.0 / (len(c) ** 2 * pool_probability)
        moments.update(s0=float(scale.sum()), s1=float((c * scale).sum()), s2=float((c * c * scale).sum()))
    return Sample(design, len(pool), positions, np.asarray(probability, float), c[positions], moments["mean_c"],
                  with_replacement, moments)


def _outcomes(y: np.ndarray, sample: Sample) -> np.ndarray:
    y = np.asarray(y, dtype=float)
    if y.shape != sample.positions.shape:
        raise DltestError(f"need one outcome per draw ({len(sample.positions)}), got {y.shape[0] if y.ndim else 0}")
    if not np.isin(y, (0.0, 1.0)).all():
        raise DltestError("outcomes must be 0 (wrong) or 1 (right)")
    return y


DESIGNS: dict[str, Callable[..., Design]] = {
    "srs": SimpleRandom, "stratified": Stratified, "importance": Importance, "ppi": PredictionPowered,
    "active": ActiveInference,
}


def get_design(name: str, **options) -> Design:
    """The design called ``name`` with its options (``strata``, ``uniform_share``); unknown names
    and options are one-line errors."""
    if name not in DESIGNS:
        raise DltestError(f"unknown design {name!r}; choose one of {', '.join(DESIGNS)}")
    cls = DESIGNS[name]
    allowed = set(cls().options())
    for key, value in options.items():
        if key not in allowed:
            takes = ", ".join(sorted(allowed)) or "no options"
            raise DltestError(f"design {name!r} does not take {key!r} (it takes {takes})")
        if key == "strata" and (int(value) != value or value < 1):
            raise DltestError(f"strata must be a count >= 1, got {value}")
        if key == "uniform_share" and not 0 < float(value) <= 1:
            raise DltestError(f"uniform share must be in (0, 1] (it bounds the weights by 1/share), got {value}")
    return cls(**options)
