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


if __name__ == "__main__":
    select_every_metric(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], json.loads(sys.argv[5]))
