"""From a plan and its labels to the pool's accuracy (and robust accuracy) with intervals.

Clean accuracy needs only the plan and the labels (the plan holds the model's prediction at
every drawn input). Robust accuracy attacks the labeled inputs, and only them, with the
model: each attack gives a robust/not-robust outcome per labeled input, estimated with the same
design as the clean one (the sampling probabilities do not depend on the outcome). A plan made
with plan-time attacks gives the robust figures a label-free surrogate (confidence x whether the
prediction survived the attack with its predicted label), which the estimators use as their
prediction once calibrated on the labels (:func:`calibrated_surrogate`).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from dltest.header import output_header
from dltest.analysis.intervals import check_confidence, clopper_pearson
from dltest.data import ImageDataset
from dltest.errors import DltestError
from dltest.estimation.designs import Result, get_design
from dltest.estimation.labels import labels_for
from dltest.estimation.planning import EstimationPlan

ACCURACY = "accuracy"


@dataclass(frozen=True)
class FigureEstimate:
    """One figure (clean accuracy, an attack's robust accuracy, worst-case) estimated on the pool."""

    figure: str
    estimate: float
    low: float
    high: float
    confidence: float
    standard_error: float
    effective_sample_size: float | None  # p (1 - p) / variance: the SRS size this design's variance equals
    srs_labels: int | None  # labels a simple random sample needs for an exact interval this wide
    labeled: int  # distinct inputs labeled
    draws: int
    lam: float | None = None
    surrogate: str = "confidence"  # the prediction its estimator used: "confidence" or "confidence x survived <attack>"
    # with a plan-time surrogate: its calibration shares a, b and the right draws each rests on
    surrogate_a: float | None = None
    surrogate_b: float | None = None
    surrogate_a_draws: float | None = None
    surrogate_b_draws: float | None = None

    @property
    def width(self) -> float:
        return self.high - self.low


@dataclass
class EstimateResult:
    """The estimates of one plan: clean accuracy first, then one per attack (and worst-case)."""

    design: str
    interval: str
    validity: str  # "exact" (at every n) or "asymptotic" (a central limit theorem, coverage measured)
    valid: bool  # False: too few draws for this design's interval (see invalid_reason); the gate refuses it
    invalid_reason: str | None
    dataset: str
    split: str
    pool_size: int
    seed: int
    figures: list[FigureEstimate]
    attacks: list[dict[str, Any]] = field(default_factory=list)
    model: dict[str, Any] | None = None
    seconds: float = 0.0

    def figure(self, name: str) -> FigureEstimate:
        for item in self.figures:
            if item.figure == name:
                return item
        raise DltestError(f"figure {name!r} was not estimated; estimated: {', '.join(f.figure for f in self.figures)}")

    def to_dict(self) -> dict[str, Any]:
        body = asdict(self)
        body.pop("seed")
        return output_header("estimate", self.seed, **body)


def srs_labels_for_width(width: float, share: float, confidence: float = 0.95) -> int | None:
    """The fewest labels whose exact (Clopper-Pearson) interval around ``share`` is at most ``width``
    wide (what a simple random sample needs for the same width); None for a zero width."""
    if not width > 0:
        return None
    share = min(max(share, 0.0), 1.0)

    def fits(n: int) -> bool:
        iv = clopper_pearson(round(share * n), n, confidence)
        return iv.high - iv.low <= width

    low, high = 1, 2
    while not fits(high):
        low, high = high, high * 2
        if high > 2**40:
            return None
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (low, middle) if fits(middle) else (middle, high)
    return 1 if fits(1) else high


def survival_share(y: np.ndarray, clean: np.ndarray, among: np.ndarray | None = None, upper: bool = False) -> float:
    """Of the draws the model gets right (and in ``among``, when given), the share still right
    under attack, at least ``1 / (2 m)`` and with ``upper`` at most ``1 - 1 / (2 m)`` (``m`` those
    draws, or all draws when there are none): the variance floor of a robust figure scales the
    confidence by it. A share never seen in the sample is thus kept small but not zero."""
    right = np.asarray(clean, bool) if among is None else np.asarray(clean, bool) & np.asarray(among, bool)
    count = int(right.sum())
    edge = 0.5 / (len(y) if among is None or not count else count)
    share = float(np.sum(np.asarray(y)[right])) / count if count else 0.0
    return float(np.clip(share, edge, 1 - edge if upper else 1.0))


MIN_OUTCOMES = 5  # a robust figure's sample with fewer of either outcome falls back on the floor


def estimate_outcome(design: Any, sample: Any, y: np.ndarray, clean: np.ndarray, is_clean: bool,
                     confidence: float, surrogate: tuple[np.ndarray, Mapping[str, Any]] | None = None) -> Any:
    """Clean accuracy always keeps the confidence floor (a calibrated model predicts its errors).
    A robust figure uses its sample's variance alone once the sample holds at least
    ``MIN_OUTCOMES`` of both outcomes: the confidence says little about robustness, and a floor
    drawn from it overstates the variance where non-robust inputs gather among uncertain ones.

    ``surrogate`` (robust figures only): the plan-time ``g = f * survived`` at every draw and its
    pool sums (:meth:`EstimationPlan.surrogate`). The estimator then predicts with the calibrated
    surrogate of :func:`calibrated_surrogate` instead of the scaled confidence."""
    if is_clean:
        return design.estimate(sample, y, confidence)
    floor = min(float(y.sum()), float(len(y) - y.sum())) < MIN_OUTCOMES
    if surrogate is not None:
        return design.estimate(calibrated_surrogate(sample, y, clean, *surrogate), y, confidence, floor=floor)
    return design.estimate(sample, y, confidence, survival_share(y, clean), floor=floor)


@dataclass(frozen=True)
class SurrogateCalibration:
    """The calibrated surrogate's two shares, tuned on the labels: ``a`` of the right draws whose
    prediction survived at plan time, ``b`` of those it did not, the share robust at estimate time;
    ``a_draws`` and ``b_draws`` the right draws each rests on (weighted by the survival share
    ``s`` and ``1 - s`` when the plan ran several restarts)."""

    a: float
    b: float
    a_draws: float
    b_draws: float


def calibrate_surrogate(y: np.ndarray, clean: np.ndarray, g: np.ndarray, f: np.ndarray) -> SurrogateCalibration:
    """``a`` and ``b`` of :func:`calibrated_surrogate` from the draws' outcomes ``y``, right
    predictions ``clean``, surrogate ``g = f * s`` and confidence ``f``: among the right draws,
    ``a = sum(y s) / sum(s)`` and ``b = sum(y (1 - s)) / sum(1 - s)`` (with 0/1 shares: the plain
    shares of the survivors and of the broken), each kept within ``[1/(2m), 1 - 1/(2m)]`` of its
    weight ``m`` (at least 1; all draws' count when it is 0)."""
    share = np.clip(np.asarray(g, float) / np.asarray(f, float), 0.0, 1.0)  # f > 0: a top softmax probability
    right = np.asarray(clean, bool)
    y = np.asarray(y, float)

    def weighted(weights: np.ndarray) -> tuple[float, float]:
        mass = float(weights[right].sum())
        edge = 0.5 / (max(mass, 1.0) if mass > 0 else len(y))
        value = float((y * weights)[right].sum()) / mass if mass > 0 else 0.0
        return float(np.clip(value, edge, 1 - edge)), mass

    (a, a_draws), (b, b_draws) = weighted(share), weighted(1 - share)
    return SurrogateCalibration(a, b, a_draws, b_draws)


def calibrated_surrogate(sample: Any, y: np.ndarray, clean: np.ndarray, g: np.ndarray,
                         g_moments: Mapping[str, Any]) -> Any:
    """``sample`` predicting ``h = a g + b (f - g)`` instead of the confidence ``f``: ``a`` is the
    share of the right draws whose prediction survived the plan-time attack that are robust
    (survival at estimate time), ``b`` that share where the plan-time attack broke the
    prediction (:func:`calibrate_surrogate`; with several plan-time runs, ``g = f * s`` and the
    shares weigh each draw by ``s`` and ``1 - s``). ``b`` is not 0: a random-start attack run
    again (other batches, other random starts) spares a share of the borderline inputs that one
    run broke (15% on the MNIST holdout, 32% on Fashion-MNIST's with the robust models,
    docs/estimate.md); ``a`` is below 1 for the same reason.

    ``h`` is linear in ``g`` and ``k = f - g``, so its pool sums follow from those of ``g`` and
    ``f``: ``mean(h) = a mean(g) + b (mean(f) - mean(g))``, and with ``mean(k^2) = mean(f^2) -
    mean(g^2) - 2 mean(g k)``, ``mean(h^2) = a^2 mean(g^2) + 2 a b mean(g k) + b^2 mean(k^2)``
    (``g k = 0`` with 0/1 shares; the plan stores it as ``cross_*`` otherwise), likewise the
    weighted sums and the strata's means. ``a`` and ``b`` are tuned on the labels, as ``lambda`` is."""
    g = np.asarray(g, float)
    fit = calibrate_surrogate(y, clean, g, sample.confidence)
    a, b = fit.a, fit.b
    f_moments = sample.moments

    def mix(key: str, cross: str | None = None) -> float:
        if cross is None:
            return a * g_moments[key] + b * (f_moments[key] - g_moments[key])
        gk = float(g_moments.get(cross, 0.0))
        return a * a * g_moments[key] + 2 * a * b * gk + b * b * (f_moments[key] - g_moments[key] - 2 * gk)

    moments: dict[str, Any] = {"mean_c": mix("mean_c"), "mean_c2": mix("mean_c2", "cross_c2")}
    if "s1" in g_moments:
        moments.update(s1=mix("s1"), s2=mix("s2", "cross_s2"))
    if "strata_mean" in g_moments and sample.strata_mean_confidence is not None:
        strata_g = np.asarray(g_moments["strata_mean"], float)
        moments["strata_mean"] = a * strata_g + b * (np.asarray(sample.strata_mean_confidence) - strata_g)
    return sample.with_prediction(a * g + b * (sample.confidence - g), moments)


def check_plan_attacks(plan: EstimationPlan, attacks: Sequence[str], eps: Any = None, steps: int | None = None,
                       alpha: float | None = None) -> list[Any]:
    """The attacks to run on the labeled inputs: as named, for a plan without plan-time attacks;
    for a plan with them, a subset of them, run with the plan's settings (the surrogate must come
    from the same attack as the outcomes). Other attacks, or ``eps``/``steps``/``alpha`` with
    such a plan, are one-line errors."""
    from dltest.attacks import AttackSpec

    if not plan.attacks or not attacks:
        return list(attacks)
    planned = plan.attack_names
    extra = [name for name in attacks if name not in planned]
    if extra:
        raise DltestError(f"--attacks {','.join(attacks)}: the plan's surrogate comes from the plan-time attacks "
                          f"{','.join(planned)}; name those or a subset of them ({', '.join(extra)} is not one), "
                          "or plan again with --attacks")
    if eps is not None or steps is not None or alpha is not None:
        raise DltestError("the labeled inputs are attacked with the plan-time settings "
                          f"({'; '.join(_label(row) for row in plan.attacks)}): drop --eps, --steps and --alpha")
    settings = {row["attack"]: row.get("settings") for row in plan.attacks}
    return [AttackSpec(**settings[name]) if settings[name] else name for name in attacks]


def _label(row: Mapping[str, Any]) -> str:
    from dltest.attacks import AttackSpec

    return AttackSpec(**row["settings"]).label if row.get("settings") else row["attack"]


def figure_surrogate(plan: EstimationPlan, figure: str, attacks: Sequence[str]):
    """The plan's surrogate for a robust ``figure`` (None: the confidence, as without plan-time
    attacks). The worst case of a proper subset of the plan-time attacks has none."""
    from dltest.robustness import WORST_CASE

    if figure == WORST_CASE and set(attacks) != set(plan.attack_names):
        return None
    return plan.surrogate(figure)


def surrogate_label(plan: EstimationPlan, figure: str) -> str:
    """How the plan's surrogate of ``figure`` was made, for the output."""
    runs = next((row.get("restarts", 1) for row in plan.attacks if row.get("attack") == figure), plan.attack_restarts)
    if plan.attack_restarts > 1 and runs > 1:
        return f"confidence x share of {plan.attack_restarts} runs survived {figure}"
    return f"confidence x survived {figure}"


def figure_estimate(name: str, result: Result, labeled: int, draws: int, surrogate: str = "confidence",
                    calibration: SurrogateCalibration | None = None) -> FigureEstimate:
    p = min(max(result.estimate, 0.5 / draws), 1 - 0.5 / draws)
    fit = {} if calibration is None else {
        "surrogate_a": round(calibration.a, 6), "surrogate_b": round(calibration.b, 6),
        "surrogate_a_draws": round(calibration.a_draws, 4), "surrogate_b_draws": round(calibration.b_draws, 4)}
    effective = p * (1 - p) / result.standard_error**2 if result.standard_error > 0 else None
    return FigureEstimate(
        figure=name, estimate=result.estimate, low=result.low, high=result.high, confidence=result.confidence,
        standard_error=result.standard_error, effective_sample_size=None if effective is None else round(effective, 1),
        srs_labels=srs_labels_for_width(result.width, result.estimate, result.confidence), labeled=labeled,
        draws=draws, lam=result.lam, surrogate=surrogate, **fit,
    )


def estimate(
    plan: EstimationPlan,
    labels: Mapping[int, Any] | Sequence[int] | np.ndarray,
    *,
    model: nn.Module | None = None,
    data: ImageDataset | None = None,
    attacks: Sequence[str] = (),
    confidence: float = 0.95,
    batch_size: int = 256,
    device: str | None = None,
    progress: bool = False,
    eps: float | str | None = None,
    steps: int | None = None,
    alpha: float | None = None,
    labels_name: str = "labels",
) -> EstimateResult:
    """The pool's accuracy from ``plan`` and the ``labels`` of its inputs, with a two-sided interval
    at ``confidence``; with ``attacks`` (names of presets) also robust accuracy, attacking only
    the labeled inputs of ``data`` (the plan's pool) with ``model``."""
    started = time.perf_counter()
    confidence = check_confidence(confidence)
    design = get_design(plan.design, **plan.options)
    to_run = check_plan_attacks(plan, attacks, eps, steps, alpha)
    needed = plan.labels_needed
    given = labels_for(plan, labels, labels_name)
    by_position = dict(zip(needed, given.tolist()))
    draw_labels = np.asarray([by_position[p] for p in plan.positions])
    outcomes = {ACCURACY: (draw_labels == np.asarray(plan.predicted)).astype(float)}
    attack_rows: list[dict[str, Any]] = []
    if attacks:
        robust, attack_rows = _robust_outcomes(plan, needed, given, model, data, to_run, batch_size, device,
                                               progress, eps, steps, alpha)
        for name, flags in robust.items():
            per_position = dict(zip(needed, flags.tolist()))
            outcomes[name] = np.asarray([per_position[p] for p in plan.positions], dtype=float)
    sample = plan.sample()
    clean = outcomes[ACCURACY]
    figures = []
    for name, y in outcomes.items():
        surrogate = None if name == ACCURACY else figure_surrogate(plan, name, attacks)
        result = estimate_outcome(design, sample, y, clean, name == ACCURACY, confidence, surrogate)
        fit = None if surrogate is None else calibrate_surrogate(y, clean, surrogate[0], sample.confidence)
        figures.append(figure_estimate(name, result, len(needed), len(plan.positions),
                                       surrogate_label(plan, name) if surrogate else "confidence", fit))
    reason = design.invalid_reason(len(plan.positions))
    return EstimateResult(
        design=plan.design, interval=design.interval, validity=design.validity, valid=reason is None,
        invalid_reason=reason,
        dataset=plan.dataset, split=plan.split, pool_size=plan.pool_size, seed=plan.seed, figures=figures,
        attacks=attack_rows, model=plan.model, seconds=round(time.perf_counter() - started, 3),
    )


def _robust_outcomes(
    plan: EstimationPlan, needed: list[int], labels: np.ndarray, model: nn.Module | None, data: ImageDataset | None,
    attacks: Sequence[Any], batch_size: int, device: str | None, progress: bool, eps, steps, alpha,
) -> tuple[dict[str, np.ndarray], list[dict[str, Any]]]:
    """Robust (1) or not (0) per labeled input under each attack, and worst-case with 2+ attacks;
    checks that ``model`` and ``data`` are the plan's (same pool size, same predictions)."""
    from dltest.robustness import WORST_CASE, evaluate_robustness

    if model is None or data is None:
        raise DltestError("robust accuracy attacks the labeled inputs: give the plan's model and pool")
    if len(data) != plan.pool_size:
        raise DltestError(f"the pool has {len(data)} inputs, the plan's had {plan.pool_size}: give the plan's pool")
    subset = data.subset(needed)
    subset.y = torch.as_tensor(labels, dtype=torch.long)
    subset.labeled = True
    subset.classes = list(plan.classes)
    report = evaluate_robustness(model, subset, list(attacks), seed=plan.seed, batch_size=batch_size, device=device,
                                 progress=progress, eps=eps, steps=steps, alpha=alpha)
    first = {p: j for j, p in reversed(list(enumerate(plan.positions)))}
    expected = np.asarray([plan.predicted[first[p]] for p in needed]) == labels
    clean = np.asarray([c == "1" for c in report.clean_inputs])
    if (clean != expected).any():
        where = needed[int(np.flatnonzero(clean != expected)[0])]
        raise DltestError(f"the model predicts otherwise than the plan's model at index {where}: give the model "
                          "and pool the plan was made with")
    flags = {o.attack: np.asarray([c == "1" for c in o.robust_inputs]) for o in report.attacks}
    if report.worst_case is not None:
        flags[WORST_CASE] = np.asarray([c == "1" for c in report.worst_case.robust_inputs])
    rows = [{"attack": o.attack, "settings": o.settings, "seconds": o.seconds, "attacked_inputs": o.n}
            for o in report.attacks]
    return flags, rows


def effective_gain(figure: FigureEstimate) -> float | None:
    """Labels used over the labels an SRS would need for the same width (< 1: the design saved labels)."""
    if figure.srs_labels is None or figure.srs_labels == 0:
        return None
    return figure.labeled / figure.srs_labels

