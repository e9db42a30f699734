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

Modules: :mod:`~dltest.gate.policy` (the bars), :mod:`~dltest.gate.decision` (evaluate and
decide), :mod:`~dltest.gate.outputs` (Markdown, JUnit XML, step summary) and
:mod:`~dltest.gate.config` (dltest.toml / pyproject.toml). Every public name is importable from
``dltest.gate``.
"""

from dltest.gate.policy import (
    ACCURACY, ALL_FIGURES, GatePolicy, check_figure, check_share, figure_names, parse_bars,
)
from dltest.gate.outputs import append_step_summary, check_step_summary, junit_xml, markdown_table, write_text
from dltest.gate.decision import (
    BarResult, GateResult, RobustnessAssertionError, assert_robust, baseline_specs, check_same_inputs, decide_bars,
    load_baseline, report_from_dict, run_gate,
)
from dltest.gate.config import CONFIG_KEYS, MAX_TOML_BYTES, GateSettings, gate_settings, read_config

__all__ = [
    "ACCURACY", "ALL_FIGURES", "BarResult", "CONFIG_KEYS", "GatePolicy", "GateResult", "GateSettings", "MAX_TOML_BYTES",
    "RobustnessAssertionError", "append_step_summary", "assert_robust", "baseline_specs", "check_figure",
    "check_same_inputs", "check_share", "check_step_summary", "decide_bars", "figure_names", "junit_xml",
    "gate_settings", "load_baseline", "markdown_table", "parse_bars", "read_config", "report_from_dict", "run_gate", "write_text",
]
