"""The built-in datasets (MNIST, Fashion-MNIST, CIFAR-10, SVHN) through torchvision, the paper's
splits (the test set's fixed ``val``/``holdout`` halves), and :func:`load_dataset`, which also
dispatches to the user files of :mod:`dltest.data.user_files`."""

from __future__ import annotations

import hashlib
import io
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from dltest.data.dataset import ImageDataset
from dltest.data.user_files import load_image_folder, load_npz
from dltest.errors import DltestError, first_line
from dltest.settings import data_root, download_allowed

BUILTIN_SPLITS = ("train", "test", "val", "holdout")
FILE_SPLITS = ("all", "train", "val", "holdout")
HALVES_SEED = 0  # fixed: the val/holdout halves are the same for every user and every run


@dataclass(frozen=True)
class _Builtin:
    loader: Callable[[Path, bool, bool], tuple[np.ndarray | Tensor, np.ndarray | Tensor, list[str]]]
    files: str  # where the files go, for the offline error


def _mnist_like(cls_name: str) -> Callable:
    def load(root: Path, train: bool, download: bool):
        import torchvision.datasets as tvd

        ds = getattr(tvd, cls_name)(root=str(root), train=train, download=download)
        return ds.data.unsqueeze(1), ds.targets, list(ds.classes)

    return load


def _cifar10(root: Path, train: bool, download: bool):
    """CIFAR-10's python batches, each checked against torchvision's MD5 before it is unpickled.

    A batch with another checksum (a subset, a re-encoded copy, or a booby-trapped file) is read
    with :class:`_ArrayUnpickler`, which builds dicts, lists, strings, numbers and numpy arrays
    and refuses everything else: a pickle in the data root never runs code.
    """
    import torchvision.datasets as tvd

    base = root / tvd.CIFAR10.base_folder
    files = tvd.CIFAR10.train_list if train else tvd.CIFAR10.test_list
    meta = tvd.CIFAR10.meta
    wanted = [base / name for name, _ in files] + [base / meta["filename"]]
    if download and not all(p.is_file() for p in wanted):
        tvd.CIFAR10(root=str(root), train=train, download=True)  # torchvision verifies the archive's MD5
    missing = [p for p in wanted if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{missing[0]} not found")
    xs, ys = [], []
    for name, md5 in files:
        batch = _read_pickled_batch(base / name, md5)
        xs.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        ys.extend(batch["labels"] if "labels" in batch else batch["fine_labels"])
    classes = list(_read_pickled_batch(base / meta["filename"], meta["md5"])[meta["key"]])
    return torch.from_numpy(np.concatenate(xs)), torch.tensor(ys, dtype=torch.long), classes


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays only (what a CIFAR batch holds)."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"it refers to {module}.{name}")


def _read_pickled_batch(path: Path, md5: str) -> dict:
    data = path.read_bytes()
    verified = hashlib.md5(data).hexdigest() == md5
    try:
        if verified:  # torchvision's own file, byte for byte
            batch = pickle.loads(data, encoding="latin1")
        else:
            batch = _ArrayUnpickler(io.BytesIO(data), encoding="latin1").load()
    except Exception as exc:  # noqa: BLE001 - refused globals, truncated pickles
        raise DltestError(f"{path} is not torchvision's CIFAR-10 file (its MD5 differs) and cannot be read as plain "
                          f"arrays ({first_line(exc)}); refusing to unpickle it: replace it with the original") from None
    if not isinstance(batch, dict):
        raise DltestError(f"{path} does not hold a CIFAR-10 batch (a dict), but {type(batch).__name__}")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in batch.items()}


def _svhn(root: Path, train: bool, download: bool):
    ds = _svhn_class()(root=str(root / "SVHN"), split="train" if train else "test", download=download)
    classes = [str(i) for i in range(10)]
    return torch.from_numpy(ds.data), torch.from_numpy(ds.labels).long(), classes


def _svhn_class():
    """torchvision's SVHN that accepts any ``.mat`` file in the right format (no md5)."""
    import torchvision.datasets as tvd

    class SVHN(tvd.SVHN):
        def _check_integrity(self) -> bool:
            return (Path(self.root) / self.filename).is_file()

    return SVHN


BUILTINS: dict[str, _Builtin] = {
    "mnist": _Builtin(_mnist_like("MNIST"), "MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]"),
    "fashion-mnist": _Builtin(
        _mnist_like("FashionMNIST"), "FashionMNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]"
    ),
    "cifar10": _Builtin(_cifar10, "cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}"),
    "svhn": _Builtin(_svhn, "SVHN/{train,test}_32x32.mat"),
}


def load_dataset(
    name: str,
    split: str = "test",
    root: str | os.PathLike | None = None,
    download: bool | None = None,
) -> ImageDataset:
    """Load a built-in dataset (``mnist``, ``fashion-mnist``, ``cifar10``, ``svhn``) or a user file.

    ``name`` may also be a path to an ``.npz`` file or an ImageFolder directory. Splits of the
    built-ins: ``train``, ``test``, and the test set's halves ``val`` and ``holdout`` (SPEC §3).
    A user file is one pool, ``all`` (alias ``test``) with the halves ``val`` and ``holdout``,
    and may hold training data for ``train``: arrays ``x_train``/``y_train`` beside ``x``/``y``
    (or Keras' ``x_test``/``y_test``), or ``train/`` and ``test/`` subfolders of class folders.
    """
    key = name.lower()
    if key in BUILTINS:
        if split not in BUILTIN_SPLITS:
            raise DltestError(f"unknown split {split!r} for {key}; choose one of {', '.join(BUILTIN_SPLITS)}")
        return _load_builtin(key, split, data_root(root), download_allowed(download))
    path = Path(name).expanduser()
    if path.suffix == ".npz" or path.is_dir():
        if split == "test":
            split = "all"
        if split not in FILE_SPLITS:
            raise DltestError(f"unknown split {split!r} for a data file; choose one of {', '.join(FILE_SPLITS)}")
        part = "train" if split == "train" else "test"
        full = load_npz(path, part) if path.suffix == ".npz" else load_image_folder(path, part)
        return _half(full, split) if split in ("val", "holdout") else full
    raise DltestError(
        f"unknown dataset {name!r}; choose one of {', '.join(BUILTINS)}, an .npz file or an image folder"
    )


def _load_builtin(name: str, split: str, root: Path, download: bool) -> ImageDataset:
    spec = BUILTINS[name]
    train = split == "train"
    try:
        x, y, classes = spec.loader(root, train, download)
    except (RuntimeError, FileNotFoundError, OSError) as exc:
        if download:
            raise DltestError(f"could not download or read {name} into {root}: {exc}") from None
        raise DltestError(
            f"{name} not found under {root}: put its files at {root}/{spec.files}, "
            f"set DLTEST_DATA or --data-root to the folder that holds them, or allow a download "
            f"with --download"
        ) from None
    x, y = torch.as_tensor(x), torch.as_tensor(y, dtype=torch.long)
    full = ImageDataset(name, "train" if train else "test", x, y, classes, torch.arange(len(y)))
    return _half(full, split) if split in ("val", "holdout") else full


def split_halves(n: int) -> tuple[Tensor, Tensor]:
    """The validation and holdout halves of ``n`` test positions: a fixed random split, each sorted."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(HALVES_SEED))
    half = n // 2
    return perm[:half].sort().values, perm[half:].sort().values


def _half(full: ImageDataset, split: str) -> ImageDataset:
    val, holdout = split_halves(len(full))
    return full.subset(val if split == "val" else holdout, split=split)
