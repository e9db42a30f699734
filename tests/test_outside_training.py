"""Training paths read an outside model's scores through the inference adapter (issue 16).

The trainer trains the user's own module but reads logits as inference does, so a model that
returns a tuple, an object with ``.logits``, or a TorchScript tuple trains, retrains and runs
robust active learning, and learns: known answers against untrained (about 10%) accuracy.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dltest.attacks import attack_preset
from dltest.data import load_dataset
from dltest.inference import ModelAdapter, adapt
from dltest.training import TrainConfig, accuracy, train
from dltest.workflows.retrain import retrain
from dltest.workflows.robust_al import RobustALConfig, robust_active_learning
from tests.client_nets import ClientLeNet, HFLikeNet, TupleNet
from tests.cli_runner import run_cli

NETS = Path(__file__).with_name("client_nets.py")


@pytest.fixture(scope="module")
def splits(mnist_train_slice):
    pool = load_dataset("mnist", "val").subset(torch.arange(200), split="val")
    holdout = load_dataset("mnist", "holdout").subset(torch.arange(200), split="holdout")
    return mnist_train_slice.subset(torch.arange(1000)), pool, holdout


def untrained(cls: type[ClientLeNet]) -> ClientLeNet:
    torch.manual_seed(0)
    return cls().eval()


def traced_tuple(probe: torch.Tensor) -> torch.jit.ScriptModule:
    return torch.jit.trace(untrained(TupleNet), probe)


def test_a_copied_adapter_stays_an_adapter_around_a_copy(splits):
    import copy

    _, pool, _ = splits
    adapter = adapt(traced_tuple(pool.images(slice(0, 2))), pool.images(slice(0, 8)))
    copied = copy.deepcopy(adapter)  # __deepcopy__ is the adapter's, not the wrapped TorchScript module's
    assert isinstance(copied, ModelAdapter) and copied.model is not adapter.model
    assert isinstance(copied(pool.images(slice(0, 4))), torch.Tensor)


@pytest.mark.parametrize("cls", [TupleNet, HFLikeNet], ids=["tuple", "logits-attribute"])
def test_train_learns_a_model_whose_forward_is_not_a_tensor(cls, splits):
    train_data, pool, _ = splits
    model = untrained(cls)
    before = accuracy(model, pool)
    result = train(model, train_data, pool, TrainConfig(epochs=2, optimizer="adam", lr=5e-3, seed=0), progress=False)
    assert result.model is model and type(model) is cls  # the user's module is trained and handed back
    after = accuracy(model, pool)
    assert before < 0.25 and after > 0.6, (before, after)
    assert result.history[result.best_epoch]["val_accuracy"] == pytest.approx(after, abs=0.01)  # the best epoch kept


def retrain_figures(model, splits) -> dict:
    train_data, pool, holdout = splits
    result = retrain(model, train_data=train_data, pool=pool, holdout=holdout, metric="margin", budget=20,
                     attack=attack_preset("fgsm", "mnist", "train"),
                     eval_attacks=[attack_preset("fgsm", "mnist", "eval")],
                     config=TrainConfig(epochs=2, optimizer="adam", lr=5e-3, seed=0), val_n=100)
    return result.to_dict()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["tuple", "logits-attribute", "torchscript-tuple"])
def test_retrain_improves_outside_models_as_it_improves_the_same_plain_model(kind, splits):
    _, pool, _ = splits
    model = {"tuple": lambda: untrained(TupleNet), "logits-attribute": lambda: untrained(HFLikeNet),
             "torchscript-tuple": lambda: traced_tuple(pool.images(slice(0, 2)))}[kind]()
    got = retrain_figures(model, splits)
    plain = retrain_figures(untrained(ClientLeNet), splits)  # same weights, forward returns the logits
    before, after = got["before"]["clean_accuracy"], got["after"]["clean_accuracy"]
    assert before < 0.25 and after > before + 0.25, (before, after)
    assert after == pytest.approx(plain["after"]["clean_accuracy"], abs=0.03)


@pytest.mark.slow
def test_retrain_cli_on_a_torchscript_tuple_model(splits, tmp_path):
    _, pool, _ = splits
    path = tmp_path / "traced-tuple.pt"
    torch.jit.save(traced_tuple(pool.images(slice(0, 2))), str(path))
    out = tmp_path / "retrained.pt"
    result = run_cli(
        "retrain", "-m", path, "--metric", "margin", "--budget", "16", "--attack", "fgsm", "--eval-attacks", "fgsm",
        "--eval-n", "100", "--val-n", "100", "--epochs", "3", "--lr", "0.1",
        "--train-size", "2000", "--out", out)
    assert result.exit_code == 0, result.output
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["after"]["clean_accuracy"] > report["before"]["clean_accuracy"] + 0.25, report["after"]
    from dltest.checkpoint import load_model

    model, info = load_model(out)
    assert info.kind == "torchscript"
    untrained_accuracy = accuracy(torch.jit.load(str(path)), pool)
    assert accuracy(model, pool) > untrained_accuracy + 0.2, untrained_accuracy  # the file holds the trained model


def tiny(arch: str) -> RobustALConfig:
    return RobustALConfig(dataset="mnist", metrics=("entropy",), budget=220, initial=200, per_stage=20, epochs=1,
                          initial_epochs=6, at="fgsm-rs", eval_n=100, val_n=100, check_steps=2, seed=0, arch=arch)


@pytest.mark.slow
@pytest.mark.parametrize("cls", ["TupleNet", "HFLikeNet"], ids=["tuple", "logits-attribute"])
def test_robust_al_trains_an_outside_architecture(cls, mnist_train_slice, tmp_path):
    val = load_dataset("mnist", "val").subset(torch.arange(300))
    holdout = load_dataset("mnist", "holdout").subset(torch.arange(300))
    data = dict(train_data=mnist_train_slice.subset(torch.arange(3000)), val_data=val, holdout=holdout, device="cpu")
    got = robust_active_learning(tiny(f"{NETS}:{cls}"), run_dir=tmp_path / "run", **data)
    plain = robust_active_learning(tiny(f"{NETS}:ClientLeNet"), **data)
    records, expected = got.records["entropy"], plain.records["entropy"]
    assert [r.labeled for r in records] == [200, 220]
    assert records[0].clean_accuracy > 0.5  # trained from scratch on 200 images: far above chance (10%)
    for r, e in zip(records, expected):
        assert r.clean_accuracy == pytest.approx(e.clean_accuracy, abs=0.03)
    assert type(got.models["entropy"]).__name__ == cls and (tmp_path / "run" / "entropy.pt").is_file()
