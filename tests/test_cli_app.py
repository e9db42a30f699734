"""The command line as a whole: --version, python -m dltest, one-line usage errors, plain flags."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import dltest
from tests.cli_runner import run_cli


def test_version_flag_and_python_dash_m():
    result = run_cli("--version")
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
    result = run_cli(*args)
    assert result.exit_code == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert not any(ch in result.stderr for ch in "╭│╰"), result.stderr
    assert result.stdout == ""


def test_help_shows_defaults_and_plain_boolean_flags():
    text = run_cli("retrain", "--help", env={"COLUMNS": "200"}).stdout
    assert "[default: dre]" in text and "[default: 1000]" in text
    assert "--resume" in text and "--no-resume" not in text and "--no-download" not in text


def test_library_errors_name_parameters_and_the_cli_names_flags(trained_lenet, small_file, tmp_path):
    import torch

    from dltest.checkpoint import load_model
    from dltest.errors import DltestError

    path = tmp_path / "weights.pt"  # a bare state_dict: its architecture must be named
    torch.save(trained_lenet.state_dict(), path)
    with pytest.raises(DltestError) as err:
        load_model(path)
    assert "arch='module:Class'" in str(err.value) and "--" not in str(err.value)
    result = run_cli("select", "-d", str(small_file.name), "-m", str(path), "--budget", "3",
                     "--out", str(tmp_path / "s.json"))
    assert result.exit_code == 2 and "--arch module:Class" in result.stderr and "arch='" not in result.stderr
    assert not (tmp_path / "s.json").exists()


@pytest.fixture
def small_file(mnist_test, tmp_path):
    """40 MNIST test images as a user .npz file."""
    import numpy as np

    from dltest.data import load_npz

    path = tmp_path / "small.npz"
    np.savez(path, x=mnist_test.x[:40, 0].numpy(), y=mnist_test.y[:40].numpy())
    return load_npz(path)


@pytest.mark.parametrize("command", ["select", "attack", "evaluate", "retrain"])
def test_a_bogus_device_fails_first_in_one_line(command, tmp_path):
    out = tmp_path / ("out.npz" if command == "attack" else "out.json")
    result = run_cli(command, "--device", "bogus", "--data-root", str(tmp_path / "empty"),
                     "--out", str(out))
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == ["error: unknown device 'bogus'; use cpu, cuda, cuda:N or mps"]  # not 'mnist not found'
    assert not out.exists()
