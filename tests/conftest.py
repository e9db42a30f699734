"""Shared fixtures: the real datasets in ../shared/datasets and a small trained LeNet-5."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
# Tests read real data from ../shared/datasets unless DLTEST_DATA points elsewhere (a git
# worktree lives elsewhere than ../shared: DLTEST_DATA then names the folder for every test).
SHARED_DATA = Path(os.environ.get("DLTEST_DATA") or REPO.parent / "shared" / "datasets")
if not os.environ.get("DLTEST_DATA") and SHARED_DATA.is_dir():
    os.environ["DLTEST_DATA"] = str(SHARED_DATA)
os.environ.setdefault("DLTEST_DEVICE", "cpu")
# One thread: small models on small batches gain little from more, and on a busy 2-core machine
# several threads per process spin against each other (10x slower, measured here).
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)


def _require_mnist() -> None:
    root = Path(os.environ.get("DLTEST_DATA", ""))
    if not (root / "MNIST" / "raw").is_dir():
        pytest.fail(f"MNIST not found under DLTEST_DATA={root}; point it at ../shared/datasets")


@pytest.fixture(scope="session")
def mnist_test():
    from dltest.data import load_dataset

    _require_mnist()
    return load_dataset("mnist", "test")


@pytest.fixture(scope="session")
def mnist_train_slice():
    from dltest.data import load_dataset

    _require_mnist()
    data = load_dataset("mnist", "train")
    return data.subset(torch.arange(6000))


@pytest.fixture(scope="session")
def trained_lenet(mnist_train_slice):
    """A LeNet-5 trained for 3 epochs on 6000 real MNIST images (about 96% accurate), in eval mode."""
    from dltest.training import TrainConfig, train
    from dltest.zoo import model_for_dataset

    torch.manual_seed(0)
    model = model_for_dataset("mnist")
    result = train(model, mnist_train_slice, None, TrainConfig(epochs=3, batch_size=64, seed=0), progress=False)
    return result.model.eval()


@pytest.fixture(scope="session")
def lenet_checkpoint(trained_lenet, tmp_path_factory) -> Path:
    from dltest.checkpoint import save_checkpoint

    path = tmp_path_factory.mktemp("ckpt") / "lenet5-mnist.pt"
    save_checkpoint(trained_lenet, path, arch="lenet5", dataset="mnist", input_shape=(1, 28, 28), num_classes=10,
                    meta={"note": "test fixture"})
    return path


@pytest.fixture
def cli():
    """``cli("select", "--budget", 10, ...)`` runs the command line in-process (see tests/cli_runner.py)."""
    from tests.cli_runner import run_cli

    return run_cli
