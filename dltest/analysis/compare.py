"""Statistics over robust active-learning runs (the paper's Sections 5 and 6).

- :func:`bias_robustness_correlations`: per stage, characteristic and attack, the Pearson
  correlation across acquisition functions between the bias of their selections and the robust
  accuracy of the model trained on them (the paper's Eq. 13 and Figure 3). With several seeds,
  each function's bias and robustness are averaged over the seeds first, so a stage has one
  point per function, as in the paper.
- :func:`compare_functions`: a Wilcoxon signed-rank test between two functions' robust
  accuracies, paired by (seed, stage, attack).

Stage 0 is left out of both: it is the random initial model, the same for every function, with
no selection and so no bias; its pairs would be equal by construction.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Sequence

import numpy as np
from scipy import stats

from dltest.errors import DltestError

CHARACTERISTIC_ORDER = ("entropy", "gini", "lc", "margin", "label")
MIN_FUNCTIONS = 3  # a correlation over two points is always +-1 and says nothing


@dataclass
class Correlation:
    """Pearson r across ``functions`` between a characteristic's bias and robust accuracy at one
    stage; ``r`` and ``p_value`` are None where undefined (fewer than 3 functions, or a constant)."""

    stage: int
    characteristic: str
    attack: str
    r: float | None
    p_value: float | None
    functions: list[str]


@dataclass
class Comparison:
    """A two-sided Wilcoxon signed-rank test of ``metric_a`` against ``metric_b`` over ``pairs``
    paired robust accuracies; differences are a - b."""

    metric_a: str
    metric_b: str
    pairs: int
    mean_a: float
    mean_b: float
    median_difference: float
    statistic: float
    p_value: float
    alpha: float
    significant: bool
    verdict: str
    note: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def pearson(x: Sequence[float], y: Sequence[float]) -> tuple[float | None, float | None]:
    """Pearson r and its two-sided p-value (``scipy.stats.pearsonr``); (None, None) with fewer than
    3 points or a constant sequence, where r is undefined."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.shape != y.shape:
        raise DltestError(f"pearson needs sequences of one length, got {x.size} and {y.size}")
    if x.size < MIN_FUNCTIONS or np.ptp(x) == 0 or np.ptp(y) == 0:
        return None, None
    result = stats.pearsonr(x, y)
    return float(result.statistic), float(result.pvalue)


def stage_means(records: Iterable[dict[str, Any]]) -> dict[int, dict[str, dict[str, Any]]]:
    """stage -> metric -> {"bias": {characteristic: mean}, "robust": {attack: mean}, "seeds": n}
    over the records of selection stages (stage >= 1) that carry a bias, averaged over seeds."""
    grouped: dict[tuple[int, str], list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        if r["stage"] >= 1 and r.get("bias"):
            grouped[(r["stage"], r["metric"])].append(r)
    means: dict[int, dict[str, dict[str, Any]]] = defaultdict(dict)
    for (stage, metric), rows in sorted(grouped.items()):
        means[stage][metric] = {
            "bias": mean_of_keys(r["bias"] for r in rows),
            "robust": mean_of_keys(r["robust_accuracy"] for r in rows),
            "seeds": len(rows),
        }
    return dict(means)


def bias_robustness_correlations(
    records: Iterable[dict[str, Any]], attacks: Sequence[str] | None = None
) -> list[Correlation]:
    """For every selection stage, characteristic and attack: Pearson r across the functions between
    bias and robust accuracy (means over seeds). ``attacks``: those to use (default: all found)."""
    means = stage_means(records)
    if not means:
        raise DltestError("the runs hold no selection stage with a bias: nothing to correlate")
    found = sorted({a for per_metric in means.values() for m in per_metric.values() for a in m["robust"]})
    if attacks:
        unknown = [a for a in attacks if a not in found]
        if unknown:
            raise DltestError(f"attack(s) {', '.join(unknown)} not in the runs; they hold {', '.join(found) or 'none'}")
    chosen = list(attacks) if attacks else found
    characteristics = ordered_characteristics({c for per_metric in means.values() for m in per_metric.values() for c in m["bias"]})
    out = []
    for stage, per_metric in sorted(means.items()):
        for attack in chosen:
            for c in characteristics:
                names = sorted(m for m, v in per_metric.items() if c in v["bias"] and attack in v["robust"])
                if not names:
                    continue
                r, p = pearson([per_metric[m]["bias"][c] for m in names], [per_metric[m]["robust"][attack] for m in names])
                out.append(Correlation(stage, c, attack, r, p, names))
    return out


def paired_robustness(
    records: Iterable[dict[str, Any]], metric_a: str, metric_b: str, attacks: Sequence[str] | None = None
) -> tuple[list[tuple[int, int, str]], list[float], list[float]]:
    """Robust accuracies of two functions paired by (seed, stage >= 1, attack), in key order."""
    values: dict[str, dict[tuple[int, int, str], float]] = {metric_a: {}, metric_b: {}}
    for r in records:
        if r["metric"] in values and r["stage"] >= 1:
            for attack, acc in r["robust_accuracy"].items():
                if attacks is None or attack in attacks:
                    values[r["metric"]][(r["seed"], r["stage"], attack)] = float(acc)
    for metric in (metric_a, metric_b):
        if not values[metric]:
            raise DltestError(f"the runs hold no selection-stage robust accuracy for metric {metric!r}"
                              + (f" under attack(s) {', '.join(attacks)}" if attacks else ""))
    keys = sorted(values[metric_a].keys() & values[metric_b].keys())
    if not keys:
        raise DltestError(f"metrics {metric_a!r} and {metric_b!r} share no (seed, stage, attack) to pair")
    return keys, [values[metric_a][k] for k in keys], [values[metric_b][k] for k in keys]


def wilcoxon_test(a: Sequence[float], b: Sequence[float], alpha: float = 0.05,
                  names: tuple[str, str] = ("a", "b")) -> Comparison:
    """Two-sided Wilcoxon signed-rank test (``scipy.stats.wilcoxon``, zero differences dropped) of
    paired samples, with a verdict at level ``alpha``: which one is higher, or no significant
    difference."""
    if not 0 < alpha < 1:
        raise DltestError(f"alpha must lie in (0, 1), got {alpha}")
    a_arr, b_arr = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a_arr.shape != b_arr.shape or a_arr.ndim != 1 or a_arr.size == 0:
        raise DltestError(f"the Wilcoxon test needs two non-empty samples of one length, got {a_arr.size} and {b_arr.size}")
    diff = a_arr - b_arr
    nonzero = int(np.count_nonzero(diff))
    note = None
    if nonzero == 0:
        statistic, p_value = 0.0, 1.0
        note = "every pair is equal"
    else:
        result = stats.wilcoxon(a_arr, b_arr)
        statistic, p_value = float(result.statistic), float(result.pvalue)
        if 2.0 / 2**nonzero >= alpha:  # the exact test's smallest two-sided p-value
            note = f"{nonzero} non-zero differences cannot reach p < {alpha:g} in a two-sided test"
    median = float(np.median(diff))
    significant = p_value < alpha
    if significant:
        higher = median > 0 if median != 0 else float(diff.mean()) > 0
        first, second = names if higher else names[::-1]
        verdict = f"{first} is more robust than {second} (p = {p_value:.3g} < {alpha:g})"
    else:
        verdict = f"no significant difference between {names[0]} and {names[1]} (p = {p_value:.3g} >= {alpha:g})"
    return Comparison(names[0], names[1], int(diff.size), float(a_arr.mean()), float(b_arr.mean()), median,
                      statistic, p_value, alpha, significant, verdict, note)


def compare_functions(
    records: Sequence[dict[str, Any]], metrics: Sequence[str], attacks: Sequence[str] | None = None,
    alpha: float = 0.05,
) -> list[Comparison]:
    """The first of ``metrics`` against each of the others: one Wilcoxon test per pair, over the
    robust accuracies paired by (seed, stage, attack)."""
    if len(metrics) < 2:
        raise DltestError("name at least two metrics to compare, e.g. dre,random")
    if len(set(metrics)) != len(metrics):
        raise DltestError(f"metrics {', '.join(metrics)} name a metric twice")
    found = sorted({r["metric"] for r in records})
    unknown = [m for m in metrics if m not in found]
    if unknown:
        raise DltestError(f"metric(s) {', '.join(unknown)} not in the runs; they hold {', '.join(found)}")
    first = metrics[0]
    out = []
    for other in metrics[1:]:
        _, a, b = paired_robustness(records, first, other, attacks)
        out.append(wilcoxon_test(a, b, alpha, (first, other)))
    return out


def mean_of_keys(dicts: Iterable[dict[str, float]]) -> dict[str, float]:
    """Per key, the mean over the dicts holding it."""
    gathered: dict[str, list[float]] = defaultdict(list)
    for d in dicts:
        for k, v in d.items():
            if v is not None and math.isfinite(v):
                gathered[k].append(float(v))
    return {k: statistics.fmean(v) for k, v in gathered.items()}


def ordered_characteristics(names: set[str]) -> list[str]:
    """The characteristics in the paper's order (entropy, gini, lc, margin, label), then any others."""
    return [c for c in CHARACTERISTIC_ORDER if c in names] + sorted(names - set(CHARACTERISTIC_ORDER))
