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


@pytest.mark.slow
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
    # one message under the caller's line: no traceback through dltest, no fixture reprs
    lines = out.split("_ test_not_robust_enough _")[1].splitlines()[1:]
    failure = "\n".join(lines[:next(i for i, line in enumerate(lines) if line.startswith("="))])
    assert len(failure.splitlines()) == 6, failure  # the verdict, one line per bar, where it was asserted
    assert "test_model.py:12: RobustnessAssertionError" in failure
    assert "def assert_robust" not in failure and "ImageDataset(" not in failure and "Conv2d" not in failure
    assert "FAILED test_model.py::test_not_robust_enough - dltest gate: FAILED" in out

    long = pytester.runpytest_subprocess(*_plugin_args(), "-p", "no:cacheprovider", "--tb=long", "-k", "not_robust")
    long.assert_outcomes(failed=1)
    assert "RobustnessAssertionError: dltest gate: FAILED" in long.stdout.str()  # the full traceback when asked


def test_a_run_that_uses_no_dltest_fixture_imports_no_torch(pytester: pytest.Pytester):
    pytester.makepyfile(test_plain="""
import sys

def test_plain():
    assert 1 + 1 == 2

def test_zz_nothing_heavy_was_imported():
    assert [m for m in ("torch", "numpy", "dltest.gate", "dltest.data") if m in sys.modules] == []
""")
    result = pytester.runpytest_subprocess(*_plugin_args(), "-p", "no:cacheprovider", "--strict-markers")
    result.assert_outcomes(passed=2)
    assert "dltest" in pytester.runpytest_subprocess(*_plugin_args(), "--help").stdout.str()  # the plugin did load
