"""The evaluate, attack, retrain and train --adversarial commands, run for real through Typer."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import dltest
from dltest.checkpoint import load_model
from dltest.data import load_dataset
from dltest.robustness import evaluate_robustness
from tests.cli_runner import run_cli as run


def ok(result):
    assert result.exit_code == 0, (result.output, result.stderr if hasattr(result, "stderr") else "")
    return result


def error_line(result) -> str:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.slow
def test_evaluate_json_matches_the_api(lenet_checkpoint, tmp_path):
    out = tmp_path / "ev.json"
    r = ok(run("evaluate", "-m", lenet_checkpoint, "--attacks", "pgd,fgsm", "--eps", "0.15", "--steps", "10",
               "--alpha", "0.03", "--n", "150", "--seed", "4", "--out", out))
    assert "pgd" in r.stdout and "fgsm" in r.stdout and "clean" in r.stdout
    data = json.loads(out.read_text())
    assert data["command"] == "dltest evaluate" and data["split"] == "holdout" and data["seed"] == 4
    assert data["dltest_version"] == dltest.__version__
    assert data["n"] == 150 and len(data["indices"]) == 150 and data["pool_size"] == 5000
    pgd = data["attacks"][0]
    assert pgd["attack"] == "pgd" and pgd["settings"]["eps"] == 0.15 and pgd["settings"]["steps"] == 10
    assert pgd["settings"]["alpha"] == 0.03 and pgd["settings"]["random_start"] is True
    assert data["attacks"][1]["settings"] == {k: v for k, v in data["attacks"][1]["settings"].items()}
    assert "torchattacks" in data["versions"]
    model, _ = load_model(lenet_checkpoint)
    holdout = load_dataset("mnist", "holdout")
    api = evaluate_robustness(model, holdout, ["pgd", "fgsm"], n=150, seed=4, eps=0.15, steps=10, alpha=0.03)
    assert data["clean_accuracy"] == api.clean_accuracy
    assert pgd["robust_accuracy"] == api.robust_accuracy("pgd") < data["clean_accuracy"]
    assert data["attacks"][1]["robust_accuracy"] == api.robust_accuracy("fgsm")
    worst = api.worst_case  # printed as a row of its own: robust only if it survives pgd and fgsm
    assert worst.robust_accuracy <= min(api.robust_accuracy("pgd"), api.robust_accuracy("fgsm"))
    assert "worst-case" in r.stdout and f"{worst.robust_correct}/150" in r.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["--eps", "0"], "error: eps must be in (0, 1] (inputs are in [0, 1]), got 0"),
        (["--eps", "1.5"], "error: eps must be in (0, 1] (inputs are in [0, 1]), got 1.5"),
        (["--steps", "0"], "error: steps must be an integer >= 1, got 0"),
        (["--attacks", "pgd,cw"], "error: unknown attack 'cw'; choose one of pgd, fgsm, square, autoattack, autoattack-fast, deepfool, apgd-square"),
        (["--attacks", "autoattack", "--steps", "5"], "error: --steps applies to none of the attacks autoattack"),
    ],
)
def test_evaluate_bad_input(lenet_checkpoint, tmp_path, args, message):
    out = tmp_path / "ev.json"
    line = error_line(run("evaluate", "-m", lenet_checkpoint, "--n", "20", "--out", out, *args))
    assert line == message
    assert not out.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_evaluate_warns_about_a_randomised_model(trained_lenet, tmp_path):
    class Noisy(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            out = self.inner(x)
            return out + torch.randn_like(out)

    path = tmp_path / "noisy.pt"
    torch.jit.save(torch.jit.trace(Noisy(trained_lenet).eval(), torch.rand(2, 1, 28, 28), check_trace=False), str(path))
    r = ok(run("evaluate", "-m", path, "--attacks", "fgsm", "--n", "30", "--out", tmp_path / "ev.json"))
    assert "warning: the model's outputs change between two calls" in r.stderr
    assert "outputs change" in json.loads((tmp_path / "ev.json").read_text())["warnings"][0]


@pytest.mark.slow
def test_attack_writes_a_reusable_npz_and_retrain_uses_it(lenet_checkpoint, tmp_path):
    sel = tmp_path / "sel.json"
    ok(run("select", "-m", lenet_checkpoint, "--split", "val", "--metric", "entropy", "--budget", "40", "--out", sel))
    adv = tmp_path / "adv.npz"
    r = ok(run("attack", "-m", lenet_checkpoint, "--selection", sel, "--eps", "0.2", "--steps", "5", "--alpha", "0.05",
               "--out", adv))
    assert "attack success" in r.stdout
    with np.load(adv) as f:
        x, y, idx, src = f["x"], f["y"], f["indices"], f["source_index"]
        meta = json.loads(str(f["meta"]))
    chosen = json.loads(sel.read_text())["indices"]
    val = load_dataset("mnist", "val")
    assert x.shape == (40, 28, 28, 1) and x.dtype == np.float32 and idx.tolist() == chosen
    assert y.tolist() == val.y[chosen].tolist() and src.tolist() == val.source_index[chosen].tolist()
    clean = val.images(torch.tensor(chosen)).permute(0, 2, 3, 1).numpy()
    assert np.abs(x - clean).max() <= 0.2 + 1e-6
    assert meta["attack"]["eps"] == 0.2 and meta["split"] == "val" and meta["metric"] == "entropy"
    summary = json.loads(adv.with_suffix(".json").read_text())
    assert summary["n"] == 40 and summary["robust_accuracy"] < summary["clean_accuracy"]
    assert (summary["command"], summary["dltest_version"]) == ("dltest attack", dltest.__version__) and "seed" in summary

    out, report = tmp_path / "re.pt", tmp_path / "re.json"
    ok(run("retrain", "-m", lenet_checkpoint, "--examples", adv, "--train-size", "500", "--epochs", "1",
           "--eval-n", "60", "--eval-eps", "0.2", "--eval-steps", "5", "--val-n", "30", "--out", out,
           "--report", report))
    data = json.loads(report.read_text())
    assert data["settings"]["examples_file"] == str(adv) and data["adversarial_examples"]["n"] == 40
    assert data["selection"] is None and data["settings"]["attack"]["eps"] == 0.2
    assert (data["command"], data["dltest_version"], data["seed"]) == ("dltest retrain", dltest.__version__, 0)


def test_attack_refuses_a_selection_from_another_dataset(lenet_checkpoint, tmp_path):
    sel = tmp_path / "sel.json"
    ok(run("select", "-m", lenet_checkpoint, "--split", "val", "--metric", "random", "--budget", "5", "--out", sel))
    sel.write_text(json.dumps({**json.loads(sel.read_text()), "dataset": "fashion-mnist"}))
    out = tmp_path / "adv.npz"
    line = error_line(run("attack", "-m", lenet_checkpoint, "--selection", sel, "--out", out))
    assert line == f"error: {sel} selects from dataset 'fashion-mnist', not 'mnist'"
    assert not out.exists()
    assert error_line(run("attack", "-m", lenet_checkpoint, "--attack", "nope", "--out", out)).startswith(
        "error: unknown attack 'nope'")


@pytest.mark.slow
def test_retrain_end_to_end(lenet_checkpoint, tmp_path):
    out, report = tmp_path / "re.pt", tmp_path / "re.json"
    r = ok(run("retrain", "-m", lenet_checkpoint, "--metric", "dre", "--budget", "60", "--train-size", "800",
               "--epochs", "1", "--eps", "0.2", "--steps", "3", "--alpha", "0.08", "--eval-n", "80",
               "--eval-eps", "0.2", "--eval-steps", "5", "--val-n", "40", "--seed", "1", "--out", out,
               "--report", report))
    assert "before" in r.stdout and "after" in r.stdout
    data = json.loads(report.read_text())
    s = data["settings"]
    assert s["metric"] == "dre" and s["budget"] == 60 and s["pool_split"] == "val" and s["holdout_split"] == "holdout"
    assert s["seed"] == 1 and s["train_size"] == 800 and s["eval_n"] == 80 and s["config"]["epochs"] == 1
    assert s["attack"] == {**s["attack"], "name": "pgd", "eps": 0.2, "steps": 3, "alpha": 0.08}
    assert s["eval_attacks"][0]["eps"] == 0.2 and s["eval_attacks"][0]["steps"] == 5
    assert len(data["selection"]["indices"]) == 60 and data["selection"]["split"] == "val"
    for part in ("before", "after"):
        assert 0 <= data[part]["robust_accuracy"]["pgd"] <= data[part]["clean_accuracy"] <= 1
    assert data["gain"]["clean_accuracy"] == pytest.approx(data["after"]["clean_accuracy"] - data["before"]["clean_accuracy"])
    model, info = load_model(out)
    assert info.arch == "lenet5" and info.meta["command"] == "dltest retrain"
    assert not (tmp_path / "re.pt.partial").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--pool-split", "holdout"], "error: --pool-split must be one of val, train (disjoint from the holdout half), got 'holdout'"),
        (["--eps", "2"], "error: eps must be in (0, 1] (inputs are in [0, 1]), got 2"),
        (["--steps", "0"], "error: steps must be an integer >= 1, got 0"),
        (["--attack", "foo"], "error: unknown attack 'foo'; choose one of pgd, fgsm, square, autoattack, autoattack-fast, deepfool, apgd-square"),
        (["--metric", "nope"], None),
    ],
)
def test_retrain_bad_input(lenet_checkpoint, tmp_path, args, message):
    out = tmp_path / "re.pt"
    line = error_line(run("retrain", "-m", lenet_checkpoint, "--out", out, *args))
    if message:
        assert line == message
    else:
        assert line.startswith("error: ") and "nope" in line
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_train_adversarial(tmp_path):
    out = tmp_path / "adv.pt"
    r = ok(run("train", "--adversarial", "--train-size", "2000", "--epochs", "1", "--eps", "0.2", "--steps", "2",
               "--alpha", "0.1", "--out", out))
    assert "robust" in r.stdout
    data = json.loads(out.with_suffix(".json").read_text())
    assert data["adversarial"]["eps"] == 0.2 and data["adversarial"]["steps"] == 2
    assert "val_robust_accuracy" in data["history"][0]
    assert data["best_score"] == data["history"][0]["val_robust_accuracy"]
    assert 0 <= data["holdout_robust_accuracy"] <= data["holdout_accuracy"]
    _, info = load_model(out)
    assert info.meta["adversarial"]["method"] == "pgd"
    line = error_line(run("train", "--eps", "0.1", "--out", tmp_path / "x.pt"))
    assert line == "error: --eps, --steps, --alpha, --warmup-epochs and --beta set adversarial training: add --at METHOD"
