"""ONNX: export parity on real inputs, ONNX models in select / evaluate / gate, and their limits."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from dltest.checkpoint import load_model
from dltest.data import load_dataset
from dltest.errors import DltestError
from dltest.robustness import evaluate_robustness
from dltest.selection import select
from tests.selection_checks import assert_same_selection
from tests.cli_runner import run_cli

pytest.importorskip("onnxruntime")

@pytest.fixture(scope="module")
def holdout():
    return load_dataset("mnist", "holdout")


@pytest.fixture(scope="module")
def exported(tmp_path_factory, holdout):
    from dltest.export import export_onnx

    torch_model, _ = load_model(dataset="mnist")
    path = tmp_path_factory.mktemp("onnx") / "lenet5-mnist.onnx"
    result = export_onnx(torch_model, path, holdout, n_check=1000)
    return torch_model, path, result


def test_export_parity_below_1e_4_on_real_mnist_inputs(exported):
    torch_model, path, result = exported
    assert result.passed and result.max_abs_diff < 1e-4 and result.n_checked == 1000
    assert result.same_predictions == 1.0 and result.opset is not None
    model, info = load_model(path)
    assert info.arch == "onnx" and info.dataset == "mnist" and info.input_shape == (1, 28, 28)
    assert info.num_classes == 10 and info.meta["classes"][0] == "0 - zero"
    x = load_dataset("mnist", "test").images(slice(0, 37))  # another batch size than the export's
    with torch.no_grad():
        assert (model(x) - torch_model(x)).abs().max() < 1e-4


@pytest.mark.parametrize("metric", ["margin", "entropy", "deepgini", "lc", "mcp", "dre", "random"])
def test_output_based_selection_from_onnx_equals_torch(exported, metric):
    torch_model, path, _ = exported
    pool = load_dataset("mnist", "test").subset(torch.arange(3000))
    onnx_model, _ = load_model(path)
    ours = select(metric, 150, model=onnx_model, data=pool, seed=4)
    theirs = select(metric, 150, model=torch_model, data=pool, seed=4)
    assert_same_selection(ours, theirs, context=metric)


def test_square_runs_on_onnx_and_gradient_methods_are_refused(exported, holdout):
    torch_model, path, _ = exported
    onnx_model, _ = load_model(path)
    ours = evaluate_robustness(onnx_model, holdout, ["square"], n=40, queries=100, seed=2)
    theirs = evaluate_robustness(torch_model, holdout, ["square"], n=40, queries=100, seed=2)
    assert ours.clean_correct == theirs.clean_correct
    assert abs(ours.attacks[0].robust_correct - theirs.attacks[0].robust_correct) <= 1  # logits differ by ~1e-6
    assert ours.attacks[0].robust_correct < ours.clean_correct  # the attack did something
    with pytest.raises(DltestError, match="pgd needs the model's gradients.*attacks that run on ONNX models: square"):
        evaluate_robustness(onnx_model, holdout, ["pgd"], n=10)
    for metric in ("egl", "dfal", "bald"):
        with pytest.raises(DltestError, match=f"metric '{metric}' runs the model again.*work on ONNX models: .*margin"):
            select(metric, 5, model=onnx_model, data=holdout.subset(torch.arange(50)))


@pytest.mark.slow
def test_cli_export_select_evaluate_gate(tmp_path, exported):
    torch_model, _, _ = exported
    onnx_path = tmp_path / "model.onnx"
    result = run_cli("export", "--onnx", str(onnx_path), "--n", "256", "--out", str(tmp_path / "e.json"))
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "e.json").read_text())
    assert report["command"] == "dltest export" and report["max_abs_diff"] < 1e-4 and report["n_checked"] == 256
    assert "max |logit difference|" in " ".join(result.output.split())

    a, b = tmp_path / "a.json", tmp_path / "b.json"
    assert run_cli("select", "-m", str(onnx_path), "--metric", "margin", "--budget", "50", "--out", str(a)).exit_code == 0
    assert run_cli("select", "--metric", "margin", "--budget", "50", "--out", str(b)).exit_code == 0
    assert json.loads(a.read_text())["indices"] == json.loads(b.read_text())["indices"]

    result = run_cli("evaluate", "-m", str(onnx_path), "--attacks", "pgd", "--n", "20", "--out", str(tmp_path / "ev.json"))
    assert result.exit_code == 2 and "attacks that run on ONNX models: square" in result.output
    assert not (tmp_path / "ev.json").exists()
    result = run_cli("gate", "-m", str(onnx_path), "--min-accuracy", "0.8", "--min-robust", "square=0.0",
                     "--n", "40", "--queries", "50", "--out", str(tmp_path / "g.json"))
    assert result.exit_code == 0, result.output
    gate = json.loads((tmp_path / "g.json").read_text())
    assert gate["passed"] and gate["model"] == str(onnx_path) and [b["figure"] for b in gate["bars"]] == ["accuracy", "square"]


def test_corrupt_onnx_and_bad_export_arguments_exit_2(tmp_path, exported):
    _, path, _ = exported
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(path.read_bytes()[:200])
    for args in (["gate", "-m", str(corrupt), "--min-accuracy", "0.9"], ["select", "-m", str(corrupt), "--budget", "5"]):
        result = run_cli(*args, "--out", str(tmp_path / "x.json"))
        assert result.exit_code == 2 and "cannot read ONNX file" in result.output and "Traceback" not in result.output
        assert len(result.output.strip().splitlines()) == 1
    result = run_cli("export", "--onnx", str(tmp_path / "model.pt"))
    assert result.exit_code == 2 and "must name an .onnx file" in result.output
    result = run_cli("export", "--onnx", str(tmp_path / "missing" / "m.onnx"))
    assert result.exit_code == 2 and "does not exist" in result.output
    result = run_cli("export", "--onnx", str(tmp_path / "again.onnx"), "-m", str(path))
    assert result.exit_code == 2 and "already an ONNX model" in result.output
    assert not (tmp_path / "x.json").exists() and not (tmp_path / "again.onnx").exists()


def test_missing_onnxruntime_is_a_one_line_error(exported, monkeypatch):
    _, path, _ = exported
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if not installed
    with pytest.raises(DltestError, match=r"pip install 'dltest\[onnx\]'"):
        load_model(path)


@pytest.mark.slow
def test_parity_failure_writes_nothing(tmp_path, holdout):
    from dltest.export import export_onnx

    class Drifting(torch.nn.Module):  # exports fine, but torch's outputs differ from the graph's
        def __init__(self):
            super().__init__()
            self.inner = load_model(dataset="mnist")[0]

        def forward(self, x):
            return self.inner(x) + (0.0 if torch.compiler.is_compiling() or torch.jit.is_tracing() else 0.01)

    target = tmp_path / "drift.onnx"
    with pytest.raises(DltestError, match="differs from torch"):
        export_onnx(Drifting(), target, holdout.subset(torch.arange(64)))
    assert not target.exists() and list(tmp_path.iterdir()) == []


def test_a_foreign_onnx_file_with_a_fixed_batch_of_one(tmp_path):
    """A file exported elsewhere (the legacy TorchScript exporter, batch fixed to 1, no dltest metadata)."""
    torch_model, _ = load_model(dataset="mnist")
    path = tmp_path / "foreign.onnx"
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(torch_model, (torch.zeros(1, 1, 28, 28),), str(path), dynamo=False)
    model, info = load_model(path)
    assert model.fixed_batch == 1 and info.dataset is None and info.input_shape == (1, 28, 28)
    pool = load_dataset("mnist", "test").subset(torch.arange(300))
    x = pool.images(slice(0, 7))
    with torch.no_grad():
        assert (model(x) - torch_model(x)).abs().max() < 1e-4
    assert_same_selection(select("margin", 20, model=model, data=pool), select("margin", 20, model=torch_model, data=pool))


@pytest.mark.slow
def test_an_onnx_model_that_outputs_probabilities_is_read_as_such(tmp_path, exported, holdout):
    from dltest.export import export_onnx
    from dltest.inference import infer

    torch_model, _, _ = exported

    class Softmaxed(torch.nn.Module):  # a client's export ending in softmax
        def __init__(self):
            super().__init__()
            self.inner = torch_model

        def forward(self, x):
            return torch.softmax(self.inner(x), 1)

    path = tmp_path / "probabilities.onnx"
    export_onnx(Softmaxed().eval(), path, holdout, n_check=200)
    onnx_model, _ = load_model(path)
    pool = holdout.subset(torch.arange(500))
    ours, theirs = infer(onnx_model, pool), infer(torch_model, pool)
    assert (ours.probs - theirs.probs).abs().max() < 1e-5  # not softmax applied twice
    assert_same_selection(select("entropy", 50, model=onnx_model, data=pool, seed=0),
                          select("entropy", 50, model=torch_model, data=pool, seed=0))
