"""`dltest metrics` and the `dltest select` flags of the newer metrics, run as a user runs them."""

from __future__ import annotations

import json

import pytest

from dltest.errors import DltestError

from tests.cli_runner import run_cli as run


def test_metrics_says_what_each_metric_needs_and_where_sampling_applies(tmp_path):
    result = run("metrics", "--out", str(tmp_path / "m.json"))
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "m.json").read_text())
    assert saved["command"] == "dltest metrics" and "dltest_version" in saved  # the header every output has
    rows = {row["metric"]: row for row in saved["metrics"]}
    for name in ("badge", "ats", "dsa", "lsa", "mdsa", "batchbald"):
        assert name in result.output and name in rows
    assert rows["dsa"]["needs_reference"] and any("training data" in n for n in rows["lsa"]["needs"])
    assert rows["dsa"]["options"] == {"layer": "penultimate", "reference_size": 10000, "reference_seed": 0}
    assert any("MC-dropout" in n for n in rows["batchbald"]["needs"]) and rows["batchbald"]["options"]["max_memory_mb"] == 1024
    assert any("embeddings" in n for n in rows["badge"]["needs"])
    assert rows["ats"]["needs"] == ["the pool's outputs only"]
    assert rows["entropy"]["sampling"] == ["power", "softmax", "rank"] and rows["dre"]["sampling"] == []
    assert rows["dfal"]["sampling"] and not rows["batchbald"]["sampling"]
    assert rows["margin"]["sampling"] == ["softmax", "rank"]  # lowest margins first: power sampling refuses it
    from dltest.selectors import REGISTRY, get_selector
    for name, row in rows.items():  # every mode listed is accepted, every other one refused
        for mode in ("power", "softmax", "rank"):
            if mode in row["sampling"]:
                get_selector(name, sampling=mode)
            else:
                with pytest.raises(DltestError):
                    get_selector(name, sampling=mode)
    assert set(rows) == set(REGISTRY)


@pytest.mark.slow
def test_select_sampling_and_reference_flags(tmp_path, lenet_checkpoint):
    out = tmp_path / "s.json"
    result = run("select", "--metric", "entropy", "--budget", "25", "--model", str(lenet_checkpoint),
                 "--sampling", "power", "--temperature", "2", "--seed", "3", "--out", str(out))
    assert result.exit_code == 0, result.output
    saved = json.loads(out.read_text())
    assert saved["options"] == {"sampling": "power", "temperature": 2.0} and saved["seed"] == 3
    out = tmp_path / "dsa.json"
    result = run("select", "--metric", "mdsa", "--budget", "10", "--model", str(lenet_checkpoint),
                 "--reference-split", "train", "--reference-size", "600", "--out", str(out))
    assert result.exit_code == 0, result.output
    saved = json.loads(out.read_text())
    assert saved["options"]["reference"] == "mnist/train" and saved["options"]["reference_inputs"] == 600
    assert saved["options"]["reference_seed"] == 0 and len(saved["indices"]) == 10


def test_select_flag_errors_are_one_line(tmp_path, lenet_checkpoint):
    cases = [
        (["--metric", "dsa"], "--reference-split"),
        (["--metric", "entropy", "--reference-split", "train"], "apply to the metrics"),
        (["--metric", "dre", "--sampling", "power"], "does not rank scores"),
        (["--metric", "margin", "--sampling", "power"], "lowest scores first"),
        (["--metric", "entropy", "--temperature", "2"], "temperature applies only"),
        (["--metric", "ats", "--ats-upper", "2"], "upper must lie"),
        (["--metric", "badge", "--layer", "features.3"], "--layer is not an option"),
    ]
    for args, message in cases:
        out = tmp_path / "never.json"
        result = run("select", "--budget", "5", "--model", str(lenet_checkpoint), "--out", str(out), *args)
        assert result.exit_code == 2, (args, result.output)
        assert message in result.output and "Traceback" not in result.output, (args, result.output)
        assert not out.exists()
