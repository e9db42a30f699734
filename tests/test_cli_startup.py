"""Start-up of the command line and of ``import dltest`` (issue 16): nothing heavy is imported
before a command runs, and help piped into a file or a CI log stays readable.

Speed itself is measured in benchmarks/bench_startup.py (docs/benchmarks-startup.md); here the
cause is checked: which modules a start-up imports.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "torchvision", "torchattacks", "onnx", "onnxruntime", "scipy", "numpy", "rich.table", "matplotlib")


def python(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    for key in ("COLUMNS", "TERMINAL_WIDTH"):
        if env is None or key not in env:
            environment.pop(key, None)
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=environment, cwd=REPO,
                          timeout=300)


@pytest.mark.parametrize("statement", ["import dltest", "import dltest.cli", "import dltest.pytest_plugin"])
def test_importing_dltest_imports_nothing_heavy(statement):
    shown = python("-c", f"import sys; {statement}; print(sorted(m for m in {HEAVY!r} if m in sys.modules))")
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.strip() == "[]"


def test_the_public_names_still_import_on_first_use():
    import dltest

    assert callable(dltest.select) and dltest.SELECTORS is __import__("dltest.selectors").selectors.REGISTRY
    assert set(dltest.__all__) <= set(dir(dltest))
    with pytest.raises(AttributeError, match="no attribute 'nonexistent'"):
        dltest.nonexistent  # noqa: B018


@pytest.mark.slow
def test_help_and_version_run_without_torch():
    code = ("import sys, runpy; sys.argv = ['dltest', {arg}]\n"
            "try: runpy.run_module('dltest', run_name='__main__')\n"
            "except SystemExit: pass\n"
            "print('heavy:', sorted(m for m in {heavy!r} if m in sys.modules), file=sys.stderr)")
    for arg in ("'--version'", "'--help'", "'select', '--help'", "'gate', '--help'", "'analyze', 'bias', '--help'"):
        shown = python("-c", code.format(arg=arg, heavy=HEAVY[:-2]))  # typer draws its help with rich tables
        assert shown.stderr.strip().splitlines()[-1] == "heavy: []", (arg, shown.stderr[-2000:])
    assert python("-m", "dltest", "--version").stdout.strip() == "dltest 0.1.0"


@pytest.mark.slow
def test_piped_help_is_wide_enough_and_shows_flags_as_flags():
    piped = subprocess.run(f"{sys.executable} -m dltest select --help | cat", shell=True, capture_output=True,
                           text=True, cwd=REPO, timeout=300,
                           env={k: v for k, v in {**os.environ, "PYTHONPATH": str(REPO)}.items()
                                if k not in ("COLUMNS", "TERMINAL_WIDTH")})
    assert piped.returncode == 0, piped.stderr
    lines = piped.stdout.splitlines()
    assert max(len(line) for line in lines) > 60
    assert "<bool>" not in piped.stdout
    download = next(line for line in lines if "--download" in line)
    assert download.split("--download")[1].split()[0] == "Allow"  # the flag, then its help: no type between
    # a width the user set is kept
    narrow = python("-m", "dltest", "select", "--help", env={"COLUMNS": "70"})
    assert max(len(line) for line in narrow.stdout.splitlines()) <= 70


def test_help_defaults_equal_the_librarys_values():
    from dltest.adversarial_training import AT_METHODS
    from dltest.analysis.bias import BINS
    from dltest.cli import defaults
    from dltest.export import PARITY_TOLERANCE
    from dltest.inference import INFERENCE_BATCH
    from dltest.estimation import DESIGNS, SCORES
    from dltest.runtime import MAX_SEED
    from dltest.workflows.retrain import RETRAIN_LR
    from dltest.zoo import ARCHITECTURES

    assert defaults.INFERENCE_BATCH == INFERENCE_BATCH and defaults.BINS == BINS
    assert defaults.PARITY_TOLERANCE == PARITY_TOLERANCE and defaults.RETRAIN_LR == RETRAIN_LR
    assert defaults.ARCHITECTURES == tuple(ARCHITECTURES) and defaults.AT_METHODS == tuple(AT_METHODS)
    assert defaults.MAX_SEED == MAX_SEED
    assert defaults.DESIGNS == tuple(DESIGNS) and defaults.SCORES == tuple(SCORES)
