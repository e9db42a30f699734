"""A checkpoint's metadata never runs code (issue 16).

Two hostile checkpoints, each a valid dltest checkpoint (digest included) whose ``arch`` would run
a command if built: ``subprocess:run`` with ``arch_kwargs={"args": ["touch", MARKER]}``, and a
``file.py:Class`` whose file writes MARKER when imported. Every loader refuses both with one line
that names the value and how to allow it (--arch, --trust-model), and MARKER never appears:
``select``, ``evaluate``, ``gate`` (flag and ``model =`` in ``dltest.toml``), ``analyze bias``
(a selection's ``model``), the pytest plugin's ini and the Python API. A legitimate
``file.py:Class`` checkpoint still loads when the user names it with --arch or passes --trust-model.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from dltest.checkpoint import load_model, model_from_checkpoint, read_checkpoint, save_checkpoint
from dltest.errors import DltestError
from tests import client_nets
from tests.client_nets import ClientLeNet, client_state_dict
from tests.cli_runner import run_cli as run

REPO = Path(__file__).resolve().parents[1]
NETS = Path(client_nets.__file__)


def _hostile_checkpoints(folder: Path) -> SimpleNamespace:
    """The two hostile checkpoints in ``folder``, and the marker either would create."""
    marker = folder / "PWNED"
    payload = folder / "payload.py"  # imported -> writes the marker; its class would build a model
    payload.write_text(f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
                       "import torch\nNet = lambda: torch.nn.Linear(2, 2)\n")
    common = dict(dataset="mnist", input_shape=(1, 28, 28), num_classes=10)
    run_ckpt = save_checkpoint(nn.Linear(2, 2), folder / "run.pt", arch="subprocess:run",
                               arch_kwargs={"args": ["touch", str(marker)]}, **common)
    file_ckpt = save_checkpoint(nn.Linear(2, 2), folder / "file.pt", arch=f"{payload}:Net", **common)
    return SimpleNamespace(marker=marker, run=run_ckpt, file=file_ckpt, payload=payload,
                           archs={run_ckpt: "subprocess:run", file_ckpt: f"{payload}:Net"})


@pytest.fixture
def hostile(tmp_path) -> SimpleNamespace:
    return _hostile_checkpoints(tmp_path)


KINDS = ["run", "file"]


def _assert_refused(result, arch: str, marker: Path, *outputs: Path) -> None:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert repr(arch) in lines[0] and "--arch" in lines[0] and "--trust-model" in lines[0], lines[0]
    assert "Traceback" not in result.output
    assert not marker.exists()
    assert not any(p.exists() for p in outputs)


def test_the_payloads_are_live_when_trusted(hostile):
    """The checkpoints are real threats: built with trust, each runs its command."""
    with pytest.raises(DltestError, match="not an nn.Module"):  # subprocess.run ran, then returned no module
        load_model(hostile.run, trust=True)
    assert hostile.marker.read_text() == ""  # touch made it
    hostile.marker.unlink()
    model, _ = load_model(hostile.file, trust=True)  # the file was imported to build its Net
    assert isinstance(model, nn.Linear) and hostile.marker.read_text() == "ran"


@pytest.mark.parametrize("kind", KINDS)
def test_the_python_api_refuses_without_naming_the_arch(hostile, kind):
    path = getattr(hostile, kind)
    arch = hostile.archs[path]
    with pytest.raises(DltestError) as err:
        load_model(path)
    message = str(err.value)
    assert "\n" not in message and repr(arch) in message and "arch=" in message and "trust=True" in message
    with pytest.raises(DltestError, match="import and run that code"):
        model_from_checkpoint(read_checkpoint(path), path)
    with pytest.raises(DltestError, match="not 'lenet5'"):  # --arch must repeat the file's, never replace it
        load_model(path, arch="lenet5", input_shape=(1, 28, 28))
    assert not hostile.marker.exists()


@pytest.mark.parametrize("kind", KINDS)
def test_select_and_evaluate_refuse(hostile, kind, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = getattr(hostile, kind)
    out = tmp_path / "out.json"
    _assert_refused(run("select", "-d", "mnist", "--split", "val", "-m", path, "--metric", "margin", "-b", 4,
                        "--out", out), hostile.archs[path], hostile.marker, out)
    _assert_refused(run("evaluate", "-d", "mnist", "-m", path, "--attacks", "fgsm", "--n", 10, "--out", out),
                    hostile.archs[path], hostile.marker, out)


@pytest.mark.parametrize("command", [
    ["attack", "--split", "val", "--attack", "fgsm", "--out", "{out}", "-m"],
    ["retrain", "--budget", "4", "--out", "{out}", "-m"],
    ["export", "--onnx", "{out}", "-m"],
    ["train", "--epochs", "1", "--train-size", "100", "--out", "{out}", "--init"],
], ids=["attack", "retrain", "export", "train-init"])
def test_every_other_loader_refuses(hostile, command, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / {"attack": "adv.npz", "export": "model.onnx"}.get(command[0], "out.pt")
    for path in (hostile.run, hostile.file):
        args = [str(out) if a == "{out}" else a for a in command]
        _assert_refused(run(*args, path), hostile.archs[path], hostile.marker, out)


@pytest.mark.parametrize("kind", KINDS)
def test_gate_refuses_from_the_flag_and_from_dltest_toml(hostile, kind, tmp_path, monkeypatch):
    path = getattr(hostile, kind)
    repo = tmp_path / "repo"  # a pull request's checkout: its dltest.toml names the model
    repo.mkdir()
    monkeypatch.chdir(repo)
    out = repo / "gate.json"
    _assert_refused(run("gate", "-m", path, "--min-accuracy", "0.5", "--n", 10, "--out", out),
                    hostile.archs[path], hostile.marker, out)
    (repo / "dltest.toml").write_text(f'[gate]\nmodel = "{path}"\nmin-accuracy = 0.5\nn = 10\n')
    _assert_refused(run("gate", "--out", out), hostile.archs[path], hostile.marker, out)


@pytest.mark.parametrize("kind", KINDS)
def test_analyze_bias_refuses_the_model_a_selection_names(hostile, kind, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = getattr(hostile, kind)
    selection = tmp_path / "selection.json"
    selection.write_text(json.dumps({"indices": [0, 1, 2], "dataset": "mnist", "split": "val", "model": str(path)}))
    out = tmp_path / "bias.json"
    _assert_refused(run("analyze", "bias", selection, "--out", out), hostile.archs[path], hostile.marker, out)


def _plugin_project(folder: Path, model: Path) -> Path:
    """A project whose pytest.ini points the plugin's dltest_model at ``model``."""
    folder.mkdir()
    (folder / "pytest.ini").write_text(f"[pytest]\ndltest_model = {model}\n")
    (folder / "test_model.py").write_text("def test_uses_the_model(dltest_model):\n"
                                          "    assert dltest_model is not None\n")
    return folder


def _pytest(project: Path) -> subprocess.CompletedProcess:
    """pytest in its own process (as CI runs it), dltest from this checkout."""
    from tests.test_pytest_plugin import _plugin_args

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "pytest", *_plugin_args(), "-p", "no:cacheprovider", "-q"],
                          cwd=project, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_the_pytest_plugin_refuses_the_model_its_ini_names(tmp_path):
    hostile = _hostile_checkpoints(tmp_path)
    for kind in KINDS:
        path = getattr(hostile, kind)
        result = _pytest(_plugin_project(tmp_path / f"project-{kind}", path))
        output = result.stdout + result.stderr
        assert result.returncode != 0, output
        # the error section's one line; pytest's short summary repeats it in full where CI is set
        refusals = [line for line in output.splitlines()
                    if "names architecture" in line and not line.startswith(("ERROR ", "FAILED "))]
        assert len(refusals) == 1 and repr(hostile.archs[path]) in refusals[0], output
        assert "--trust-model" in refusals[0] and "--arch" in refusals[0]
        assert "Traceback" not in output and "checkpoint.py:" not in output, output  # no stack, one line
        assert not hostile.marker.exists()


# --- the explicit way still works ----------------------------------------------------------------


@pytest.fixture(scope="module")
def client_checkpoint(trained_lenet, tmp_path_factory) -> Path:
    """A legitimate file.py:Class checkpoint: the trained zoo LeNet-5's weights in tests/client_nets.py's class."""
    model = ClientLeNet().eval()
    model.load_state_dict(client_state_dict(trained_lenet))
    return save_checkpoint(model, tmp_path_factory.mktemp("legit") / "client.pt", arch=f"{NETS}:ClientLeNet",
                           dataset="mnist", input_shape=(1, 28, 28), num_classes=10)


def test_a_legitimate_file_arch_loads_when_named_or_trusted(client_checkpoint, trained_lenet, mnist_test):
    arch = f"{NETS}:ClientLeNet"
    with pytest.raises(DltestError, match="names architecture"):
        load_model(client_checkpoint)
    with pytest.raises(DltestError, match="stores its architecture's arguments"):  # named, but not replaced
        load_model(client_checkpoint, arch=arch, arch_kwargs={"normalize_inside": False})
    x = mnist_test.images(slice(0, 200))
    with torch.no_grad():
        expected = torch.softmax(trained_lenet(x), 1)
        for model, info in (load_model(client_checkpoint, arch=arch), load_model(client_checkpoint, trust=True)):
            assert type(model).__name__ == "ClientLeNet" and info.arch == arch
            assert torch.allclose(torch.softmax(model(x), 1), expected, atol=1e-5)  # the zoo model's weights


def test_the_cli_evaluates_a_legitimate_file_arch_with_arch_or_trust_model(client_checkpoint, lenet_checkpoint,
                                                                            tmp_path):
    common = ["evaluate", "-d", "mnist", "--attacks", "fgsm", "--eps", "0.1", "--n", 100]
    refused = run(*common, "-m", client_checkpoint, "--out", tmp_path / "no.json")
    assert refused.exit_code == 2 and not (tmp_path / "no.json").exists()
    zoo = run(*common, "-m", lenet_checkpoint, "--out", tmp_path / "zoo.json")
    assert zoo.exit_code == 0, zoo.output
    expected = json.loads((tmp_path / "zoo.json").read_text())["clean_correct"]
    reports = []
    for i, allow in enumerate((["--arch", f"{NETS}:ClientLeNet"], ["--trust-model"])):
        out = tmp_path / f"ok{i}.json"
        result = run(*common, "-m", client_checkpoint, *allow, "--out", out)
        assert result.exit_code == 0, result.output
        reports.append(json.loads(out.read_text()))
    assert all(r["model_arch"] == f"{NETS}:ClientLeNet" for r in reports)
    assert reports[0]["clean_inputs"] == reports[1]["clean_inputs"]  # one model, however it was allowed
    assert abs(reports[0]["clean_correct"] - expected) <= 1  # the zoo model's weights (a near-tie may differ)


def test_the_help_says_that_arch_executes_the_file():
    for command in ("select", "evaluate", "retrain", "robust-al"):
        text = " ".join(run(command, "--help").output.split())
        assert "executed" in text.lower() or "executes" in text.lower(), command
