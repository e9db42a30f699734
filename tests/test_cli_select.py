"""`dltest select` and `dltest metrics`, run as a user runs them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dltest.budget import parse_budget
from dltest.checkpoint import save_checkpoint
from dltest.errors import DltestError
from dltest.selectors import REGISTRY
from dltest.zoo import build_model
from tests.cli_runner import run_cli as run


@pytest.mark.parametrize("spec, pool, expected", [("400", 10000, 400), ("4%", 10000, 400), ("4.5%", 1000, 45),
                                                   ("100%", 7, 7), ("0.5%", 846, 4), (" 12 ", 20, 12)])
def test_budget_parsing(spec, pool, expected):
    assert parse_budget(spec, pool) == expected


@pytest.mark.parametrize("spec", ["abc", "0", "-5", "120%", "0%", "4 %%", "1e3", "20001", "0.001%"])
def test_bad_budgets(spec):
    with pytest.raises(DltestError):
        parse_budget(spec, 20000)


@pytest.mark.slow
def test_select_writes_a_complete_selection(tmp_path, lenet_checkpoint):
    out, csv = tmp_path / "sel.json", tmp_path / "sel.csv"
    result = run("select", "--metric", "dre", "--budget", "4%", "--model", str(lenet_checkpoint),
                 "--seed", "3", "--out", str(out), "--csv", str(csv))
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["metric"] == "dre" and data["budget"] == 400 and data["budget_spec"] == "4%"
    assert data["pool_size"] == 10000 and data["seed"] == 3
    assert data["command"] == "dltest select" and data["dltest_version"] and list(data)[:3] == [
        "command", "dltest_version", "seed"]
    assert data["dataset"] == "mnist" and data["split"] == "test" and data["model"] == str(lenet_checkpoint)
    assert len(data["indices"]) == len(set(data["indices"])) == 400
    assert all(0 <= i < 10000 for i in data["indices"]) and len(data["scores"]) == 400
    assert data["options"] == {"bins": 50} and sum(data["predicted_counts"].values()) == 400
    rows = csv.read_text().splitlines()
    assert rows[0] == "rank,index,entropy" and len(rows) == 401
    assert rows[1].split(",")[1] == str(data["indices"][0])
    assert "dre: 400 of 10000 inputs" in result.output
    # the same seed gives the same selection
    again = tmp_path / "again.json"
    run("select", "--metric", "dre", "--budget", "400", "--model", str(lenet_checkpoint), "--seed", "3", "--out", str(again))
    assert json.loads(again.read_text())["indices"] == data["indices"]


def test_select_on_the_val_half_with_the_bundled_model(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = run("select", "--metric", "mcp", "--budget", "50", "--split", "val", "--dataset", "fashion-mnist")
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "selection-mcp-50.json").read_text())
    assert data["pool_size"] == 5000 and data["split"] == "val" and data["model"].endswith("lenet5-fashion-mnist.pt")


@pytest.mark.slow
def test_every_registered_metric_runs_from_the_cli_on_a_user_file(tmp_path, lenet_checkpoint, mnist_test):
    pool = tmp_path / "pool.npz"
    np.savez(pool, x=mnist_test.x[:300, 0].numpy(), y=mnist_test.y[:300].numpy())
    reference = tmp_path / "reference.npz"  # stands in for the training data of dsa, lsa, mdsa
    np.savez(reference, x=mnist_test.x[300:1300, 0].numpy(), y=mnist_test.y[300:1300].numpy())
    for metric in sorted(REGISTRY):
        out = tmp_path / f"{metric}.json"
        extra = ["--reference", str(reference)] if REGISTRY[metric].needs_reference else []
        result = run("select", "--metric", metric, "--budget", "10", "--model", str(lenet_checkpoint),
                     "--dataset", str(pool), "--out", str(out), *extra)
        assert result.exit_code == 0, (metric, result.output)
        data = json.loads(out.read_text())
        assert len(set(data["indices"])) == 10 and data["pool_size"] == 300 and data["split"] == "all"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--budget", "abc"], "budget 'abc' is neither a count"),
        (["--budget", "0"], "at least one input"),
        (["--budget", "-5"], "budget '-5'"),
        (["--budget", "120%"], "not a percentage in (0%, 100%]"),
        (["--budget", "20000"], "exceeds the pool of 10000"),
        (["--metric", "nope"], "unknown metric 'nope'; choose one of"),
        (["--model", "missing.pt"], "model file not found: missing.pt"),
        (["--out", "no/such/folder/x.json"], "folder no/such/folder does not exist"),
        (["--dataset", "imagenet"], "unknown dataset 'imagenet'"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, monkeypatch, lenet_checkpoint, args, message):
    monkeypatch.chdir(tmp_path)
    base = {"--metric": "dre", "--budget": "4%", "--model": str(lenet_checkpoint)}
    for key, value in zip(args[::2], args[1::2]):
        base[key] = value
    result = run("select", *[item for pair in base.items() for item in pair])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.output
    assert "Traceback" not in result.output
    assert not list(tmp_path.glob("*.json"))


def test_corrupt_and_misfit_models(tmp_path):
    bad = tmp_path / "corrupt.pt"
    bad.write_bytes(b"PK\x03\x04 truncated")
    result = run("select", "--model", str(bad), "--out", str(tmp_path / "s.json"))
    assert result.exit_code == 2 and "cannot read" in result.output
    vgg = save_checkpoint(build_model("vgg8", 10, (3, 32, 32)), tmp_path / "vgg.pt", arch="vgg8", dataset="svhn",
                          input_shape=(3, 32, 32), num_classes=10)
    result = run("select", "--model", str(vgg), "--out", str(tmp_path / "s.json"))
    assert result.exit_code == 2 and "takes inputs of shape (3, 32, 32), but mnist has (1, 28, 28)" in result.output


def test_data_root_without_files(tmp_path, lenet_checkpoint):
    result = run("select", "--model", str(lenet_checkpoint), "--data-root", str(tmp_path), "--out", str(tmp_path / "s.json"))
    assert result.exit_code == 2
    assert f"mnist not found under {tmp_path}" in result.output and "--download" in result.output


def test_a_failed_run_leaves_an_existing_output_untouched(tmp_path, lenet_checkpoint):
    out = tmp_path / "keep.json"
    out.write_text('{"precious": true}')
    result = run("select", "--model", str(lenet_checkpoint), "--budget", "99999", "--out", str(out))
    assert result.exit_code == 2 and json.loads(out.read_text()) == {"precious": True}
    assert [p.name for p in tmp_path.iterdir()] == ["keep.json"]


@pytest.mark.slow
def test_labeled_file_excludes_inputs_and_must_match_the_pool(tmp_path, lenet_checkpoint):
    first = tmp_path / "first.json"
    assert run("select", "--metric", "entropy", "--budget", "30", "--model", str(lenet_checkpoint), "--out", str(first)).exit_code == 0
    second = tmp_path / "second.json"
    result = run("select", "--metric", "entropy", "--budget", "30", "--model", str(lenet_checkpoint),
                 "--labeled", str(first), "--out", str(second))
    assert result.exit_code == 0, result.output
    a, b = json.loads(first.read_text()), json.loads(second.read_text())
    assert not set(a["indices"]) & set(b["indices"]) and b["labeled"] == 30
    result = run("select", "--metric", "entropy", "--budget", "30", "--model", str(lenet_checkpoint),
                 "--split", "val", "--labeled", str(first), "--out", str(second))
    assert result.exit_code == 2 and "selects from split 'test', not 'val'" in result.output


def test_metrics_lists_every_selector(tmp_path):
    result = run("metrics", "--out", str(tmp_path / "metrics.json"))
    assert result.exit_code == 0
    for name in REGISTRY:
        assert name in result.output
    saved = json.loads((tmp_path / "metrics.json").read_text())
    catalogue = {row["metric"]: row for row in saved["metrics"]}
    assert set(catalogue) == set(REGISTRY)
    assert catalogue["dre"]["options"] == {"bins": 50} and catalogue["dre"]["runs_model_again"] is False
    assert catalogue["bald"]["options"] == {"samples": 10, "dropout": 0.1}


@pytest.mark.slow
def test_console_script_as_a_user_runs_it(tmp_path, lenet_checkpoint):
    script = Path(sys.executable).with_name("dltest")
    out = tmp_path / "s.json"
    done = subprocess.run([str(script), "select", "--metric", "margin", "--budget", "1%", "--model", str(lenet_checkpoint),
                           "--out", str(out)], capture_output=True, text=True, env=os.environ.copy(), timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads(out.read_text())["budget"] == 100
    done = subprocess.run([str(script), "select", "--budget", "abc"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and done.stderr.strip().startswith("error: --budget 'abc'") and done.stdout == ""


def test_infinite_scores_are_written_as_null_and_minimal_selection_files_load(tmp_path):
    from dltest.selection import SelectionResult, _finite_or_none, load_selection
    import torch

    assert _finite_or_none(torch.tensor([1.5, float("inf"), float("nan")])) == [1.5, None, None]
    path = tmp_path / "minimal.json"
    path.write_text('{"indices": [3, 1, 2]}')
    loaded = load_selection(str(path))
    assert isinstance(loaded, SelectionResult) and loaded.indices == [3, 1, 2] and loaded.budget == 3
    path.write_text('{"indices": ["a"]}')
    with pytest.raises(DltestError, match="list of integers"):
        load_selection(str(path))
