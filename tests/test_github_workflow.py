"""docs/github-actions-gate.yml, the CI workflow the docs hand to users, is run here (issue 16):
it installs dltest from a checkout of its repository (it is on no package index), and each of its
``dltest`` commands runs on a model as the workflow's steps run them, with this repository's data.

No YAML library is a dependency: the few things checked are read from the file's lines.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
WORKFLOW = REPO / "docs" / "github-actions-gate.yml"


def steps(path: Path) -> list[dict[str, str]]:
    """The workflow's steps: each step's keys (name, uses, if, run, ...) as text; ``run: |``
    blocks joined into one string, comments dropped."""
    found: list[dict[str, str]] = []
    block_key, block_indent, step_indent, parent = None, 0, 0, ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        indent = len(line) - len(line.lstrip())
        if block_key is not None:
            if not stripped or indent > block_indent:
                if stripped and not stripped.startswith("#"):
                    found[-1][block_key] += stripped + "\n"
                continue
            block_key = None
        if not stripped or stripped.startswith("#"):
            continue
        match = re.match(r"(- )?([\w-]+):\s*(.*)$", stripped)
        if stripped.startswith("- ") and match and indent >= 6:
            found.append({})
            step_indent = indent + 2
        if found and match and indent >= 6:
            key, value = match.group(2), match.group(3).split(" #")[0].strip()
            if indent + (2 if match.group(1) else 0) == step_indent:
                parent = key
            else:
                key = f"{parent}.{key}"  # e.g. with.path
            if value == "|":
                found[-1][key], block_key, block_indent = "", key, indent + (2 if match.group(1) else 0)
            else:
                found[-1][key] = value
    return found


def commands(script: str) -> list[list[str]]:
    """The shell commands of a ``run`` block, backslash continuations joined."""
    return [shlex.split(line) for line in script.replace("\\\n", " ").splitlines() if line.strip()]


def test_the_workflow_installs_dltest_from_its_repository_checkout():
    workflow = steps(WORKFLOW)
    checkout = next(s for s in workflow if s.get("name") == "Check out dltest")
    assert checkout["uses"].startswith("actions/checkout@")
    assert "github.repository" in checkout["with.repository"] and checkout["with.path"] == ".dltest"
    installs = [c for s in workflow for c in commands(s.get("run", "")) if c[:2] == ["pip", "install"]]
    targets = [arg for c in installs for arg in c[2:] if not arg.startswith("-")]
    assert "./.dltest[onnx]" in targets  # the checkout, with the extra for .onnx models
    assert not any(re.match(r"dltest\b(\[[\w,]+\])?$", arg) for arg in targets)  # no index has a package 'dltest'
    # the checked-out folder is a project pip can install: it has the extras named
    extras = (REPO / "pyproject.toml").read_text()
    assert re.search(r"^onnx = \[", extras, re.M)


@pytest.fixture(scope="module")
def repository_with_a_model(tmp_path_factory) -> Path:
    """A user's repository: models/classifier.onnx, the robust LeNet-5 exported."""
    from dltest.checkpoint import load_model
    from dltest.data import load_dataset
    from dltest.export import export_onnx

    root = tmp_path_factory.mktemp("user-repository")
    (root / "models").mkdir()
    model, _ = load_model(dataset="mnist", robust=True)
    export_onnx(model, root / "models" / "classifier.onnx", load_dataset("mnist", "holdout").subset(torch.arange(64)))
    return root


def run_step(step: dict[str, str], cwd: Path, summary: Path) -> list[subprocess.CompletedProcess]:
    """The step's dltest commands, as ``python -m dltest`` of this checkout, on fewer inputs
    (``--n 800``, appended: the last value wins; enough for the 0.97 bar) to keep the suite's time."""
    results = []
    env = {**os.environ, "PYTHONPATH": str(REPO), "GITHUB_STEP_SUMMARY": str(summary)}
    for command in commands(step["run"]):
        assert command[0] == "dltest", command
        extra = ["--n", "800"] if "--n" in command else []
        results.append(subprocess.run([sys.executable, "-m", "dltest", *command[1:], *extra], cwd=cwd, env=env,
                                      capture_output=True, text=True, timeout=900))
    return results


@pytest.mark.slow
def test_the_workflows_gate_commands_run_and_pass_on_a_robust_model(repository_with_a_model, tmp_path):
    root, summary = repository_with_a_model, tmp_path / "step-summary.md"
    workflow = {s.get("name"): s for s in steps(WORKFLOW)}
    (gate,) = run_step(workflow["Gate the model"], root, summary)
    assert gate.returncode == 0, gate.stdout + gate.stderr
    report = json.loads((root / "gate.json").read_text())
    bars = {bar["name"]: bar for bar in report["bars"]}
    assert report["passed"] and report["n"] == 800 and set(bars) == {"accuracy >= 0.97", "square >= 0.02"}
    assert bars["accuracy >= 0.97"]["estimate"] > 0.97 and bars["square >= 0.02"]["estimate"] > 0.5  # robust
    assert (root / "gate-junit.xml").read_text().count("<testcase") == 2
    assert "square >= 0.02" in (root / "gate.md").read_text() and "square >= 0.02" in summary.read_text()

    # the next run compares with it, as the step that finds baseline/gate.json does
    regression = workflow["No regression against main"]
    assert regression["if"] == "hashFiles('baseline/gate.json') != ''"
    (root / "baseline").mkdir()
    (root / "gate.json").replace(root / "baseline" / "gate.json")
    (again,) = run_step(regression, root, summary)
    assert again.returncode == 0, again.stdout + again.stderr
    compared = json.loads((root / "gate-vs-main.json").read_text())
    assert compared["passed"] and all(bar["drop"] == 0 for bar in compared["bars"])
    uploaded = workflow["Keep the reports"]["with.path"].split()
    assert {"gate*.json", "gate*.xml", "gate.md"} == set(uploaded)
    assert (root / "gate-vs-main-junit.xml").is_file()
