"""Models dltest did not make, as users bring them: every kind through select (every metric),
evaluate, attack and retrain, giving the same answers as the equivalent zoo model.

The client models (tests/client_nets.py) are LeNet-5 written the users' ways and loaded with the
weights of the trained zoo LeNet-5, so each must predict, select and evaluate exactly as it does.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dltest.checkpoint import load_model
from dltest.errors import DltestError
from dltest.inference import ModelAdapter, adapt, detect_output_kind, infer, parse_normalize
from dltest.selection import select
from dltest.selectors import REGISTRY
from tests import client_nets
from tests.selection_checks import assert_same_selection
from tests.client_nets import KINDS, MNIST_MEAN, MNIST_STD, ClientLeNet, client_state_dict
from tests.cli_runner import run_cli as run

NETS = Path(client_nets.__file__)
POOL = 30  # pool inputs for the selections
BUDGET = 4


def ok(result):
    assert result.exit_code == 0, (result.output, getattr(result, "stderr", ""))
    return result


@pytest.fixture(scope="module")
def pool(mnist_test):
    return mnist_test.subset(torch.arange(POOL))


@pytest.fixture(scope="module")
def pool_file(pool, tmp_path_factory):
    path = tmp_path_factory.mktemp("pool") / "pool.npz"
    np.savez(path, x=pool.x[:, 0].numpy(), y=pool.y.numpy())
    return path


@pytest.fixture(scope="module")
def client_models(trained_lenet):
    """kind -> the client model with the zoo LeNet-5's weights; plus normalisation outside and TorchScript."""
    weights = client_state_dict(trained_lenet)
    models = {}
    for kind, cls in KINDS.items():
        models[kind] = cls().eval()
        models[kind].load_state_dict(weights)
    outside = ClientLeNet(normalize_inside=False).eval()
    outside.load_state_dict(weights)
    models["normalisation outside"] = ModelAdapter(outside, normalize=(MNIST_MEAN, MNIST_STD))
    models["torchscript"] = torch.jit.script(trained_lenet)
    return models


@pytest.fixture(scope="module")
def model_files(trained_lenet, client_models, tmp_path_factory):
    """kind -> CLI arguments that load it from a file."""
    folder = tmp_path_factory.mktemp("client-models")
    weights = client_state_dict(trained_lenet)
    files = {}
    for kind, cls in KINDS.items():
        path = folder / f"{kind}.pt"
        torch.save(weights, path)
        files[kind] = ["-m", path, "--arch", f"{NETS}:{cls.__name__}"]
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in weights.items()}}, folder / "ddp.pt")
    files["state_dict under a key, DataParallel names, module:Class"] = [
        "-m", folder / "ddp.pt", "--arch", "tests.client_nets:ClientLeNet"]
    files["normalisation outside"] = ["-m", folder / "logits.pt", "--arch", f"{NETS}:ClientLeNet",
                                      "--arch-kwargs", '{"normalize_inside": false}',
                                      "--normalize", f"{MNIST_MEAN},{MNIST_STD}"]
    torch.save(trained_lenet.state_dict(), folder / "zoo-weights.pt")
    files["state_dict of a zoo architecture"] = ["-m", folder / "zoo-weights.pt", "--arch", "lenet5"]
    torch.jit.save(client_models["torchscript"], str(folder / "scripted.pt"))
    files["torchscript"] = ["-m", folder / "scripted.pt"]
    return files


# --- the adapter ------------------------------------------------------------------------------


def test_output_kinds_are_detected_on_hand_made_rows():
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.1, 0.2, 0.3]])
    assert detect_output_kind(logits) == "logits"
    assert detect_output_kind(torch.softmax(logits, 1)) == "probabilities"
    assert detect_output_kind(torch.log_softmax(logits, 1)) == "log-probabilities"
    assert detect_output_kind(torch.tensor([[0.5, 0.4], [0.3, 0.3]])) == "logits"  # rows do not sum to 1
    assert detect_output_kind(torch.tensor([[-0.1, -0.2], [-1.0, -2.0]])) == "logits"  # exp rows do not sum to 1


def test_normalize_specs():
    assert parse_normalize("0.5,0.25") == ((0.5,), (0.25,))
    assert parse_normalize("0.4,0.5,0.6,0.2,0.3,0.4", channels=3) == ((0.4, 0.5, 0.6), (0.2, 0.3, 0.4))
    assert parse_normalize("imagenet") == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert parse_normalize(([0.5], [0.25])) == ((0.5,), (0.25,))
    for bad in ("0.5", "a,b", "0.5,0", "0.5,-1", "1,2,3"):
        with pytest.raises(DltestError):
            parse_normalize(bad)
    with pytest.raises(DltestError, match="3 channels"):
        parse_normalize("0.1,0.2,0.3,0.4", channels=3)


@pytest.mark.parametrize("kind, outputs, embeddings", [
    ("logits", "logits", "the input of layer 'fc3'"),
    ("tuple", "logits", "the input of layer 'fc3'"),
    ("dict", "logits", "the input of layer 'fc3'"),
    ("hf-like", "logits", "the input of layer 'fc3'"),
    ("probabilities", "probabilities", "the input of layer 'fc3'"),
    ("log-probabilities", "log-probabilities", "the input of layer 'fc3'"),
    ("timm-like", "logits", "forward_head(forward_features(x), pre_logits=True)"),
    ("normalisation outside", "logits", "the input of layer 'fc3'"),
    ("torchscript", "logits", "the model's embed()"),
])
def test_every_kind_gives_the_zoo_models_scores_and_embeddings(kind, outputs, embeddings, client_models,
                                                                trained_lenet, pool):
    model = adapt(client_models[kind], pool.images(slice(0, 8)))
    assert isinstance(model, ModelAdapter)
    assert model.output_kind == outputs and model.embedding_source == embeddings
    assert model.head is not None  # the scores are head(embeddings): MC dropout may sample the head alone
    x = pool.images()
    with torch.no_grad():
        expected = trained_lenet(x)
        got = model(x)
        assert torch.allclose(torch.log_softmax(got, 1), torch.log_softmax(expected, 1), atol=1e-5)
        assert torch.allclose(model.embed(x), trained_lenet.embed(x), atol=1e-5)
    out = infer(model, pool)
    assert torch.allclose(out.probs, torch.softmax(expected, 1), atol=1e-6)


def test_probabilities_are_never_softmaxed_twice(client_models, pool):
    probs_model = client_models["probabilities"]
    with torch.no_grad():
        own = probs_model(pool.images())
    out = infer(probs_model, pool)
    assert torch.allclose(out.probs, own, atol=1e-6)  # softmax once: the model's own probabilities
    assert not torch.allclose(out.probs, torch.softmax(own, 1), atol=1e-3)  # what a second softmax gives


def test_the_normalised_wrapper_predicts_as_the_model_with_normalisation_inside(trained_lenet, client_models, pool):
    x = pool.images()
    wrapped = client_models["normalisation outside"]
    with torch.no_grad():
        assert torch.allclose(wrapped(x), trained_lenet(x), atol=1e-5)
        top2 = trained_lenet(x).topk(2, dim=1).values
        clear = top2[:, 0] - top2[:, 1] > 1e-4  # two codes: the argmax may differ only at a near-tie
        assert clear.float().mean() > 0.95 and torch.equal(wrapped(x).argmax(1)[clear], trained_lenet(x).argmax(1)[clear])
        # without the wrapper the same weights see unnormalised pixels: other scores
        assert not torch.allclose(wrapped.model(x), trained_lenet(x), atol=0.1)


@pytest.mark.slow
def test_every_metric_selects_the_same_inputs_from_every_kind(client_models, trained_lenet, pool, mnist_train_slice):
    reference = mnist_train_slice.subset(torch.arange(300))  # the training data the surprise metrics compare with
    for metric in sorted(REGISTRY):
        data = pool.subset(torch.arange(12)) if metric in ("egl", "dfal") else pool  # the two slow ones: fewer inputs
        extra = {"reference": reference} if REGISTRY[metric].needs_reference else {}
        expected = select(metric, BUDGET, model=trained_lenet, data=data, seed=1, **extra)
        for kind, model in client_models.items():
            got = select(metric, BUDGET, model=model, data=data, seed=1, **extra)
            assert_same_selection(got, expected, rel=1e-4, abs=1e-6, context=(metric, kind))


def test_a_traced_torchscript_model_without_embeddings(trained_lenet, pool):
    traced = torch.jit.trace(trained_lenet, pool.images(slice(0, 2)))
    # exact EGL has a way through TorchScript: per-sample Jacobians from one batched backward pass
    few = pool.subset(torch.arange(12))
    got, expected = (select("egl", BUDGET, model=m, data=few, seed=0) for m in (traced, trained_lenet))
    assert_same_selection(got, expected, rel=1e-5)
    for metric in ("coreset", "badge"):  # every metric that needs embeddings says the same, once, in select()
        with pytest.raises(DltestError, match=rf"{metric}: no penultimate embeddings: this TorchScript model has no `embed`"):
            select(metric, BUDGET, model=traced, data=pool)
    with pytest.raises(DltestError, match=r"badge: pass the model, or outputs with embeddings"):
        select("badge", BUDGET, outputs=infer(traced, pool))
    assert select("dropout-entropy", BUDGET, model=traced, data=pool, seed=0).budget == BUDGET  # input dropout


def test_a_model_with_no_linear_layer_and_no_embed_says_what_to_pass(pool):
    class Pixels(torch.nn.Module):  # a "model" scoring 10 classes from pooled pixels
        def forward(self, x):
            return torch.nn.functional.adaptive_avg_pool2d(x, (2, 5)).flatten(1)

    with pytest.raises(DltestError, match="give it an `embed\\(x\\)` method"):
        select("coreset", BUDGET, model=Pixels(), data=pool)
    assert len(select("margin", BUDGET, model=Pixels(), data=pool).indices) == BUDGET


# --- the commands -----------------------------------------------------------------------------


@pytest.mark.slow
def test_select_through_the_cli_for_every_model_file(model_files, pool_file, lenet_checkpoint, tmp_path,
                                                     mnist_train_slice):
    reference = tmp_path / "reference.npz"
    np.savez(reference, x=mnist_train_slice.x[:300, 0].numpy(), y=mnist_train_slice.y[:300].numpy())
    metrics = sorted(REGISTRY)
    expected = {}
    kinds = list(model_files.items())
    assert len(metrics) >= len(kinds)
    for i, metric in enumerate(metrics):  # every metric through the CLI, every kind of file at least once
        kind, args = kinds[i % len(kinds)]
        extra = ["--reference", reference] if REGISTRY[metric].needs_reference else []
        if metric not in expected:
            ok(run("select", "-d", pool_file, "-m", lenet_checkpoint, "--metric", metric, "-b", BUDGET, *extra,
                   "--out", tmp_path / f"zoo-{metric}.json"))
            expected[metric] = json.loads((tmp_path / f"zoo-{metric}.json").read_text())["indices"]
        out = tmp_path / f"{i}.json"
        result = ok(run("select", "-d", pool_file, *args, "--metric", metric, "-b", BUDGET, *extra, "--out", out))
        data = json.loads(out.read_text())
        assert data["indices"] == expected[metric], (kind, metric)
        info = data["model_info"]
        assert info["outputs"] == ("probabilities" if kind == "probabilities" else
                                   "log-probabilities" if kind == "log-probabilities" else "logits")
        if info["outputs"] != "logits":
            assert f"outputs {info['outputs']}: dltest reads them as such" in result.stderr
        assert info["kind"] == ("torchscript" if kind == "torchscript" else "state_dict")


@pytest.mark.parametrize("kind", ["tuple", "hf-like", "probabilities", "normalisation outside", "torchscript",
                                  "timm-like"])
def test_evaluate_and_attack_give_the_zoo_models_figures(kind, model_files, lenet_checkpoint, tmp_path):
    common = ["--attacks", "fgsm", "--eps", "0.2", "--n", "40", "--seed", "2"]
    ok(run("evaluate", "-m", lenet_checkpoint, *common, "--out", tmp_path / "zoo.json"))
    ok(run("evaluate", *model_files[kind], *common, "--out", tmp_path / "client.json"))
    zoo, client = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("zoo", "client"))
    assert client["clean_accuracy"] == zoo["clean_accuracy"] > 0.8
    assert client["attacks"][0]["robust_accuracy"] == pytest.approx(zoo["attacks"][0]["robust_accuracy"], abs=0.05)
    assert client["attacks"][0]["robust_accuracy"] < client["clean_accuracy"]

    selection = tmp_path / "sel.json"
    selection.write_text(json.dumps({"indices": [0, 5, 9, 14], "dataset": "mnist", "split": "val"}))
    ok(run("attack", *model_files[kind], "--selection", selection, "--attack", "fgsm", "--eps", "0.25",
           "--out", tmp_path / "adv.npz"))
    with np.load(tmp_path / "adv.npz") as f:
        assert f["x"].shape == (4, 28, 28, 1) and list(f["indices"]) == [0, 5, 9, 14]
        assert f["x"].min() >= 0 and f["x"].max() <= 1


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["torchscript", "probabilities", "normalisation outside"])
def test_retrain_works_on_outside_models(kind, model_files, tmp_path):
    out = tmp_path / "retrained.pt"
    ok(run("retrain", *model_files[kind], "--metric", "margin", "--budget", "16", "--attack", "fgsm",
           "--eval-attacks", "fgsm", "--eval-n", "30", "--val-n", "30", "--epochs", "1", "--train-size", "200",
           "--out", out))
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["adversarial_examples"]["n"] == 16 and report["settings"]["model_info"]["outputs"] in (
        "logits", "probabilities")
    given = model_files[kind]
    arch = given[given.index("--arch") + 1] if "--arch" in given else None  # a module:Class must be named
    model, info = load_model(out, arch=arch)
    assert info.kind == ("torchscript" if kind == "torchscript" else "dltest-checkpoint")
    if kind == "normalisation outside":
        assert info.normalize == ((MNIST_MEAN,), (MNIST_STD,))  # kept with the retrained weights
        assert isinstance(model, ModelAdapter) and model.normalization == info.normalize


def test_retrain_copies_a_torchscript_model_into_leaf_parameters(client_models):
    from dltest.checkpoint import copy_model

    scripted = client_models["torchscript"]
    copied = copy_model(scripted)
    assert all(p.is_leaf and p.requires_grad for p in copied.parameters())
    torch.optim.SGD(copied.parameters(), lr=0.1)  # the retrain failure: "can't optimize a non-leaf Tensor"
    with torch.no_grad():
        next(iter(copied.parameters())).add_(1.0)
    assert not torch.equal(next(iter(copied.parameters())), next(iter(scripted.parameters())))


def test_a_pickled_module_needs_trust_model(trained_lenet, pool_file, tmp_path):
    path = tmp_path / "pickled.pt"
    torch.save(ClientLeNet().eval(), path)
    result = run("select", "-d", pool_file, "-m", path, "--metric", "margin", "-b", 4, "--out", tmp_path / "s.json")
    assert result.exit_code == 2 and "--trust-model" in result.stderr
    assert not (tmp_path / "s.json").exists()
    ok(run("select", "-d", pool_file, "-m", path, "--trust-model", "--metric", "margin", "-b", 4,
           "--out", tmp_path / "s.json"))
