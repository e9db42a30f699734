"""``dltest gate`` and ``dltest export`` take a state_dict with --arch, --arch-kwargs and
--normalize, as select and evaluate do (issue 16): the client models of tests/client_nets.py,
loaded with the trained zoo LeNet-5's weights, gate and export as the zoo model does."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dltest.data import load_dataset
from tests import client_nets
from tests.client_nets import MNIST_MEAN, MNIST_STD, client_state_dict
from tests.cli_runner import run_cli as run

NETS = Path(client_nets.__file__)


@pytest.fixture(scope="module")
def client_files(trained_lenet, tmp_path_factory):
    """kind -> CLI arguments loading the trained LeNet-5's weights into a client architecture."""
    path = tmp_path_factory.mktemp("client") / "weights.pt"
    torch.save(client_state_dict(trained_lenet), path)
    return {
        "tuple": ["-m", path, "--arch", f"{NETS}:TupleNet"],
        "logits-attribute": ["-m", path, "--arch", "tests.client_nets:HFLikeNet"],
        "normalisation outside": ["-m", path, "--arch", f"{NETS}:ClientLeNet", "--arch-kwargs",
                                  '{"normalize_inside": false}', "--normalize", f"{MNIST_MEAN},{MNIST_STD}"],
    }


@pytest.mark.parametrize("kind", ["tuple", "logits-attribute", "normalisation outside"])
def test_gate_decides_a_state_dict_as_it_decides_the_zoo_checkpoint(kind, client_files, lenet_checkpoint, tmp_path):
    bars = ["--min-accuracy", "0.9", "--min-robust", "fgsm=0.05", "--eps", "0.1", "--n", "100", "--seed", "3"]
    zoo = run("gate", "-m", lenet_checkpoint, *bars, "--out", tmp_path / "zoo.json")
    client = run("gate", *client_files[kind], *bars, "--out", tmp_path / "client.json")
    assert zoo.exit_code == 0 and client.exit_code == 0, client.output
    zoo_report, client_report = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("zoo", "client"))
    figures = lambda report: {bar["name"]: (bar["correct"], bar["n"]) for bar in report["bars"]}
    (client_clean, n), (zoo_clean, _) = figures(client_report)["accuracy >= 0.9"], figures(zoo_report)["accuracy >= 0.9"]
    assert n == 100 and zoo_clean >= 90 and abs(client_clean - zoo_clean) <= 1  # the trained LeNet-5: about 96%
    client_robust, zoo_robust = figures(client_report)["fgsm >= 0.05"][0], figures(zoo_report)["fgsm >= 0.05"][0]
    assert abs(client_robust - zoo_robust) <= 5 and client_robust < client_clean


def test_gate_arch_without_a_model_file_exits_2(tmp_path):
    result = run("gate", "--arch", "lenet5", "--min-accuracy", "0.9", "--out", tmp_path / "g.json")
    assert result.exit_code == 2 and "--arch and --arch-kwargs describe a state_dict" in result.output
    assert not (tmp_path / "g.json").exists()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["tuple", "normalisation outside"])
def test_export_writes_an_onnx_model_that_predicts_as_the_zoo_model(kind, client_files, trained_lenet, tmp_path):
    from dltest.export import OnnxClassifier

    onnx_path = tmp_path / "client.onnx"
    result = run("export", *client_files[kind], "--onnx", onnx_path, "--n", "64", "--out", tmp_path / "e.json")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "e.json").read_text())
    assert report["max_abs_diff"] < 1e-4 and report["same_predictions"] == 1.0
    x = load_dataset("mnist", "test").images(slice(0, 50))
    with torch.no_grad():
        expected = torch.log_softmax(trained_lenet(x), 1)
        got = torch.log_softmax(OnnxClassifier(onnx_path)(x), 1)  # the normalisation travels inside the file
    assert torch.allclose(got, expected, atol=1e-4)
