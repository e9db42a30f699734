"""The command line as a whole: --version, python -m dltest, one-line usage errors, plain flags."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

import dltest
from dltest.cli import app


def test_version_flag_and_python_dash_m():
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0 and result.stdout.strip() == f"dltest {dltest.__version__}"
    done = subprocess.run([sys.executable, "-m", "dltest", "--version"], capture_output=True, text=True,
                          env=os.environ.copy(), timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == f"dltest {dltest.__version__}", done.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["select", "--bogus"], "No such option: --bogus"),
        (["select", "--budget"], "Option '--budget' requires an argument"),
        (["evaluate", "--n", "abc"], "Invalid value for '--n'"),
        (["retrain", "--resume", "yes"], "unexpected extra argument"),
        (["nosuchcommand"], "No such command 'nosuchcommand'"),
    ],
)
def test_usage_errors_are_one_line_without_panels(args, message):
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert not any(ch in result.stderr for ch in "╭│╰"), result.stderr
    assert result.stdout == ""


def test_help_shows_defaults_and_plain_boolean_flags():
    text = CliRunner().invoke(app, ["retrain", "--help"], env={"COLUMNS": "200"}).stdout
    assert "[default: dre]" in text and "[default: 1000]" in text
    assert "--resume" in text and "--no-resume" not in text and "--no-download" not in text
