"""`dltest analyze bias / correlation / compare`, run as a user runs them, on run folders the tests
write in the format of `dltest robust-al` and on a real selection of MNIST."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from scipy import stats

from dltest.analysis.bias import selection_bias
from dltest.data import load_dataset
from dltest.inference import infer
from dltest.checkpoint import load_model
from tests.cli_runner import run_cli as run

METRICS = ("random", "dre", "entropy", "deepgini")


def write_run(folder: Path, seed: int, stages: int = 3, metrics=METRICS) -> Path:
    """A robust-al run folder: per metric i, entropy bias 0.1 i (+ 0.01 seed) and PGD robustness
    0.7 - 0.5 * bias, so bias and robustness correlate perfectly (r = -1) at every stage."""
    folder.mkdir(parents=True)
    config = {"command": "dltest robust-al", "dltest_version": "0.1.0", "dataset": "mnist", "arch": "lenet5",
              "metrics": list(metrics), "seed": seed, "budget": 200 + 50 * stages, "initial": 200, "per_stage": 50,
              "epochs": 1, "at": "pgd", "eval_attacks": ["pgd", "square"], "eval_n": 100}
    (folder / "config.json").write_text(json.dumps(config))
    lines, final = [], {}
    for i, metric in enumerate(metrics):
        for stage in range(stages + 1):
            bias = None if stage == 0 else {"entropy": 0.1 * i + 0.01 * seed, "gini": 0.05 * i, "lc": 0.3,
                                            "margin": 0.02 * ((i + stage) % 3), "label": 0.01 * i}
            robust = {"pgd": 0.4 if stage == 0 else 0.7 - 0.5 * bias["entropy"], "square": 0.5 + 0.01 * stage - 0.02 * i}
            lines.append({"metric": metric, "seed": seed, "stage": stage, "labeled": 200 + 50 * stage,
                          "selected": [] if stage == 0 else list(range(50 * stage, 50 * stage + 50)),
                          "clean_accuracy": 0.95, "robust_accuracy": robust, "bias": bias,
                          "seconds": {"select": 0.1, "train": 1.0, "evaluate": 0.5}})
        final[metric] = {"labeled": 200 + 50 * stages, "clean_accuracy": 0.95, "robust_accuracy": lines[-1]["robust_accuracy"]}
    (folder / "log.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    (folder / "summary.json").write_text(json.dumps({"command": "dltest robust-al", "seed": seed, "final": final}))
    return folder


@pytest.fixture
def runs(tmp_path):
    return [write_run(tmp_path / f"run-seed{s}", s) for s in (0, 1, 2)]


def test_bias_of_a_run_prints_the_logged_bias(tmp_path, runs):
    out = tmp_path / "bias.json"
    result = run("analyze", "bias", runs[1], "--out", out)
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["command"] == "dltest analyze bias" and report["kind"] == "run" and report["seed"] == 1
    assert report["dltest_version"] and report["dataset"] == "mnist"
    assert len(report["records"]) == 4 * 4
    dre3 = next(r for r in report["records"] if r["metric"] == "dre" and r["stage"] == 3)
    assert dre3["bias"]["entropy"] == pytest.approx(0.11)
    assert "selection bias per stage" in result.output and "0.1100" in result.output
    png = Path(report["figure"])
    assert png == out.with_suffix(".png") and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_correlation_is_minus_one_for_a_perfect_relation(tmp_path, runs):
    out = tmp_path / "corr.json"
    result = run("analyze", "correlation", *runs, "--out", out)
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["command"] == "dltest analyze correlation" and report["seed"] == [0, 1, 2]
    cells = {(c["stage"], c["characteristic"], c["attack"]): c for c in report["correlations"]}
    for stage in (1, 2, 3):
        assert cells[(stage, "entropy", "pgd")]["r"] == pytest.approx(-1.0)
        assert cells[(stage, "gini", "pgd")]["r"] == pytest.approx(-1.0)  # gini bias is 0.05 i, also linear
        assert cells[(stage, "lc", "pgd")]["r"] is None  # the same lc bias for every function
        assert cells[(stage, "entropy", "pgd")]["functions"] == sorted(METRICS)
    assert "Pearson r, bias vs robust accuracy under pgd" in result.output and "-1.00" in result.output
    assert Path(report["figure"]).read_bytes()[:4] == b"\x89PNG"
    only = tmp_path / "pgd.json"
    assert run("analyze", "correlation", *runs, "--attacks", "pgd", "--out", only, "--no-plot").exit_code == 0
    report = json.loads(only.read_text())
    assert {c["attack"] for c in report["correlations"]} == {"pgd"} and "figure" not in report
    assert not only.with_suffix(".png").exists()


def test_compare_tests_pairs_over_seeds_stages_and_attacks(tmp_path, runs):
    out = tmp_path / "cmp.json"
    result = run("analyze", "compare", *runs, "--metrics", "random,entropy,dre", "--out", out)
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["command"] == "dltest analyze compare" and report["alpha"] == 0.05 and report["seed"] == [0, 1, 2]
    first, second = report["comparisons"]
    assert (first["metric_a"], first["metric_b"], second["metric_b"]) == ("random", "entropy", "dre")
    assert first["pairs"] == 3 * 3 * 2  # seeds x stages (stage 0 left out) x attacks
    # the same test run on the folders' numbers with scipy directly
    a = [0.7 - 0.5 * (0.01 * s) if atk == "pgd" else 0.5 + 0.01 * st
         for s in (0, 1, 2) for st in (1, 2, 3) for atk in ("pgd", "square")]
    b = [0.7 - 0.5 * (0.2 + 0.01 * s) if atk == "pgd" else 0.5 + 0.01 * st - 0.04
         for s in (0, 1, 2) for st in (1, 2, 3) for atk in ("pgd", "square")]
    assert first["p_value"] == pytest.approx(stats.wilcoxon(a, b).pvalue)
    assert first["significant"] and first["verdict"].startswith("random is more robust than entropy")
    assert "Wilcoxon signed-rank" in result.output
    strict = run("analyze", "compare", *runs, "--metrics", "random,entropy", "--alpha", "1e-9", "--attacks", "pgd",
                 "--out", tmp_path / "strict.json")
    assert strict.exit_code == 0, strict.output
    [c] = json.loads((tmp_path / "strict.json").read_text())["comparisons"]
    assert c["pairs"] == 9 and not c["significant"] and c["verdict"].startswith("no significant difference")


def test_compare_two_runs_of_one_function_each(tmp_path):
    dre = write_run(tmp_path / "dre", 0, metrics=("dre",))
    gini = write_run(tmp_path / "gini", 0, metrics=("deepgini",))
    out = tmp_path / "cmp.json"
    result = run("analyze", "compare", dre, gini, "--out", out)
    assert result.exit_code == 0, result.output
    [c] = json.loads(out.read_text())["comparisons"]
    assert (c["metric_a"], c["metric_b"], c["pairs"]) == ("dre", "deepgini", 6)
    # write_run gives both the same numbers (each is the first metric of its run): no difference
    assert c["p_value"] == 1.0 and c["note"] == "every pair is equal"
    result = run("analyze", "compare", dre, gini, write_run(tmp_path / "three", 1, metrics=("random",)))
    assert result.exit_code == 2 and "the runs hold 3 metrics (dre, deepgini, random): choose with --metrics" in result.output


@pytest.mark.parametrize("args, message", [
    (["compare", "RUN", "--metrics", "dre,mcp"], "metric(s) mcp not in the runs"),
    (["compare", "RUN", "--metrics", "dre"], "at least two metrics"),
    (["compare", "RUN", "--metrics", "dre,random", "--alpha", "2"], "--alpha must lie in (0, 1)"),
    (["correlation", "RUN", "--attacks", "autoattack"], "attack(s) autoattack not in the runs"),
    (["correlation", "RUN", "RUN"], "appears twice"),
    (["bias", "RUN", "--model", "x.pt"], "--model only apply to a selection file"),
    (["bias", "MISSING"], "file not found"),
    (["correlation", "MISSING"], "is not a run folder"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, runs, args, message):
    args = [str(runs[0]) if a == "RUN" else str(tmp_path / "nope") if a == "MISSING" else a for a in args]
    out = tmp_path / "out.json"
    result = run("analyze", *args, "--out", out)
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not out.exists() and not out.with_suffix(".png").exists()


def test_malformed_run_folders_are_named(tmp_path):
    folder = write_run(tmp_path / "bad", 0)
    with open(folder / "log.jsonl", "a") as f:
        f.write('{"metric": "dre", "seed": 0}\n')
    result = run("analyze", "correlation", folder)
    assert result.exit_code == 2 and "log.jsonl:17 lacks stage, clean_accuracy, robust_accuracy" in result.output
    (folder / "config.json").write_text('{"command": "select"}')
    result = run("analyze", "correlation", folder)
    assert result.exit_code == 2 and "not from dltest robust-al" in result.output
    other = write_run(tmp_path / "fashion", 1)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "dataset": "fashion-mnist"}))
    result = run("analyze", "compare", write_run(tmp_path / "ok", 0), other, "--metrics", "dre,random")
    assert result.exit_code == 2 and "different datasets" in result.output


@pytest.mark.slow
def test_bias_of_a_selection_recomputes_it_from_model_and_pool(tmp_path):
    selection = tmp_path / "sel.json"
    made = run("select", "--metric", "entropy", "--budget", "200", "--split", "val", "--out", selection)
    assert made.exit_code == 0, made.output
    out = tmp_path / "bias.json"
    result = run("analyze", "bias", selection, "--out", out)
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["kind"] == "selection" and report["metric"] == "entropy" and report["seed"] == 0
    assert report["pool_size"] == 5000 and report["selected"] == 200 and report["bins"] == 50
    # the same numbers from the Python API
    data = load_dataset("mnist", "val")
    model, _ = load_model(dataset="mnist")
    probs = infer(model, data, embeddings=False).probs
    indices = torch.tensor(json.loads(selection.read_text())["indices"])
    assert report["bias"] == pytest.approx(selection_bias(probs, data.y, indices))
    assert report["bias"]["entropy"] > 0.5  # the 200 most uncertain of 5000: far from the pool
    assert "bias of entropy" in result.output

    # with the first selection as the labeled set, a second one is measured against the rest
    second = tmp_path / "second.json"
    assert run("select", "--metric", "random", "--budget", "300", "--split", "val", "--labeled", selection,
               "--out", second).exit_code == 0
    result = run("analyze", "bias", second, "--labeled", selection, "--out", out)
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["pool_size"] == 4800 and report["note"] is None
    assert report["bias"]["label"] < 0.05  # a random draw keeps the pool's class balance
    without = run("analyze", "bias", second, "--out", out)
    assert "left 200 labeled inputs out" in without.output
    wrong = run("analyze", "bias", selection, "--labeled", selection, "--out", out)
    assert wrong.exit_code == 2 and "not the pool it was made from" in wrong.output
    mismatch = run("analyze", "bias", selection, "--split", "test", "--out", out)
    assert mismatch.exit_code == 2 and "pool of 5000 inputs" in mismatch.output


def test_without_matplotlib_plots_are_a_one_line_error_and_no_plot_still_works(tmp_path, runs, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    out = tmp_path / "corr.json"
    result = run("analyze", "correlation", *runs, "--out", out)
    assert result.exit_code == 2 and "pip install 'dltest[plots]'" in result.output
    assert len(result.output.strip().splitlines()) == 1 and not out.exists()
    result = run("analyze", "correlation", *runs, "--out", out, "--no-plot")
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text())["correlations"]
