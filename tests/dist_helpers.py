"""Helpers the distributed tests run under torchrun (not tests themselves)."""

from __future__ import annotations

import json
import os
import signal
import sys

import torch
from torch import nn


class DiesOnRank1(nn.Module):
    """A classifier whose process is killed (SIGKILL, as by the OOM killer) when rank 1 runs it."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if os.environ.get("RANK") == "1":
            os.kill(os.getpid(), signal.SIGKILL)
        return self.inner(x)


def select_every_metric(pool: str, model: str, budget: int, out: str, metrics: list[str]) -> None:
    """Under torchrun: ``select`` with each metric on the sharded pool; rank 0 writes
    {metric: indices} to ``out``."""
    from dltest.checkpoint import load_model
    from dltest.data import load_dataset
    from dltest.io import write_json
    from dltest.runtime import distributed, world_size
    from dltest.selection import select

    torch.set_num_threads(1)
    with distributed():
        assert world_size() == int(os.environ["WORLD_SIZE"])
        data = load_dataset(pool, "all")
        net, _ = load_model(model)
        chosen = {m: select(m, budget, model=net, data=data, seed=5, device="cpu").indices for m in metrics}
        write_json(out, chosen)


def train_small(adversarial: bool, out: str | None = None) -> dict:
    """One epoch of LeNet-5 on 1000 MNIST training images (PGD-2 adversarial training if asked),
    validated on 500 test images; under torchrun with DDP. Rank 0 writes the weights, history
    and accuracy on 1000 other test images to ``out``."""
    from dltest.attacks import attack_preset
    from dltest.data import load_dataset
    from dltest.runtime import distributed
    from dltest.training import TrainConfig, accuracy, train
    from dltest.zoo import model_for_dataset

    torch.set_num_threads(1)
    with distributed():
        train_data = load_dataset("mnist", "train").subset(torch.arange(1000))
        test = load_dataset("mnist", "test")
        val, holdout = test.subset(torch.arange(500)), test.subset(torch.arange(500, 1500))
        torch.manual_seed(3)
        model = model_for_dataset("mnist")
        pgd = attack_preset("pgd", "mnist", "train", steps=2, seed=3).adversary() if adversarial else None
        result = train(model, train_data, val, TrainConfig(epochs=1, batch_size=64, seed=3), adversary=pgd,
                       device="cpu", progress=False)
        record = {"history": result.history, "holdout_accuracy": accuracy(result.model, holdout, device="cpu"),
                  "state_dict": {k: v.tolist() for k, v in result.model.state_dict().items()}}
        if out is not None:
            from dltest.io import write_json

            write_json(out, record)
    return record


if __name__ == "__main__":
    if sys.argv[1] == "train":
        train_small(sys.argv[2] == "adversarial", sys.argv[3])
    else:
        select_every_metric(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], json.loads(sys.argv[5]))
