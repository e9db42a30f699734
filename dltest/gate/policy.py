"""The gate's policy: the bars (minimums, maximum drops) and the checks on their names and values."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

from dltest.analysis.intervals import check_confidence
from dltest.attacks import ATTACKS
from dltest.errors import DltestError
from dltest.robustness import WORST_CASE

ACCURACY = "accuracy"
ALL_FIGURES = "*"  # key of a max-drop that applies to every figure


def figure_names() -> list[str]:
    return [ACCURACY, *ATTACKS, WORST_CASE]


def check_figure(name: str) -> str:
    if name not in figure_names():
        raise DltestError(f"unknown figure {name!r}; choose one of {', '.join(figure_names())}")
    return name


def check_share(value: Any, what: str, *, upper_open: bool = False) -> float:
    """A threshold in [0, 1] (or [0, 1) for tolerances)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise DltestError(f"{what} must be a number in [0, 1], got {value!r}") from None
    if math.isnan(number) or number < 0 or number > 1 or (upper_open and number == 1):
        allowed = "[0, 1)" if upper_open else "[0, 1]"
        raise DltestError(f"{what} must be in {allowed} (a share: 0.98 means 98%), got {value}")
    return number


def parse_bars(text: str | float | Mapping[str, Any] | None, what: str, bare: str,
               *, upper_open: bool = False) -> dict[str, float]:
    """``"pgd=0.8,square=0.85"`` (or a mapping) -> ``{"pgd": 0.8, "square": 0.85}``; a bare
    ``"0.8"`` -> ``{bare: 0.8}``. Names and values are checked."""
    if text is None or (isinstance(text, Mapping) and not text):
        return {}
    if isinstance(text, Mapping):
        items = [(str(k), v) for k, v in text.items()]
    elif isinstance(text, (int, float)):
        items = [(bare, text)]
    else:
        items = []
        for part in (p.strip() for p in str(text).split(",") if p.strip()):
            name, sep, value = part.partition("=")
            items.append((name.strip().lower(), value.strip()) if sep else (bare, name.strip()))
    bars: dict[str, float] = {}
    for name, value in items:
        if name != ALL_FIGURES:
            check_figure(name)
        if name in bars:
            raise DltestError(f"{what} names {name!r} twice")
        bars[name] = check_share(value, f"{what} for {name}" if name not in (bare, ALL_FIGURES) else what,
                                 upper_open=upper_open)
    if not bars:
        raise DltestError(f"{what} is empty; write e.g. pgd=0.8,square=0.85")
    return bars


@dataclass
class GatePolicy:
    """The bars of a gate. Shares are in [0, 1]; ``confidence`` is that of every decision."""

    min_accuracy: float | None = None
    min_robust: dict[str, float] = field(default_factory=dict)  # attack or worst-case -> bar
    max_drop: dict[str, float] = field(default_factory=dict)  # figure or "*" -> absolute drop
    max_relative_drop: dict[str, float] = field(default_factory=dict)  # figure or "*" -> share
    confidence: float = 0.95

    def __post_init__(self) -> None:
        if self.min_accuracy is not None:
            self.min_accuracy = check_share(self.min_accuracy, "min accuracy")
        self.min_robust = parse_bars(self.min_robust, "min robust", WORST_CASE)
        for name in self.min_robust:
            if name == ACCURACY or name == ALL_FIGURES:
                raise DltestError(f"min robust takes attack names or {WORST_CASE}, got {name!r}")
        self.max_drop = parse_bars(self.max_drop, "max drop", ALL_FIGURES, upper_open=True)
        self.max_relative_drop = parse_bars(self.max_relative_drop, "max relative drop", ALL_FIGURES,
                                            upper_open=True)
        self.confidence = check_confidence(self.confidence)

    @property
    def needs_baseline(self) -> bool:
        return bool(self.max_drop or self.max_relative_drop)

    @property
    def attacks(self) -> list[str]:
        """The attacks the bars name (worst-case names none by itself)."""
        named = list(self.min_robust) + list(self.max_drop) + list(self.max_relative_drop)
        return [a for a in dict.fromkeys(named) if a in ATTACKS]

    def is_empty(self) -> bool:
        return self.min_accuracy is None and not self.min_robust and not self.needs_baseline

    def check(self, has_baseline: bool) -> None:
        """Bars to decide, and the baseline report the drop bars compare with: checked before any
        loading or evaluation (by :func:`~dltest.gate.decision.run_gate`, and by ``dltest gate``
        before it loads anything)."""
        if self.is_empty():
            why = "the gate has no bars: give "
            raise DltestError(why + "min_accuracy, min_robust, or a baseline with max_drop",
                              cli=why + "--min-accuracy, --min-robust, or --baseline with --max-drop "
                              "(or a [tool.dltest.gate] table in pyproject.toml)")
        if self.needs_baseline and not has_baseline:
            bar = "max_drop" if self.max_drop else "max_relative_drop"
            raise DltestError(f"{bar} needs a baseline report: pass baseline=REPORT.json",
                              cli=f"--{bar.replace('_', '-')} needs a baseline report: pass --baseline REPORT.json")
