"""The gate's decision: a model evaluated against a :class:`GatePolicy`, each bar decided with
exact statistics (on its own, or paired with a baseline report) -> :class:`GateResult`."""

from __future__ import annotations

import os
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Sequence

from torch import nn

from dltest.header import output_header
from dltest.analysis.intervals import clopper_pearson, mcnemar_exact
from dltest.attacks import AttackSpec, check_attack_name
from dltest.data import ImageDataset
from dltest.errors import DltestError
from dltest.gate.outputs import _pct, junit_xml, markdown_table
from dltest.gate.policy import ACCURACY, ALL_FIGURES, GatePolicy
from dltest.io import read_json
from dltest.robustness import (
    WORST_CASE, RobustnessReport, RobustnessWarning, attack_specs, evaluate_robustness, flags_from_string,
)


@dataclass
class BarResult:
    """One bar, the figure it looked at, and how it was decided."""

    name: str  # e.g. "pgd >= 0.8"
    figure: str
    kind: str  # "min", "max-drop" or "max-relative-drop"
    threshold: float
    estimate: float  # the figure measured now
    correct: int
    n: int
    interval: tuple[float, float]  # two-sided exact interval at the gate's confidence
    rule: str
    passed: bool
    bound: float | None = None  # one-sided lower bound (minimum bars)
    baseline: float | None = None  # the baseline's figure (drop bars)
    drop: float | None = None  # baseline - now, on the same inputs
    tolerance: float | None = None  # the absolute drop allowed
    lost: int | None = None  # inputs right in the baseline, wrong now
    gained: int | None = None  # the reverse
    p_value: float | None = None

    @property
    def decided_on(self) -> str:
        """The figure the decision rests on, short (for a table cell)."""
        if self.kind == "min":
            return f"lower bound {_pct(self.bound)}"
        return f"drop {100 * self.drop:+.2f} pts vs baseline {_pct(self.baseline)}, p={self.p_value:.3g}"

    def describe(self) -> str:
        """One line with the figures behind the decision."""
        low, high = self.interval
        now = f"{self.figure} {_pct(self.estimate)} ({self.correct}/{self.n}, CI {_pct(low)}-{_pct(high)})"
        if self.kind == "min":
            return f"{now}, lower bound {_pct(self.bound)} vs bar {_pct(self.threshold)}"
        return (f"{now}, baseline {_pct(self.baseline)}: drop {100 * self.drop:+.2f} points (lost {self.lost}, "
                f"gained {self.gained}) vs allowed {100 * self.tolerance:.2f}, McNemar exact p={self.p_value:.3g}")


@dataclass
class GateResult:
    """The bars decided on one evaluation."""

    passed: bool
    bars: list[BarResult]
    report: RobustnessReport
    confidence: float
    model: str | None = None
    baseline: str | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def failures(self) -> list[BarResult]:
        return [bar for bar in self.bars if not bar.passed]

    def to_dict(self) -> dict[str, Any]:
        return {
            **output_header("gate", self.report.seed),
            "passed": self.passed, "model": self.model, "dataset": self.report.dataset,
            "split": self.report.split, "n": self.report.n, "confidence": self.confidence,
            "baseline": self.baseline, "bars": [asdict(bar) for bar in self.bars],
            "warnings": self.warnings, "evaluation": self.report.to_dict(),
        }

    def markdown(self) -> str:
        return markdown_table(self)

    def junit_xml(self) -> str:
        return junit_xml(self)

    def summary(self) -> str:
        """A readable multi-line account of every bar (used in assertion messages)."""
        lines = [f"dltest gate: {'passed' if self.passed else 'FAILED'} on {self.report.n} inputs of "
                 f"{self.report.dataset}/{self.report.split} ({100 * self.confidence:g}% confidence)"]
        for bar in self.bars:
            lines.append(f"  {'ok  ' if bar.passed else 'FAIL'} {bar.name}: {bar.describe()} [{bar.rule}]")
        lines.extend(f"  warning: {w}" for w in self.warnings)
        return "\n".join(lines)


# --- deciding the bars -------------------------------------------------------------------------


def decide_bars(report: RobustnessReport, policy: GatePolicy, baseline: RobustnessReport | None = None) -> list[BarResult]:
    """Every bar of ``policy`` decided on ``report`` (and ``baseline``, evaluated on the same inputs)."""
    bars: list[BarResult] = []
    if policy.min_accuracy is not None:
        bars.append(_minimum(ACCURACY, report.clean_correct, report.n, policy.min_accuracy, policy.confidence))
    for name, bar in policy.min_robust.items():
        outcome = _outcome(report, name)
        bars.append(_minimum(name, outcome.robust_correct, report.n, bar, policy.confidence))
    if policy.needs_baseline:
        if baseline is None:
            raise DltestError("max drop needs a baseline report: pass --baseline REPORT.json")
        check_same_inputs(report, baseline)
        for kind, tolerances in (("max-drop", policy.max_drop), ("max-relative-drop", policy.max_relative_drop)):
            for figure, tolerance in _drop_figures(tolerances, report, baseline):
                bars.append(_drop(figure, kind, tolerance, report, baseline, policy.confidence))
    return bars


def _minimum(figure: str, correct: int, n: int, bar: float, confidence: float) -> BarResult:
    lower = clopper_pearson(correct, n, confidence, "lower").low
    both = clopper_pearson(correct, n, confidence)
    return BarResult(
        name=f"{figure} >= {bar:g}", figure=figure, kind="min", threshold=bar, estimate=correct / n, correct=correct,
        n=n, interval=(both.low, both.high), bound=lower, passed=lower >= bar,
        rule=f"Clopper-Pearson one-sided {100 * confidence:g}% lower bound >= bar",
    )


def _drop(figure: str, kind: str, tolerance: float, report: RobustnessReport, baseline: RobustnessReport,
          confidence: float) -> BarResult:
    now, before = _flags(report, figure), _flags(baseline, figure)
    lost, gained = int((before & ~now).sum()), int((now & ~before).sum())
    base_share = int(before.sum()) / report.n
    allowed = tolerance * base_share if kind == "max-relative-drop" else tolerance
    test = mcnemar_exact(lost, gained, report.n, allowed)
    correct = int(now.sum())
    both = clopper_pearson(correct, report.n, confidence)
    what = f"{100 * tolerance:g}% of the baseline" if kind == "max-relative-drop" else f"{tolerance:g}"
    return BarResult(
        name=f"{figure} drop <= {what}", figure=figure, kind=kind, threshold=tolerance, estimate=correct / report.n,
        correct=correct, n=report.n, interval=(both.low, both.high), baseline=base_share, drop=test.drop,
        tolerance=allowed, lost=lost, gained=gained, p_value=test.p_value, passed=test.p_value >= 1 - confidence,
        rule=f"exact McNemar test, paired on the same inputs: fails when the drop exceeds the tolerance at "
             f"{100 * confidence:g}% (p < {1 - confidence:.2g})",
    )


def _outcome(report: RobustnessReport, name: str):
    try:
        return report.outcome(name)
    except KeyError:
        evaluated = ", ".join(o.attack for o in report.attacks) or "none"
        hint = " (it needs two attacks or more)" if name == WORST_CASE else ""
        raise DltestError(f"figure {name!r} was not evaluated{hint}; attacks evaluated: {evaluated}") from None


def _flags(report: RobustnessReport, figure: str):
    text = report.clean_inputs if figure == ACCURACY else _outcome(report, figure).robust_inputs
    if len(text) != report.n:
        raise DltestError(f"the {report.dataset} report has no per-input outcomes for {figure}; "
                          "make the baseline with dltest gate or dltest evaluate of this version")
    return flags_from_string(text)


def _drop_figures(tolerances: dict[str, float], report: RobustnessReport,
                  baseline: RobustnessReport) -> list[tuple[str, float]]:
    if not tolerances:
        return []
    common = [ACCURACY] + [o.attack for o in report.attacks if _has(baseline, o.attack)]
    if report.worst_case is not None and baseline.worst_case is not None \
            and report.worst_case.settings == baseline.worst_case.settings:
        common.append(WORST_CASE)
    chosen = []
    for figure in common:
        if figure in tolerances or ALL_FIGURES in tolerances:
            chosen.append((figure, tolerances.get(figure, tolerances.get(ALL_FIGURES))))
    for figure in tolerances:
        if figure != ALL_FIGURES and figure not in common:
            raise DltestError(f"max drop for {figure!r}: the figure is not in both this run and the baseline "
                              f"(common figures: {', '.join(common)})")
    return chosen


def _has(report: RobustnessReport, attack: str) -> bool:
    return any(o.attack == attack for o in report.attacks)


def check_same_inputs(report: RobustnessReport, baseline: RobustnessReport) -> None:
    """A paired comparison needs the same dataset, split, inputs and attack settings."""
    for what in ("dataset", "split", "pool_size"):
        if getattr(report, what) != getattr(baseline, what):
            raise DltestError(f"the baseline was evaluated on {what} {getattr(baseline, what)!r}, this run on "
                              f"{getattr(report, what)!r}: compare like with like")
    if report.indices != baseline.indices:
        raise DltestError("the baseline was evaluated on other inputs (other --n or --seed): a paired "
                          "comparison needs the same inputs")
    for outcome in report.attacks:
        if _has(baseline, outcome.attack):
            before = _settings(baseline.outcome(outcome.attack).settings)
            if _settings(outcome.settings) != before:
                raise DltestError(f"the baseline ran {outcome.attack} with other settings "
                                  f"({baseline.outcome(outcome.attack).label} vs {outcome.label}): compare like with like")


def _settings(settings: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in settings.items() if k != "note"}


# --- baselines ---------------------------------------------------------------------------------


def load_baseline(path: str | os.PathLike) -> RobustnessReport:
    """The evaluation inside a ``dltest gate`` report, or a ``dltest evaluate`` report."""
    data = read_json(path)
    if isinstance(data, dict) and isinstance(data.get("evaluation"), dict):
        data = data["evaluation"]
    try:
        return report_from_dict(data)
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        raise DltestError(f"{path} is not a dltest gate or evaluate report ({exc})") from None


def report_from_dict(data: Mapping[str, Any]) -> RobustnessReport:
    """Rebuild a :class:`RobustnessReport` from its JSON form."""
    from dltest.robustness import AttackOutcome

    fields = set(RobustnessReport.__dataclass_fields__)
    outcome_fields = set(AttackOutcome.__dataclass_fields__)

    def outcome(d: Mapping[str, Any]) -> AttackOutcome:
        return AttackOutcome(**{k: v for k, v in d.items() if k in outcome_fields})

    kwargs = {k: v for k, v in data.items() if k in fields}
    kwargs["attacks"] = [outcome(o) for o in data.get("attacks", [])]
    kwargs["worst_case"] = outcome(data["worst_case"]) if data.get("worst_case") else None
    return RobustnessReport(**kwargs)


def baseline_specs(baseline: RobustnessReport) -> list[AttackSpec]:
    """The baseline's attacks with its exact settings (so a run without attack options repeats them)."""
    specs = []
    for outcome in baseline.attacks:
        check_attack_name(outcome.attack)
        try:
            specs.append(AttackSpec(**outcome.settings))
        except TypeError as exc:
            raise DltestError(f"the baseline's {outcome.attack} settings are not those of this dltest version "
                              f"({exc}); make the baseline again") from None
    return specs


# --- running -----------------------------------------------------------------------------------


def run_gate(
    model: nn.Module,
    data: ImageDataset,
    policy: GatePolicy,
    *,
    attacks: Sequence[str | AttackSpec] = (),
    baseline: RobustnessReport | str | os.PathLike | None = None,
    n: int | None = None,
    seed: int | None = None,
    eps: float | str | None = None,
    steps: int | None = None,
    alpha: float | None = None,
    queries: int | None = None,
    batch_size: int = 256,
    device: str | None = None,
    allow_randomised: bool = False,
    progress: bool = False,
    model_name: str | None = None,
) -> GateResult:
    """Evaluate ``model`` on ``data`` and decide every bar of ``policy``.

    Attacks are those the bars name plus ``attacks``; with a baseline and none named, the
    baseline's attacks with its settings. With a baseline, the inputs and the seed are the
    baseline's (so that the comparison is paired); ``n`` or ``seed`` that contradict it fail.
    A model whose outputs change between calls in eval mode is refused unless ``allow_randomised``.
    """
    policy.check(has_baseline=baseline is not None)
    baseline_path = None
    if baseline is not None and not isinstance(baseline, RobustnessReport):
        baseline_path, baseline = str(baseline), load_baseline(baseline)
    names: list[str | AttackSpec] = list(dict.fromkeys([*policy.attacks, *attacks]))
    indices = None
    if baseline is not None:
        if baseline.dataset != data.name or baseline.split != data.split or baseline.pool_size != len(data):
            raise DltestError(f"the baseline was evaluated on {baseline.dataset}/{baseline.split} "
                              f"({baseline.pool_size} inputs), this run on {data.name}/{data.split} ({len(data)}): "
                              "compare like with like")
        if seed is not None and seed != baseline.seed:
            raise DltestError(f"--seed {seed} differs from the baseline's seed {baseline.seed}; leave it out to "
                              "reuse the baseline's")
        if n is not None and n != baseline.n:
            raise DltestError(f"--n {n} differs from the baseline's {baseline.n} inputs; leave it out to reuse them")
        seed, n = baseline.seed, None
        indices = baseline.indices
        theirs = {spec.name: spec for spec in baseline_specs(baseline)}
        if eps is None and steps is None and alpha is None and queries is None:
            # repeat the baseline's attacks with its exact settings (all of them when none is named)
            names = [theirs.get(a, a) if isinstance(a, str) else a for a in names] or list(theirs.values())
        elif not names:
            names = list(theirs)  # with the overrides: a mismatch with the baseline is then reported
    seed = 0 if seed is None else seed
    specs = attack_specs(names, data.name, data.input_shape[0], eps=eps, steps=steps, alpha=alpha, queries=queries,
                         seed=seed)
    if baseline is not None:  # fail on a mismatch before spending the evaluation
        for spec in specs:
            if _has(baseline, spec.name) and _settings(spec.to_dict()) != _settings(baseline.outcome(spec.name).settings):
                raise DltestError(f"the baseline ran {spec.name} with other settings ({baseline.outcome(spec.name).label} "
                                  f"vs {spec.label}): compare like with like")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RobustnessWarning)
        report = evaluate_robustness(
            model, data, specs, n=n, seed=seed, batch_size=batch_size, device=device, progress=progress,
            indices=indices,
            refuse_randomised=not allow_randomised,
        )
    notes = [str(w.message) for w in caught if issubclass(w.category, RobustnessWarning)]
    bars = decide_bars(report, policy, baseline)
    return GateResult(
        passed=all(bar.passed for bar in bars), bars=bars, report=report, confidence=policy.confidence,
        model=model_name, baseline=baseline_path, warnings=notes,
    )


def assert_robust(
    model: nn.Module,
    data: ImageDataset,
    attack: str | Sequence[str] = "pgd",
    min_robust: float | None = 0.8,
    *,
    min_accuracy: float | None = None,
    confidence: float = 0.95,
    n: int | None = None,
    seed: int = 0,
    **evaluation: Any,
) -> GateResult:
    """Assert that ``model`` is robust enough on ``data``: an ``AssertionError`` lists every figure
    with its interval when a bar fails. ``min_robust`` applies to each attack named (and to the
    worst case when several are). ``evaluation`` goes to :func:`run_gate` (``eps``, ``steps``, ...)."""
    __tracebackhide__ = True  # pytest shows the caller's line, not this frame
    names = [attack] if isinstance(attack, str) else list(attack)
    bars = {} if min_robust is None else {name: min_robust for name in names}
    if min_robust is not None and len(names) > 1:
        bars[WORST_CASE] = min_robust
    policy = GatePolicy(min_accuracy=min_accuracy, min_robust=bars, confidence=confidence)
    result = run_gate(model, data, policy, attacks=names, n=n, seed=seed, **evaluation)
    if not result.passed:
        raise RobustnessAssertionError(result)
    return result


class RobustnessAssertionError(AssertionError):
    """A bar of :func:`assert_robust` failed: the text lists every figure; ``result`` holds them."""

    __module__ = "dltest.gate"  # tracebacks name it where users import it from (as before the split)

    def __init__(self, result: GateResult) -> None:
        super().__init__(result.summary())
        self.result = result

