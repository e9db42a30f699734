"""Zoo models, checkpoints (safe loading, TorchScript, misfits) and the one inference pass."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dltest.checkpoint import check_fits, load_model, pretrained_datasets, read_checkpoint, save_checkpoint
from dltest.errors import DltestError
from dltest.inference import PoolOutputs, infer
from dltest.training import accuracy
from dltest.zoo import ARCHITECTURES, build_model


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_every_architecture_gives_logits_and_its_embedding(arch):
    shape = (1, 28, 28) if arch == "lenet5" else (3, 32, 32)
    model = build_model(arch, 10, shape).eval()
    x = torch.rand(3, *shape)
    with torch.no_grad():
        z = model.embed(x)
        assert torch.allclose(model.head(z), model(x), atol=1e-6)
    assert z.shape == (3, 84 if arch == "lenet5" else 512)


def test_normalisation_lives_in_the_model():
    model = build_model("lenet5", 10, (1, 28, 28), mean=(0.5,), std=(0.25,)).eval()
    x = torch.rand(2, 1, 28, 28)
    with torch.no_grad():
        expected = model.head(model.features((x - 0.5) / 0.25))
        assert torch.allclose(model(x), expected)


def test_checkpoint_round_trip_carries_everything(trained_lenet, lenet_checkpoint, mnist_test):
    state = read_checkpoint(lenet_checkpoint)
    assert state["arch"] == "lenet5" and state["input_shape"] == [1, 28, 28] and state["num_classes"] == 10
    assert state["mean"] == pytest.approx([0.1307]) and state["meta"] == {"note": "test fixture"}
    model, info = load_model(lenet_checkpoint)
    x = mnist_test.images(slice(0, 64))
    with torch.no_grad():
        assert torch.equal(model(x), trained_lenet(x))
    assert info.dataset == "mnist" and not model.training


def test_the_fixture_model_really_learned(trained_lenet, mnist_test):
    assert accuracy(trained_lenet, mnist_test.subset(torch.arange(2000))) > 0.93


def test_pickled_modules_need_an_explicit_opt_in(tmp_path, trained_lenet):
    path = tmp_path / "pickled.pt"
    torch.save(trained_lenet, path)
    with pytest.raises(DltestError, match="pass trust=True only for a file you made"):
        load_model(path)
    model, _ = load_model(path, trust=True)
    assert isinstance(model, nn.Module)


def test_torchscript_files_load(tmp_path, trained_lenet, mnist_test):
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.trace(trained_lenet, torch.rand(1, 1, 28, 28)), str(path))
    model, info = load_model(path)
    x = mnist_test.images(slice(0, 8))
    with torch.no_grad():
        assert torch.allclose(model(x), trained_lenet(x), atol=1e-5)
    out = infer(model, mnist_test.subset(torch.arange(8)))
    assert out.embeddings is None and out.logits.shape == (8, 10)


def test_missing_corrupt_and_foreign_model_files(tmp_path, trained_lenet):
    with pytest.raises(DltestError, match="model file not found"):
        load_model(tmp_path / "nope.pt")
    (tmp_path / "corrupt.pt").write_bytes(b"\x00garbage")
    with pytest.raises(DltestError, match="cannot read"):
        load_model(tmp_path / "corrupt.pt")
    torch.save(trained_lenet.state_dict(), tmp_path / "bare.pt")
    with pytest.raises(DltestError, match="bare state_dict: pass its architecture as arch="):
        load_model(tmp_path / "bare.pt")


def test_a_model_that_does_not_fit_the_data_is_refused(tmp_path, mnist_test):
    colour = build_model("vgg8", 10, (3, 32, 32))
    path = save_checkpoint(colour, tmp_path / "vgg.pt", arch="vgg8", dataset="cifar10", input_shape=(3, 32, 32), num_classes=10)
    model, info = load_model(path)
    with pytest.raises(DltestError, match=r"takes inputs of shape \(3, 32, 32\)"):
        check_fits(model, mnist_test, info)
    five = build_model("lenet5", 5, (1, 28, 28))
    with pytest.raises(DltestError, match="outputs 5 classes, but mnist has 10"):
        check_fits(five, mnist_test)


def test_bundled_models_are_found():
    assert {"mnist", "fashion-mnist"} <= set(pretrained_datasets())
    model, info = load_model(dataset="mnist")
    assert info.meta["holdout_accuracy"] > 0.985
    assert info.meta["command"].startswith("dltest train")


def test_one_pass_gives_logits_probs_and_embeddings(trained_lenet, mnist_test):
    pool = mnist_test.subset(torch.arange(700))
    out = infer(trained_lenet, pool, batch_size=256)
    x = pool.images()
    with torch.no_grad():
        assert torch.allclose(out.logits, trained_lenet(x), atol=1e-5)
        assert torch.allclose(out.embeddings, trained_lenet.embed(x), atol=1e-5)
    assert torch.allclose(out.probs.sum(1), torch.ones(700))
    assert torch.equal(out.predictions, out.logits.argmax(1))


def test_outputs_from_probabilities():
    probs = torch.tensor([[0.2, 0.8], [1.0, 0.0]])
    out = PoolOutputs.from_probs(probs)
    assert torch.equal(out.probs, probs) and out.predictions.tolist() == [1, 0]


def test_bundled_models_carry_the_digest_their_cards_give():
    import hashlib

    from dltest.checkpoint import read_checkpoint, state_digest, _digest_header
    from tests.conftest import REPO

    for path in sorted((REPO / "models").glob("*.pt")):
        state = read_checkpoint(path)
        assert state["digest"] == state_digest(state["state_dict"], _digest_header(state)), path.name
        card = path.with_suffix(".md").read_text()
        assert state["digest"] in card and hashlib.sha256(path.read_bytes()).hexdigest() in card, path.name
