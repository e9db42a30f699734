"""The pytest plugin in a project of its own (pytester): a passing and a failing robustness assertion.

The project runs in a subprocess: in-process runs forget the modules they imported, and C
extensions (numpy.fft under scipy, torchvision's) cannot be imported a second time.
"""

from __future__ import annotations

from importlib.metadata import entry_points

import pytest

pytest_plugins = ["pytester"]

PROJECT_TESTS = '''
import pytest
from dltest.pytest_plugin import assert_robust


def test_robust_enough(dltest_model, dltest_data):
    result = assert_robust(dltest_model, dltest_data, attack="fgsm", min_robust=0.0, n=100, eps=0.1)
    assert result.passed and result.report.n == 100


@pytest.mark.robustness
def test_not_robust_enough(dltest_model, dltest_data):
    assert_robust(dltest_model, dltest_data, attack=["pgd", "fgsm"], min_robust=0.9, min_accuracy=0.5, n=100,
                  eps=0.3, steps=5, alpha=0.1)
'''


def _plugin_args() -> list[str]:
    """Load the plugin by name unless the installed package registers it (entry point pytest11)."""
    registered = any(ep.value == "dltest.pytest_plugin" for ep in entry_points(group="pytest11"))
    return [] if registered else ["-p", "dltest.pytest_plugin"]


def test_plugin_passes_and_fails_with_a_readable_message(pytester: pytest.Pytester):
    pytester.makepyfile(test_model=PROJECT_TESTS)
    # --strict-markers makes an unregistered marker an error: the plugin registers "robustness"
    result = pytester.runpytest_subprocess(*_plugin_args(), "--dltest-dataset", "mnist", "--strict-markers",
                                           "-p", "no:cacheprovider", "-rA")
    result.assert_outcomes(passed=1, failed=1)
    out = result.stdout.str()
    assert "dltest gate: FAILED on 100 inputs of mnist/holdout" in out
    assert "FAIL pgd >= 0.9" in out and "lower bound" in out and "Clopper-Pearson" in out
    assert "ok   accuracy >= 0.5" in out  # every figure is listed, passing ones too
    assert "FAIL worst-case >= 0.9" in out
    assert "PASSED test_model.py::test_robust_enough" in out
