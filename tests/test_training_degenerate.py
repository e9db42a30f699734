"""The trainer never keeps a degenerate (near-constant) epoch as its best one."""

from __future__ import annotations

import torch

from dltest import training
from dltest.data import ImageDataset
from dltest.training import TrainConfig, is_degenerate, top_class_share, train
from dltest.zoo import model_for_dataset


def test_top_class_share_and_the_degenerate_rule_on_hand_made_predictions():
    balanced = torch.arange(10).repeat(10)  # 100 labels, 10 of each class
    assert top_class_share(torch.zeros(100, dtype=torch.long)) == 1.0
    assert top_class_share(balanced) == 0.1
    assert is_degenerate(torch.zeros(100, dtype=torch.long), balanced)  # a constant predictor
    almost = torch.cat([torch.zeros(56, dtype=torch.long), torch.arange(44) % 10])
    assert is_degenerate(almost, balanced)  # 56% + 4 more of class 0 > 55%
    fine = torch.cat([torch.zeros(50, dtype=torch.long), torch.arange(50) % 10])
    assert not is_degenerate(fine, balanced)  # 55% exactly is not more than halfway
    assert not is_degenerate(balanced, balanced)
    binary = torch.tensor([0] * 70 + [1] * 30)
    assert not is_degenerate(torch.tensor([0] * 80 + [1] * 20), binary)  # (1 + 0.7) / 2 = 85%
    assert is_degenerate(torch.tensor([0] * 90 + [1] * 10), binary)


def _data(n: int, seed: int) -> ImageDataset:
    g = torch.Generator().manual_seed(seed)
    return ImageDataset("random", "train", torch.rand(n, 1, 28, 28, generator=g), torch.arange(n) % 10,
                        [str(c) for c in range(10)], torch.arange(n))


def _identity(model, images, labels):
    return images


def test_a_degenerate_epoch_is_never_the_best_even_with_the_best_score(monkeypatch):
    calls = []

    def last_epoch_constant(model, data, **kw):
        calls.append(1)
        return torch.zeros(len(data), dtype=torch.long) if len(calls) == 3 else torch.arange(len(data)) % 10

    # the third epoch has the best robust accuracy, and it predicts one class only
    scores = iter([0.2, 0.3, 1.0])
    monkeypatch.setattr(training, "predictions", last_epoch_constant)
    monkeypatch.setattr(training, "accuracy", lambda *a, **kw: next(scores))
    torch.manual_seed(0)
    result = train(model_for_dataset("mnist"), _data(64, 0), _data(50, 1), TrainConfig(epochs=3, batch_size=32),
                   adversary=_identity, val_adversary=_identity, progress=False)
    assert [r.get("degenerate", False) for r in result.history] == [False, False, True]
    assert result.history[2]["val_top_class_share"] == 1.0
    assert result.best_epoch == 1 and result.best_score == 0.3


def test_when_every_epoch_is_degenerate_the_starting_weights_are_kept(monkeypatch):
    monkeypatch.setattr(training, "predictions", lambda model, data, **kw: torch.zeros(len(data), dtype=torch.long))
    torch.manual_seed(0)
    model = model_for_dataset("mnist")
    start = {k: v.clone() for k, v in model.state_dict().items()}
    result = train(model, _data(64, 0), _data(50, 1), TrainConfig(epochs=2, batch_size=32), progress=False)
    assert result.best_epoch == -1
    assert "near-constant" in result.stopped_early
    assert all(torch.equal(start[k], v) for k, v in result.model.state_dict().items())
