"""A robustness gate: bars on accuracy and robust accuracy, decided with exact statistics.

policy (bars) + model + data -> :func:`dltest.robustness.evaluate_robustness` -> one
:class:`BarResult` per bar -> pass or fail, written as JSON, JUnit XML and a Markdown table.

Bars and the rule that decides each:

- a **minimum** (``min_accuracy``, ``min_robust={"pgd": 0.8}``): the figure must be *shown* to
  reach the bar. It passes when the one-sided Clopper-Pearson lower bound at ``confidence``
  (default 95%) is at or above the bar, so a measured 98.3% on 300 inputs does not pass a
  98% bar (its lower bound is 96.4%): evaluate more inputs to pass a tight bar.
- a **maximum drop** against a baseline report (``max_drop``, absolute, or
  ``max_relative_drop``, a share of the baseline's figure) is a regression test on the same
  inputs: it fails when the exact McNemar test shows, at ``confidence``, that the figure
  dropped by more than the tolerance. Two runs of the same model never fail it.

Figures: ``accuracy`` (clean), an attack's name (its robust accuracy), and ``worst-case`` (inputs
robust to every attack evaluated, AutoAttack's rule). A bare ``min_robust`` number applies to
``worst-case``; a bare ``max_drop`` number to every figure both reports have.
"""

from __future__ import annotations

import math
import os
import stat
import sys
import warnings
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from torch import nn

from dltest._version import __version__
from dltest.header import output_header
from dltest.analysis.intervals import check_confidence, clopper_pearson, mcnemar_exact
from dltest.attacks import ATTACKS, AttackSpec, check_attack_name
from dltest.data import ImageDataset
from dltest.errors import DltestError
from dltest.io import atomic_path, read_json
from dltest.robustness import (
    WORST_CASE, RobustnessReport, RobustnessWarning, attack_specs, evaluate_robustness, flags_from_string,
)

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
    if policy.is_empty():
        raise DltestError("the gate has no bars: give --min-accuracy, --min-robust, or --baseline with --max-drop")
    baseline_path = None
    if baseline is not None and not isinstance(baseline, RobustnessReport):
        baseline_path, baseline = str(baseline), load_baseline(baseline)
    if policy.needs_baseline and baseline is None:
        raise DltestError("max drop needs a baseline report: pass --baseline REPORT.json")
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

    def __init__(self, result: GateResult) -> None:
        super().__init__(result.summary())
        self.result = result


# --- outputs -----------------------------------------------------------------------------------


def markdown_table(result: GateResult) -> str:
    """The bars as a GitHub-flavoured Markdown table."""
    conf = f"{100 * result.confidence:g}%"
    lines = [
        f"### dltest gate: {'passed' if result.passed else 'failed'}",
        "",
        f"{result.model or 'model'} on {result.report.n} inputs of {result.report.dataset}/{result.report.split}"
        f" (seed {result.report.seed}); intervals are exact at {conf}.",
        "",
        f"| bar | measured | {conf} interval | decided on | rule | result |",
        "|---|---|---|---|---|---|",
    ]
    for bar in result.bars:
        low, high = bar.interval
        lines.append(f"| `{bar.name}` | {_pct(bar.estimate)} ({bar.correct}/{bar.n}) | {_pct(low)} - {_pct(high)} "
                     f"| {bar.decided_on} | {bar.rule} | {'pass' if bar.passed else '**FAIL**'} |")
    for note in result.warnings:
        lines.append(f"\n> warning: {note}")
    return "\n".join(lines) + "\n"


def junit_xml(result: GateResult) -> str:
    """JUnit XML with one test case per bar (CI systems show failing bars as failing tests)."""
    failures = len(result.failures)
    seconds = f"{result.report.seconds:.3f}"
    suites = ET.Element("testsuites", name="dltest gate", tests=str(len(result.bars)), failures=str(failures),
                        errors="0", time=seconds)
    suite = ET.SubElement(suites, "testsuite", name="dltest gate", tests=str(len(result.bars)),
                          failures=str(failures), errors="0", skipped="0", time=seconds)
    props = ET.SubElement(suite, "properties")
    for key, value in (("model", result.model or ""), ("dataset", result.report.dataset),
                       ("split", result.report.split), ("n", result.report.n), ("seed", result.report.seed),
                       ("confidence", result.confidence), ("dltest_version", __version__)):
        ET.SubElement(props, "property", name=key, value=str(value))
    for bar in result.bars:
        case = ET.SubElement(suite, "testcase", classname=f"dltest.gate.{result.report.dataset}", name=bar.name,
                             time="0")
        if not bar.passed:
            failure = ET.SubElement(case, "failure", message=bar.describe(), type="GateBarFailed")
            failure.text = f"{bar.describe()}\nrule: {bar.rule}"
        else:
            out = ET.SubElement(case, "system-out")
            out.text = f"{bar.describe()}\nrule: {bar.rule}"
    ET.indent(suites)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(suites, encoding="unicode") + "\n"


def write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def append_step_summary(markdown: str, environ: Mapping[str, str] = os.environ) -> Path | None:
    """Append ``markdown`` to GitHub Actions' job summary when ``GITHUB_STEP_SUMMARY`` names a file."""
    target = environ.get("GITHUB_STEP_SUMMARY")
    if not target:
        return None
    try:
        # O_NONBLOCK: a named pipe without a reader fails at once instead of hanging the gate
        fd = os.open(target, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK, 0o666)
        with open(fd, "a", encoding="utf-8") as handle:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise OSError("not a regular file; dltest only writes regular files")
            handle.write(markdown + "\n")
    except OSError as exc:
        print(f"warning: cannot append to GITHUB_STEP_SUMMARY={target} ({exc.strerror or exc})", file=sys.stderr)
        return None
    return Path(target)


def check_step_summary(environ: Mapping[str, str] = os.environ) -> None:
    """Refuse, before any work, a ``GITHUB_STEP_SUMMARY`` that names something other than a regular
    file (a named pipe would block the gate, a device file would swallow the table)."""
    target = environ.get("GITHUB_STEP_SUMMARY")
    if not target or not os.path.lexists(target):
        return
    mode = os.stat(target).st_mode if os.path.exists(target) else 0
    if not stat.S_ISREG(mode):
        raise DltestError(f"GITHUB_STEP_SUMMARY={target} is not a regular file; dltest only appends to regular files")


# --- configuration -----------------------------------------------------------------------------

CONFIG_KEYS = (
    "min-accuracy", "min-robust", "max-drop", "max-relative-drop", "confidence", "attacks", "baseline",
    "dataset", "split", "model", "n", "seed", "eps", "steps", "alpha", "queries", "allow-randomised",
)


def read_config(path: str | os.PathLike | None = None, folder: str | os.PathLike = ".") -> tuple[dict[str, Any], str | None]:
    """The gate's settings from ``path``, else ``dltest.toml`` (table ``[gate]``), else
    ``pyproject.toml`` (table ``[tool.dltest.gate]``) in ``folder``; ``({}, None)`` when none."""
    if path is not None:
        candidates = [Path(path)]
        if not candidates[0].is_file():
            raise DltestError(f"config file not found: {path}")
    else:
        candidates = [Path(folder) / "dltest.toml", Path(folder) / "pyproject.toml"]
    for candidate in candidates:
        if not candidate.is_file():
            continue
        document = _read_toml(candidate)
        if candidate.name == "pyproject.toml":
            table = _table_at(document, ("tool", "dltest", "gate"), candidate)
            where = "[tool.dltest.gate]"
        else:
            table = document.get("gate", _table_at(document, ("tool", "dltest", "gate"), candidate))
            where = "[gate]"
        if table is None:
            if path is not None:
                raise DltestError(f"{candidate} has no {where} table")
            continue
        if not isinstance(table, dict):
            raise DltestError(f"{candidate}: {where} must be a table")
        unknown = sorted(set(table) - set(CONFIG_KEYS))
        if unknown:
            raise DltestError(f"{candidate} {where}: unknown key {unknown[0]!r}; allowed: {', '.join(CONFIG_KEYS)}")
        flag = table.get("allow-randomised")
        if flag is not None and not isinstance(flag, bool):
            raise DltestError(f"{candidate} {where}: allow-randomised must be true or false (a TOML boolean, "
                              f"not a string), got {flag!r}")
        return dict(table), str(candidate)
    return {}, None


MAX_TOML_BYTES = 2**20  # a gate configuration is a few lines; a larger file is not one


def _read_toml(path: Path) -> dict[str, Any]:
    """Parse a TOML file with a one-line error for malformed, oversized or absurdly nested input."""
    try:
        if path.stat().st_size > MAX_TOML_BYTES:
            raise DltestError(f"{path} is {path.stat().st_size} bytes, too large for a configuration "
                              f"(at most {MAX_TOML_BYTES})")
        text = path.read_text(encoding="utf-8")
        return _tomllib().loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise DltestError(f"{path} is not valid TOML ({str(exc).splitlines()[0]})") from None
    except RecursionError:
        raise DltestError(f"{path} is nested too deeply to be a configuration") from None


def _table_at(document: dict[str, Any], keys: tuple[str, ...], path: Path) -> Any:
    """``document[k1][k2]...``, or None where a key is missing; a non-table on the way is an error."""
    value: Any = document
    for depth, key in enumerate(keys):
        if not isinstance(value, dict):
            raise DltestError(f"{path}: [{'.'.join(keys[:depth])}] must be a table, got {value!r:.40}")
        value = value.get(key)
        if value is None:
            return None
    return value


def _tomllib():
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        import tomli as tomllib
    return tomllib


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"

