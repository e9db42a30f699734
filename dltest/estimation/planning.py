"""Planning an estimate: one inference pass over the unlabeled pool, then a seeded draw of the
inputs to label, with every draw's selection probability kept in the plan.

The plan holds everything the estimate needs besides the labels (the drawn positions, their
probabilities, the model's confidence and prediction at each, the pool moments), so that
``dltest estimate`` needs neither the model nor the pool for clean accuracy.
"""

from __future__ import annotations

import csv
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from dltest.header import output_header
from dltest.budget import parse_budget
from dltest.data import ImageDataset
from dltest.errors import DltestError
from dltest.estimation.designs import DESIGNS, PoolScores, Sample, get_design, robust_surrogate
from dltest.inference import INFERENCE_BATCH, PoolOutputs, infer
from dltest.io import atomic_path, read_json, write_json
from dltest.selectors.uncertainty import entropy, gini, least_confidence, margin

WORST_CASE = "worst-case"  # dltest.robustness.WORST_CASE (not imported: it loads the attacks)

SCORES: dict[str, Callable[[Tensor], Tensor]] = {
    "entropy": entropy,
    "deepgini": gini,
    "lc": least_confidence,
    "margin": lambda probs: 1.0 - margin(probs),  # small margins are uncertain: 1 - margin ranks them first
}
PLAN_COMMAND = "estimate plan"
PLAN_KIND = f"dltest {PLAN_COMMAND}"
MAX_ATTACK_RESTARTS = 9  # the plan stores, per input, the runs survived as one digit
# plan-time runs per attack when attacks are given: 3 runs of PGD saved 2-35% of the robust figure's
# labels over 1 run on three of the four benchmark pools, 5 runs 1-7% more than 3 (docs/estimate.md)
DEFAULT_ATTACK_RESTARTS = 3


def check_attack_restarts(value: Any) -> int:
    """The number of plan-time runs per attack: a whole number from 1 to 9."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 1 <= value <= MAX_ATTACK_RESTARTS:
        raise DltestError(f"attack restarts must be a whole number from 1 to {MAX_ATTACK_RESTARTS}, got {value!r}")
    return int(value)


def check_score(name: str) -> str:
    if name not in SCORES:
        raise DltestError(f"unknown score {name!r}; choose one of {', '.join(SCORES)}")
    return name


@dataclass
class EstimationPlan:
    """The inputs to label for an estimate, in draw order, and what the estimator needs of the pool."""

    design: str
    options: dict[str, Any]
    budget: int
    seed: int
    score: str
    dataset: str
    split: str
    pool_size: int
    classes: list[str]
    positions: list[int]  # pool positions, in draw order (repeats: drawn again, labeled once)
    probability: list[float]  # per draw: selection probability (with replacement) or inclusion probability
    confidence: list[float]  # per draw: the model's top probability
    predicted: list[int]  # per draw: the model's class
    source_index: list[int]  # per draw: position in the file / test set the pool came from
    with_replacement: bool
    moments: dict[str, float]
    strata: list[int] | None = None
    strata_sizes: list[int] | None = None
    strata_mean_confidence: list[float] | None = None
    model: dict[str, Any] | None = None
    model_path: str | None = None
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    # plan-time attacks with the predicted labels (none: robust figures use the confidence as before)
    attacks: list[dict[str, Any]] = field(default_factory=list)  # attack, settings, seconds, survived
    # figure -> one digit per pool input: in how many of the attack_restarts runs the prediction survived
    survived: dict[str, str] = field(default_factory=dict)
    surrogate_moments: dict[str, dict[str, Any]] = field(default_factory=dict)  # figure -> pool sums of g
    attack_restarts: int = 1  # plan-time runs per attack, each with its own seed (seed, seed + 1, ...)

    @property
    def attack_names(self) -> list[str]:
        """The plan-time attacks, in order (empty: the plan has no robust surrogate)."""
        return [row["attack"] for row in self.attacks]

    def survival_share(self, figure: str) -> np.ndarray | None:
        """Per pool input, the share of the plan-time runs whose attack the prediction survived
        (0 or 1 with one run), or None when the plan has no plan-time flags for ``figure``."""
        counts = self.survived.get(figure)
        if counts is None:
            return None
        return np.frombuffer(counts.encode("ascii"), dtype=np.uint8).astype(float) - ord("0")

    def surrogate(self, figure: str) -> tuple[np.ndarray, dict[str, Any]] | None:
        """The robust surrogate ``g = f * s`` of ``figure`` at every draw (``s`` the survival share)
        and its pool sums, or None when the plan has no plan-time flags for it."""
        share = self.survival_share(figure)
        if share is None or figure not in self.surrogate_moments:
            return None
        at_draws = share[np.asarray(self.positions, dtype=np.int64)] / self.attack_restarts
        return robust_surrogate(np.asarray(self.confidence, float), at_draws), self.surrogate_moments[figure]

    @property
    def labels_needed(self) -> list[int]:
        """The distinct pool positions to label, in first-draw order."""
        return list(dict.fromkeys(self.positions))

    def sample(self) -> Sample:
        """The draws as the design's estimator reads them."""
        return Sample(
            design=self.design, pool_size=self.pool_size, positions=np.asarray(self.positions, dtype=np.int64),
            probability=np.asarray(self.probability, float), confidence=np.asarray(self.confidence, float),
            pool_mean_confidence=float(self.moments["mean_c"]), with_replacement=self.with_replacement,
            moments=dict(self.moments),
            strata=None if self.strata is None else np.asarray(self.strata, dtype=np.int64),
            strata_sizes=None if self.strata_sizes is None else np.asarray(self.strata_sizes, dtype=np.int64),
            strata_mean_confidence=None if self.strata_mean_confidence is None
            else np.asarray(self.strata_mean_confidence, float),
        )

    def to_dict(self) -> dict[str, Any]:
        return output_header(PLAN_COMMAND, self.seed, **{k: v for k, v in asdict(self).items() if k != "seed"})

    def save(self, path: str | os.PathLike) -> Path:
        return write_json(path, self.to_dict())

    def write_sheet(self, path: str | os.PathLike) -> Path:
        """The labeling sheet: one row per input to label (index = pool position; source = its
        position in the file or test set; its probability; how often it was drawn; an empty label)."""
        draws: dict[int, int] = {}
        first: dict[int, int] = {}
        for j, position in enumerate(self.positions):
            draws[position] = draws.get(position, 0) + 1
            first.setdefault(position, j)
        column = "selection_probability" if self.with_replacement else "inclusion_probability"
        with atomic_path(path) as tmp, open(tmp, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["index", "source", column, "draws", "label"])
            for position in self.labels_needed:
                j = first[position]
                writer.writerow([position, self.source_index[j], f"{self.probability[j]:.6g}", draws[position], ""])
        return Path(path)


def load_plan(path: str | os.PathLike) -> EstimationPlan:
    """A plan written by :meth:`EstimationPlan.save` (``dltest estimate plan``), checked."""
    data = read_json(path)
    if not isinstance(data, dict) or data.get("command") != PLAN_KIND:
        raise DltestError(f"{path} is not a plan written by 'dltest estimate plan'")
    fields = set(EstimationPlan.__dataclass_fields__)
    try:
        plan = EstimationPlan(**{k: v for k, v in data.items() if k in fields})
    except TypeError as exc:
        raise DltestError(f"{path} is not a complete estimate plan ({exc})") from None
    if plan.design not in DESIGNS:
        raise DltestError(f"{path}: unknown design {plan.design!r}")
    lengths = {len(plan.positions), len(plan.probability), len(plan.confidence), len(plan.predicted)}
    if len(lengths) != 1 or not plan.positions:
        raise DltestError(f"{path}: the per-draw lists differ in length or are empty; write the plan again")
    if min(plan.positions) < 0 or max(plan.positions) >= plan.pool_size:
        raise DltestError(f"{path}: a drawn position lies outside the pool of {plan.pool_size}")
    if not isinstance(plan.attack_restarts, int) or not 1 <= plan.attack_restarts <= MAX_ATTACK_RESTARTS:
        raise DltestError(f"{path}: attack_restarts must be 1 to {MAX_ATTACK_RESTARTS}, got {plan.attack_restarts!r}")
    allowed = {str(k) for k in range(plan.attack_restarts + 1)}
    if any(len(counts) != plan.pool_size or set(counts) - allowed for counts in plan.survived.values()):
        raise DltestError(f"{path}: the plan-time attack flags must be one digit 0-{plan.attack_restarts} per pool "
                          "input; write the plan again")
    return plan


def pool_scores(outputs: PoolOutputs, score: str = "entropy") -> PoolScores:
    """Confidence (top probability) and the uncertainty ``score`` of every pool input, float64."""
    probs = outputs.probs.double()
    return PoolScores(probs.max(dim=1).values.numpy(), SCORES[check_score(score)](probs).numpy())


def check_plan_request(
    design: str = "active",
    budget: int | str = 200,
    *,
    score: str = "entropy",
    attacks: Sequence[str] = (),
    eps: float | str | None = None,
    steps: int | None = None,
    alpha: float | None = None,
    attack_restarts: int | None = None,
    device: str | None = None,
    **options: Any,
) -> int:
    """Check :func:`plan`'s arguments that need no model or data, before anything is loaded;
    returns the number of plan-time attack runs (1 without attacks)."""
    from dltest.attacks import is_seeded, parse_attack_list, parse_eps
    from dltest.runtime import resolve_device

    get_design(design, **options)
    check_score(score)
    if score != "entropy" and design != "importance":
        raise DltestError(f"score applies to the importance design, not to {design!r}", param="score")
    parse_budget(budget, pool_size=2**62)  # its syntax; its size is checked against the pool
    if attacks:
        parse_attack_list(",".join(attacks))
    parse_eps(eps)
    if not attacks and (eps is not None or steps is not None or alpha is not None):
        raise DltestError("eps, steps and alpha set the plan-time attacks: give attacks too",
                          cli="--eps, --steps and --alpha set the plan-time attacks: give --attacks too")
    seeded = [name for name in attacks if is_seeded(name)]
    if attack_restarts is None:
        restarts = DEFAULT_ATTACK_RESTARTS if seeded else 1
    else:
        restarts = check_attack_restarts(attack_restarts)
    if restarts > 1 and not attacks:
        raise DltestError(f"attack restarts ({restarts}) repeat the plan-time attacks: give attacks too",
                          cli=f"--attack-restarts {restarts} repeats the plan-time attacks: give --attacks too")
    if restarts > 1 and not seeded:
        raise DltestError(f"attack restarts ({restarts}): {', '.join(attacks)} give the same outcome every run; "
                          "give 1", cli=f"--attack-restarts {restarts}: {', '.join(attacks)} give the same outcome "
                                        "every run (no random start); give 1 or leave it out")
    resolve_device(device)
    return restarts


def plan(
    model: nn.Module | None = None,
    data: ImageDataset | None = None,
    *,
    design: str = "active",
    budget: int | str = 200,
    seed: int = 0,
    score: str = "entropy",
    outputs: PoolOutputs | None = None,
    batch_size: int = INFERENCE_BATCH,
    device: str | None = None,
    progress: bool = False,
    model_name: str | None = None,
    attacks: Sequence[str] = (),
    eps: float | str | None = None,
    steps: int | None = None,
    alpha: float | None = None,
    survived: Mapping[str, Sequence[bool] | np.ndarray] | None = None,
    attack_restarts: int | None = None,
    **options: Any,
) -> EstimationPlan:
    """Draw the inputs to label for estimating ``model``'s accuracy on ``data`` (unlabeled is fine).

    One inference pass (or the given ``outputs``), then ``design``'s seeded draw of ``budget``
    inputs (a count or a share like ``4%``); ``options`` are the design's (``strata``,
    ``uniform_share``, ``proportional_share``); ``score`` ranks uncertainty for ``importance``.

    ``attacks`` (preset names; ``eps``, ``steps``, ``alpha`` override them) run over the WHOLE
    pool with the model's predicted labels: no labels, one attack pass per attack. Whether each
    prediction survived (per attack, and the worst case of two or more) makes the robust
    surrogate ``g = f * survived`` that the robust figures' estimators use, and the draw of
    ``active``, ``importance`` and ``stratified`` then aims at both figures. ``survived`` gives
    such flags already computed (attack name -> one bool per pool input) instead of ``attacks``.
    """
    import time

    started = time.perf_counter()
    restarts = check_plan_request(design, budget, score=score, attacks=attacks, eps=eps, steps=steps, alpha=alpha,
                                  attack_restarts=attack_restarts, device=device, **options)
    chosen = get_design(design, **options)
    if data is None:
        raise DltestError("plan needs the pool (data)")
    if attacks and survived is not None:
        raise DltestError("give plan-time attacks or their flags (survived), not both")
    count = parse_budget(budget, len(data))
    if outputs is None:
        if model is None:
            raise DltestError("plan needs a model or its outputs on the pool")
        outputs = infer(model, data, batch_size=batch_size, device=device, embeddings=False, progress=progress)
    if len(outputs) != len(data):
        raise DltestError(f"outputs cover {len(outputs)} inputs, the pool has {len(data)}")
    num_classes = outputs.logits.shape[1]
    classes = list(data.classes) if len(data.classes) == num_classes else [str(i) for i in range(num_classes)]
    attack_rows: list[dict[str, Any]] = []
    if attacks:
        if model is None:
            raise DltestError("plan-time attacks need the model")
        runs, attack_rows = predicted_label_survival(model, data, outputs, classes, attacks, seed=seed,
                                                     batch_size=batch_size, device=device, progress=progress,
                                                     eps=eps, steps=steps, alpha=alpha, restarts=restarts)
    elif survived is not None:
        runs = [_checked_flags(survived, len(data))]
        attack_rows = [{"attack": name, "settings": None, "seconds": None, "survived": int(flags.sum())}
                       for name, flags in runs[0].items()]
    else:
        runs = []
    scores = pool_scores(outputs, score)
    counts_by_figure = survived_runs(runs)
    shares = {figure: counts / restarts for figure, counts in counts_by_figure.items()}
    if shares:  # the weighted draws aim at clean accuracy and the hardest robust figure
        draw_figure = WORST_CASE if WORST_CASE in shares else next(iter(shares))
        scores = replace(scores, robust=robust_surrogate(scores.confidence, shares[draw_figure]))
    sample = chosen.draw(scores, count, np.random.default_rng(seed))
    predicted = outputs.predictions[torch.as_tensor(sample.positions)]
    notes = []
    if attack_rows:
        spent = sum(row["seconds"] or 0 for row in attack_rows)
        times = f", {restarts} runs each with its own seed" if restarts > 1 else ""
        notes.append(f"plan-time attacks {', '.join(r['attack'] for r in attack_rows)} ran over all {len(data)} pool "
                     f"inputs with the predicted labels{times} ({spent:.1f} s, no labels): robust figures use "
                     f"confidence x {'the share of runs survived' if restarts > 1 else 'survived'} as their surrogate")
    if sample.with_replacement:
        notes.append(f"{sample.labels_needed} distinct inputs to label for {count} draws (a repeated draw is labeled once)")
    reason = chosen.invalid_reason(count)
    if reason:
        notes.append(f"interval will not be valid: {reason}")
    return EstimationPlan(
        design=chosen.name, options=chosen.options(), budget=count, seed=seed, score=score, dataset=data.name,
        split=data.split, pool_size=len(data), classes=classes, positions=sample.positions.tolist(),
        probability=sample.probability.tolist(), confidence=sample.confidence.tolist(), predicted=predicted.tolist(),
        source_index=data.source_index[torch.as_tensor(sample.positions)].tolist(),
        with_replacement=sample.with_replacement, moments=sample.moments,
        strata=None if sample.strata is None else sample.strata.tolist(),
        strata_sizes=None if sample.strata_sizes is None else sample.strata_sizes.tolist(),
        strata_mean_confidence=None if sample.strata_mean_confidence is None
        else sample.strata_mean_confidence.tolist(),
        model={"source": model_name} if model_name else None, seconds=round(time.perf_counter() - started, 3),
        notes=notes, attacks=attack_rows,
        survived={figure: "".join(map(str, counts.tolist())) for figure, counts in counts_by_figure.items()},
        surrogate_moments={figure: surrogate_moments(chosen, scores, share, count) for figure, share in shares.items()},
        attack_restarts=restarts,
    )


def survived_runs(runs: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Per figure (each attack, and the worst case of two or more), in how many of ``runs`` (each
    attack name -> survived flags) each prediction survived; the worst case counts a run only
    when the prediction survived every attack of that run."""
    counts: dict[str, np.ndarray] = {}
    for run in runs:
        for figure, flags in with_worst_case(run).items():
            counts[figure] = counts.get(figure, 0) + flags.astype(np.int64)
    return counts


def surrogate_moments(chosen: Any, scores: PoolScores, share: np.ndarray, budget: int) -> dict[str, Any]:
    """The pool sums of ``g = f * share`` the estimators need (the design's
    :meth:`~dltest.estimation.designs.Design.prediction_moments`), and, where a share lies
    strictly between 0 and 1, the cross sums of ``g`` and ``f - g`` (``cross_c2``, ``cross_s2``)
    that the calibrated surrogate's squared sums need (0 for 0/1 shares, then left out)."""
    f = scores.confidence
    g = robust_surrogate(f, share)
    moments = chosen.prediction_moments(scores, g, budget)
    if np.all((share == 0) | (share == 1)):
        return moments
    whole, rest = chosen.prediction_moments(scores, f, budget), chosen.prediction_moments(scores, f - g, budget)
    # g (f - g) by polarisation: f^2 = g^2 + 2 g (f - g) + (f - g)^2, for any design's weighting
    moments["cross_c2"] = (whole["mean_c2"] - moments["mean_c2"] - rest["mean_c2"]) / 2
    if "s2" in moments:
        moments["cross_s2"] = (whole["s2"] - moments["s2"] - rest["s2"]) / 2
    return moments


def with_worst_case(survived: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The per-attack flags and, with two attacks or more, the worst case: survived every attack."""
    flags = {name: np.asarray(v, dtype=bool) for name, v in survived.items()}
    if len(flags) > 1:
        flags[WORST_CASE] = np.logical_and.reduce(list(flags.values()))
    return flags


def _checked_flags(survived: Mapping[str, Any], pool_size: int) -> dict[str, np.ndarray]:
    flags = {}
    for name, values in survived.items():
        array = np.asarray(values)
        if array.shape != (pool_size,) or not np.isin(array, (0, 1)).all():
            raise DltestError(f"survived[{name!r}] must be one 0/1 per pool input ({pool_size}), got shape {array.shape}")
        flags[str(name)] = array.astype(bool)
    return flags


def predicted_label_survival(
    model: nn.Module, data: ImageDataset, outputs: PoolOutputs, classes: list[str], attacks: Sequence[str], *,
    seed: int, batch_size: int, device: str | None, progress: bool, eps: float | str | None = None,
    steps: int | None = None, alpha: float | None = None, restarts: int = 1,
) -> tuple[list[dict[str, np.ndarray]], list[dict[str, Any]]]:
    """Attack every pool input with the model's predicted label (no ground truth needed), ``restarts``
    times with the seeds ``seed, seed + 1, ...``: per run and attack, whether the prediction
    survived. Where the prediction is right this IS the attack with the true label; an input whose
    prediction changes between the inference pass and the attack's own clean pass counts as not
    survived. Returns the runs' flags and one row per attack (settings, seconds of all runs, mean
    survivors per run, runs); an attack without a random start runs once (its other runs would agree)."""
    from dltest.attacks import is_seeded
    from dltest.robustness import evaluate_robustness

    pseudo = replace(data, y=outputs.predictions.clone().long(), labeled=True, classes=list(classes))
    runs: list[dict[str, np.ndarray]] = []
    rows: dict[str, dict[str, Any]] = {}
    for run in range(restarts):
        names = [name for name in attacks if run == 0 or is_seeded(name)]
        report = evaluate_robustness(model, pseudo, names, seed=seed + run, batch_size=batch_size,
                                     device=device, progress=progress, eps=eps, steps=steps, alpha=alpha)
        flags = {o.attack: np.asarray([c == "1" for c in o.robust_inputs], dtype=bool) for o in report.attacks}
        runs.append({name: flags[name] if name in flags else runs[0][name] for name in runs[0]} if run else flags)
        for o in report.attacks:
            row = rows.setdefault(o.attack, {"attack": o.attack, "settings": o.settings, "seconds": 0.0, "survived": 0})
            row["seconds"] = round(row["seconds"] + (o.seconds or 0.0), 3)
    for name, row in rows.items():
        row["survived"] = sum(int(r[name].sum()) for r in runs) / restarts if restarts > 1 else int(runs[0][name].sum())
        if restarts > 1:
            row["restarts"] = restarts if is_seeded(name) else 1
    return runs, list(rows.values())
