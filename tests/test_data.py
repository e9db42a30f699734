"""Dataset loading: real MNIST / Fashion-MNIST, CIFAR-10 and SVHN in their own formats, user files."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import scipy.io
import torch

from dltest.data import load_dataset, split_halves
from dltest.errors import DltestError
from tests.conftest import SHARED_DATA


def test_mnist_test_set_is_real(mnist_test):
    assert mnist_test.x.shape == (10000, 1, 28, 28) and mnist_test.x.dtype == torch.uint8
    assert mnist_test.y[:5].tolist() == [7, 2, 1, 0, 4]  # the well-known first MNIST test labels
    assert mnist_test.num_classes == 10
    batch, labels = next(mnist_test.batches(32))
    assert batch.dtype == torch.float32 and 0 <= batch.min() and batch.max() <= 1 and len(labels) == 32


def test_fashion_mnist_train_split():
    data = load_dataset("fashion-mnist", "train")
    assert len(data) == 60000 and data.classes[0] == "T-shirt/top"
    assert torch.bincount(data.y).tolist() == [6000] * 10


def test_val_and_holdout_are_fixed_disjoint_halves_of_test(mnist_test):
    val, holdout = load_dataset("mnist", "val"), load_dataset("mnist", "holdout")
    assert len(val) == len(holdout) == 5000
    assert not set(val.source_index.tolist()) & set(holdout.source_index.tolist())
    assert torch.equal(val.x, mnist_test.x[val.source_index])
    assert torch.equal(holdout.y, mnist_test.y[holdout.source_index])
    again, _ = split_halves(10000)
    assert torch.equal(again, val.source_index)  # deterministic across runs


def test_missing_dataset_gives_a_one_line_offline_error(tmp_path):
    with pytest.raises(DltestError) as err:
        load_dataset("mnist", "test", root=tmp_path, download=False)
    message = str(err.value)
    assert "\n" not in message and str(tmp_path) in message and "MNIST/raw" in message
    with pytest.raises(DltestError, match="unknown dataset 'imagenet'"):
        load_dataset("imagenet")
    with pytest.raises(DltestError, match="unknown split 'dev'"):
        load_dataset("mnist", "dev")


def _cifar_sample() -> tuple[np.ndarray, np.ndarray]:
    with np.load(SHARED_DATA / "cifar10-sample" / "cifar10_test_first846.npz") as f:
        return f["data"], f["labels"]


def test_cifar10_loader_reads_the_python_batch_format(tmp_path):
    data, labels = _cifar_sample()
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for i in range(1, 6):  # five small training batches of real images
        part = slice((i - 1) * 100, i * 100)
        with open(folder / f"data_batch_{i}", "wb") as f:
            pickle.dump({"data": data[part], "labels": labels[part].tolist()}, f)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({"data": data[500:], "labels": labels[500:].tolist()}, f)
    (folder / "batches.meta").write_bytes((SHARED_DATA / "cifar10-sample" / "batches.meta").read_bytes())

    train = load_dataset("cifar10", "train", root=tmp_path)
    test = load_dataset("cifar10", "test", root=tmp_path)
    assert train.x.shape == (500, 3, 32, 32) and len(test) == 346
    assert train.classes[3] == "cat"
    # channel-major rows: first 1024 values are the red plane
    assert torch.equal(train.x[7, 0].flatten(), torch.from_numpy(data[7, :1024]))
    assert torch.equal(test.y, torch.from_numpy(labels[500:]).long())
    assert len(load_dataset("cifar10", "val", root=tmp_path)) == 173


def test_svhn_loader_reads_mat_files_and_maps_label_10_to_0(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "SVHN"
    folder.mkdir()
    for split, n in (("train", 12), ("test", 8)):
        x = rng.integers(0, 256, size=(32, 32, 3, n), dtype=np.uint8)
        y = np.arange(1, n + 1).reshape(n, 1) % 10 + 1  # labels 1..10, 10 meaning digit 0
        scipy.io.savemat(folder / f"{split}_32x32.mat", {"X": x, "y": y})
    test = load_dataset("svhn", "test", root=tmp_path)
    assert test.x.shape == (8, 3, 32, 32)
    assert test.y.tolist() == [(i % 10 + 1) % 10 for i in range(1, 9)]
    x = scipy.io.loadmat(folder / "test_32x32.mat")["X"]
    assert torch.equal(test.x[2].permute(1, 2, 0), torch.from_numpy(x[..., 2]))


def test_npz_file_uint8_and_float(tmp_path):
    x = np.arange(6 * 5 * 5, dtype=np.uint8).reshape(6, 5, 5)
    np.savez(tmp_path / "grey.npz", x=x, y=np.array([0, 1, 2, 0, 1, 2]))
    data = load_dataset(str(tmp_path / "grey.npz"))
    assert data.x.shape == (6, 1, 5, 5) and data.split == "all" and data.num_classes == 3
    assert torch.equal(data.x[:, 0], torch.from_numpy(x))

    xf = np.random.default_rng(0).random((4, 8, 8, 3)).astype(np.float64)
    np.savez(tmp_path / "colour.npz", x=xf, y=np.array([1, 0, 1, 0]))
    colour = load_dataset(str(tmp_path / "colour.npz"), "val")
    assert colour.x.shape == (2, 3, 8, 8) and colour.x.dtype == torch.float32


@pytest.mark.parametrize(
    "arrays, message",
    [
        ({"images": np.zeros((3, 4, 4))}, "must hold an array 'x'"),
        ({"x": np.full((2, 4, 4), 2.0), "y": np.array([0, 1])}, "must lie in \\[0, 1\\]"),
        ({"x": np.zeros((2, 4, 4), np.uint8), "y": np.array([0])}, "y must hold 2 labels, one per image"),
        ({"x": np.zeros((2, 4), np.uint8), "y": np.array([0, 1])}, "x must have shape"),
    ],
)
def test_bad_npz_files_are_one_line_errors(tmp_path, arrays, message):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(DltestError, match=message):
        load_dataset(str(path))


def test_corrupt_and_missing_npz(tmp_path):
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(DltestError, match="cannot read"):
        load_dataset(str(tmp_path / "junk.npz"))
    with pytest.raises(DltestError, match="not found"):
        load_dataset(str(tmp_path / "none.npz"))


def test_image_folder(tmp_path):
    from PIL import Image

    for label in ("cat", "dog"):
        (tmp_path / label).mkdir()
        for i in range(3):
            Image.fromarray(np.full((6, 6, 3), 40 * i, np.uint8)).save(tmp_path / label / f"{i}.png")
    data = load_dataset(str(tmp_path))
    assert data.classes == ["cat", "dog"] and data.x.shape == (6, 3, 6, 6)
    assert data.y.tolist() == [0, 0, 0, 1, 1, 1]
    assert int(data.x[2].max()) == 80
