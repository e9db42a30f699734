"""Robustness evaluation: RobustBench's rules, agreement with a direct torchattacks call, warnings."""

from __future__ import annotations

import copy

import pytest
import torch
import torchattacks

from dltest.attacks import attack_preset
from dltest.errors import DltestError
from dltest.robustness import RobustnessWarning, evaluate_robustness
from tests.client_nets import NoisyLogits


@pytest.fixture(scope="module")
def holdout_slice():
    from dltest.data import load_dataset

    return load_dataset("mnist", "holdout").subset(torch.arange(300), split="holdout")


@pytest.mark.slow
def test_numbers_agree_with_a_direct_torchattacks_call(trained_lenet, holdout_slice):
    report = evaluate_robustness(trained_lenet, holdout_slice, ["pgd", "fgsm"], eps=0.15, steps=10, alpha=0.03,
                                 seed=5, batch_size=512)
    x, y = holdout_slice.images(), holdout_slice.y
    with torch.no_grad():
        correct = trained_lenet(x).argmax(1) == y
    torch.manual_seed(5)
    adv = torchattacks.PGD(trained_lenet, eps=0.15, alpha=0.03, steps=10, random_start=True)(x[correct], y[correct])
    fgsm = torchattacks.FGSM(trained_lenet, eps=0.15)(x[correct], y[correct])
    with torch.no_grad():
        pgd_robust = int((trained_lenet(adv).argmax(1) == y[correct]).sum())
        fgsm_robust = int((trained_lenet(fgsm).argmax(1) == y[correct]).sum())
    assert report.clean_correct == int(correct.sum())
    assert report.clean_accuracy == int(correct.sum()) / 300
    assert report.attacks[0].robust_correct == pgd_robust
    assert report.robust_accuracy("pgd") == pgd_robust / 300  # over ALL inputs, misclassified count as not robust
    assert report.robust_accuracy("fgsm") == fgsm_robust / 300
    assert 0 < report.robust_accuracy("pgd") < report.clean_accuracy
    assert report.attacks[0].settings["eps"] == 0.15 and report.attacks[0].settings["steps"] == 10


@pytest.mark.slow
def test_batches_and_seed_make_no_difference_but_rng_is_restored(trained_lenet, holdout_slice):
    spec = attack_preset("pgd", "mnist", "eval", eps=0.1, steps=5)
    torch.manual_seed(123)
    one = evaluate_robustness(trained_lenet, holdout_slice, [spec], seed=1, batch_size=1000)
    after = torch.rand(3)
    torch.manual_seed(123)
    expected = torch.rand(3)
    assert torch.equal(after, expected)  # evaluation leaves the caller's generator alone
    again = evaluate_robustness(trained_lenet, holdout_slice, [spec], seed=1, batch_size=1000)
    assert again.attacks[0].robust_correct == one.attacks[0].robust_correct
    # robust accuracy can never exceed clean accuracy
    assert one.attacks[0].robust_correct <= one.clean_correct


def test_seeded_subset(holdout_slice):
    sub, idx = holdout_slice.sample(50, seed=2), holdout_slice.sample_positions(50, seed=2).tolist()
    idx2 = holdout_slice.sample_positions(50, seed=2).tolist()
    assert idx == idx2 and len(sub) == 50 and idx == sorted(idx) and len(set(idx)) == 50
    assert torch.equal(sub.y, holdout_slice.y[idx])
    assert holdout_slice.sample_positions(None, 0) is None and holdout_slice.sample(None, 0) is holdout_slice
    with pytest.raises(DltestError, match="n must be >= 1"):
        holdout_slice.sample(0, 0)


def test_overrides_that_apply_to_no_attack_fail(trained_lenet, holdout_slice):
    with pytest.raises(DltestError, match="steps applies to none of the attacks fgsm"):
        evaluate_robustness(trained_lenet, holdout_slice, ["fgsm"], steps=5)




def test_train_mode_and_randomised_models_are_warned_about(trained_lenet, holdout_slice):
    small = holdout_slice.subset(torch.arange(40))
    model = copy.deepcopy(trained_lenet).train()
    with pytest.warns(RobustnessWarning, match="was in train mode"):
        report = evaluate_robustness(model, small, ["fgsm"])
    assert model.training  # the caller's mode is restored
    assert any("train mode" in w for w in report.warnings)
    with pytest.warns(RobustnessWarning, match="outputs change between two calls"):
        evaluate_robustness(NoisyLogits(trained_lenet).eval(), small, ["fgsm"])
