"""The gate's decision on an estimate: a minimum holds when the interval's lower end reaches it."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any

from dltest.header import output_header
from dltest.errors import DltestError
from dltest.io import read_json

ESTIMATE_KIND = "dltest estimate"


@dataclass(frozen=True)
class EstimateBar:
    """One minimum decided on an estimated figure."""

    name: str
    figure: str
    threshold: float
    estimate: float
    low: float
    high: float
    confidence: float
    passed: bool
    rule: str


def load_estimate(path: str | os.PathLike) -> dict[str, Any]:
    """An estimate written by ``dltest estimate --out``, its figures checked."""
    data = read_json(path)
    if not isinstance(data, dict) or data.get("command") != ESTIMATE_KIND or not isinstance(data.get("figures"), list):
        raise DltestError(f"{path} is not an estimate written by 'dltest estimate --out'")
    for item in data["figures"]:
        if not isinstance(item, dict) or not {"figure", "estimate", "low", "high", "confidence"} <= set(item):
            raise DltestError(f"{path}: a figure lacks its estimate or interval; write the estimate again")
    if data.get("valid") is False:
        raise DltestError(f"{path}: the estimate's interval is not valid ({data.get('invalid_reason')}); "
                          "plan more labels or another design")
    return data


def decide_on_estimate(estimate: dict[str, Any], policy: Any) -> list[EstimateBar]:
    """Every minimum of ``policy`` (a :class:`dltest.gate.GatePolicy`) decided on ``estimate``:
    a bar holds when the lower end of the estimate's two-sided interval is at or above it
    (a one-sided bound at (1 + confidence) / 2). Drop bars need paired evaluations: refused."""
    if policy.needs_baseline:
        raise DltestError("max drop compares two evaluations of the same inputs; with --estimate give minimums only")
    figures = {item["figure"]: item for item in estimate["figures"]}
    wanted = ([("accuracy", policy.min_accuracy)] if policy.min_accuracy is not None else []) \
        + list(policy.min_robust.items())
    if not wanted:
        raise DltestError("with --estimate give --min-accuracy or --min-robust")
    bars = []
    for figure, bar in wanted:
        if figure not in figures:
            raise DltestError(f"the estimate has no figure {figure!r} (it has {', '.join(figures)}); "
                              "estimate it with --attacks")
        item = figures[figure]
        if abs(float(item["confidence"]) - policy.confidence) > 1e-9:
            raise DltestError(f"the estimate's interval is at {100 * float(item['confidence']):g}% confidence, the gate's "
                              f"at {100 * policy.confidence:g}%: make the estimate with --confidence {policy.confidence:g}")
        low = float(item["low"])
        bars.append(EstimateBar(
            name=f"{figure} >= {bar:g}", figure=figure, threshold=bar, estimate=float(item["estimate"]), low=low,
            high=float(item["high"]), confidence=float(item["confidence"]), passed=low >= bar,
            rule=f"lower end of the estimate's two-sided {100 * float(item['confidence']):g}% interval "
                 f"({estimate.get('design')}: {estimate.get('interval')}) >= bar",
        ))
    return bars


def estimate_gate_report(bars: list[EstimateBar], estimate: dict[str, Any], source: str) -> dict[str, Any]:
    """The gate's JSON when it decided on an estimate."""
    return {
        **output_header("gate", estimate.get("seed")),
        "passed": all(bar.passed for bar in bars), "estimate": source, "design": estimate.get("design"),
        "dataset": estimate.get("dataset"), "split": estimate.get("split"), "pool_size": estimate.get("pool_size"),
        "bars": [asdict(bar) for bar in bars],
    }
