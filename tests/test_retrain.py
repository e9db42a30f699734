"""Section 8 retraining: adversarial examples of a selection, the .npz round trip, robustness gain."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from dltest.attacks import attack_preset
from dltest.data import load_dataset, load_npz
from dltest.errors import DltestError
from dltest.attacks import generate_adversarial, load_adversarial, with_examples
from dltest.workflows.retrain import retrain
from dltest.training import TrainConfig


@pytest.fixture(scope="module")
def pool():
    return load_dataset("mnist", "val").subset(torch.arange(1000), split="val")


@pytest.fixture(scope="module")
def holdout():
    return load_dataset("mnist", "holdout").subset(torch.arange(300), split="holdout")


FAST_PGD = dict(eps=0.2, steps=5, alpha=0.05)


def test_adversarial_examples_and_npz_round_trip(trained_lenet, pool, tmp_path):
    spec = attack_preset("pgd", "mnist", "train", **FAST_PGD)
    idx = [5, 17, 3, 400, 999]
    ex = generate_adversarial(trained_lenet, pool, idx, spec, seed=0)
    x = pool.images(torch.tensor(idx))
    assert ex.indices.tolist() == idx and ex.y.tolist() == pool.y[idx].tolist()
    assert ex.source_index.tolist() == pool.source_index[idx].tolist()
    assert float((ex.x - x).abs().max()) <= 0.2 + 1e-6 and ex.x.min() >= 0 and ex.x.max() <= 1
    logits = trained_lenet(ex.x)
    top2 = logits.topk(2, dim=1).values
    clear = (top2[:, 0] - top2[:, 1]) > 1e-4  # adversarial examples sit near the boundary: compare clear cases
    assert torch.equal(ex.adv_pred[clear], logits.argmax(1)[clear])
    again = generate_adversarial(trained_lenet, pool, idx, spec, seed=0)
    assert torch.equal(ex.x, again.x)  # seeded

    path = ex.save(tmp_path / "adv.npz")
    back = load_adversarial(path, pool)
    assert torch.equal(back.x, ex.x) and torch.equal(back.y, ex.y) and torch.equal(back.indices, ex.indices)
    assert back.attack["eps"] == 0.2 and back.dataset == "mnist" and back.split == "val"
    as_data = load_npz(path)  # any dltest command can read it as a data file
    assert as_data.input_shape == (1, 28, 28) and torch.allclose(as_data.images(), ex.x)

    other = load_dataset("fashion-mnist", "val")
    with pytest.raises(DltestError, match="adversarial examples of 'mnist', not 'fashion-mnist'"):
        load_adversarial(path, other)
    np.savez(tmp_path / "plain.npz", x=np.zeros((2, 28, 28), np.uint8), y=np.zeros(2, np.int64))
    with pytest.raises(DltestError, match="not a dltest adversarial-examples file"):
        load_adversarial(tmp_path / "plain.npz")

    mixed = with_examples(pool.subset(torch.arange(10)), ex)
    assert len(mixed) == 15 and torch.equal(mixed.images(torch.arange(10, 15)), ex.x)


@pytest.mark.slow
def test_retrain_improves_robust_accuracy_over_its_starting_model(trained_lenet, mnist_train_slice, pool, holdout):
    before_weights = {k: v.clone() for k, v in trained_lenet.state_dict().items()}
    result = retrain(
        trained_lenet, train_data=mnist_train_slice.subset(torch.arange(2000)), pool=pool, holdout=holdout,
        metric="dre", budget=300, attack=attack_preset("pgd", "mnist", "train", **FAST_PGD),
        eval_attacks=[attack_preset("pgd", "mnist", "eval", eps=0.2, steps=10, alpha=0.04)],
        config=TrainConfig(epochs=2, lr=0.01, seed=0), val_n=200,
        val_attack=attack_preset("pgd", "mnist", "train", **FAST_PGD), seed=0,
    )
    report = result.to_dict()
    before, after = report["before"], report["after"]
    assert after["robust_accuracy"]["pgd"] > before["robust_accuracy"]["pgd"] + 0.08, (before, after)
    assert after["clean_accuracy"] > 0.9
    assert report["selection"]["metric"] == "dre" and len(report["selection"]["indices"]) == 300
    assert report["adversarial_examples"]["n"] == 300 and report["settings"]["holdout_split"] == "holdout"
    assert report["settings"]["attack"]["eps"] == 0.2 and report["settings"]["config"]["epochs"] == 2
    # the starting model is left as it was
    assert all(torch.equal(before_weights[k], v) for k, v in trained_lenet.state_dict().items())


def test_retrain_refuses_a_pool_that_overlaps_the_holdout(trained_lenet, mnist_train_slice, holdout):
    with pytest.raises(DltestError, match="must be disjoint from the holdout"):
        retrain(trained_lenet, train_data=mnist_train_slice, pool=holdout, holdout=holdout)


def test_retrain_refuses_the_whole_test_set_as_pool_but_takes_val(trained_lenet, mnist_train_slice, holdout):
    from dltest.data import load_dataset
    from dltest.workflows.retrain import _overlap

    test = load_dataset("mnist", "test")
    with pytest.raises(DltestError, match="must be disjoint from the holdout"):
        retrain(trained_lenet, train_data=mnist_train_slice, pool=test, holdout=holdout)
    assert not _overlap(load_dataset("mnist", "val"), holdout)
    assert not _overlap(mnist_train_slice, holdout)


def test_retrain_leaves_the_callers_model_mode_weights_and_rng_alone(trained_lenet, mnist_train_slice, pool, holdout):
    model = copy.deepcopy(trained_lenet).train()  # in train mode, as a caller mid-training may hand it over
    model.features[0].eval()
    modes = [m.training for m in model.modules()]
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    device = next(model.parameters()).device
    torch.manual_seed(42)
    rng = torch.get_rng_state()
    result = retrain(
        model, train_data=mnist_train_slice.subset(torch.arange(200)), pool=pool, holdout=holdout, metric="deepgini",
        budget=20, attack=attack_preset("pgd", "mnist", "train", eps=0.2, steps=1, alpha=0.2),
        eval_attacks=[attack_preset("fgsm", "mnist", "eval", eps=0.1)], config=TrainConfig(epochs=1, seed=0),
        val_n=30, eval_n=30, val_attack=attack_preset("pgd", "mnist", "train", eps=0.2, steps=1, alpha=0.2), seed=0,
    )
    assert [m.training for m in model.modules()] == modes
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    assert next(model.parameters()).device == device
    assert torch.equal(torch.get_rng_state(), rng)
    assert result.model is not model and not result.model.training
