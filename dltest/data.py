"""Datasets as in-memory image tensors in [0, 1], with the paper's splits.

Built-in datasets come through torchvision's dataset classes; user data comes as an ``.npz``
file (``x``: N,H,W[,C] uint8 or float in [0,1]; ``y``: N labels) or an ImageFolder directory.
Images are kept as uint8 (N, C, H, W) where possible and turned into floats one batch at a time.
Normalisation belongs to the model, never to the data.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from torch import Tensor

from dltest.errors import DltestError
from dltest.settings import data_root, download_allowed

BUILTIN_SPLITS = ("train", "test", "val", "holdout")
FILE_SPLITS = ("all", "val", "holdout")
HALVES_SEED = 0  # fixed: the val/holdout halves are the same for every user and every run


@dataclass
class ImageDataset:
    """Images ``x`` (N, C, H, W; uint8, or float in [0, 1]) with labels ``y`` (N,).

    ``source_index[i]`` is the position of row ``i`` in the file or torchvision split it came
    from (for ``val``/``holdout``: its position in the test set).
    """

    name: str
    split: str
    x: Tensor
    y: Tensor
    classes: list[str]
    source_index: Tensor

    def __len__(self) -> int:
        return len(self.y)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.x.shape[1:])  # type: ignore[return-value]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def subset(self, positions: Tensor | list[int] | np.ndarray, split: str | None = None) -> "ImageDataset":
        """The rows at ``positions``, in that order."""
        positions = torch.as_tensor(positions, dtype=torch.long)
        return ImageDataset(
            self.name, split or self.split, self.x[positions], self.y[positions],
            self.classes, self.source_index[positions],
        )

    def sample_positions(self, n: int | None, seed: int) -> Tensor | None:
        """``n`` positions drawn at random with ``seed`` (sorted); None when ``n`` is None or
        covers the whole dataset. Drawn from a private generator: the global RNG is untouched."""
        if n is not None and n < 1:
            raise DltestError(f"n must be >= 1, got {n}")
        if n is None or n >= len(self):
            return None
        return torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))[:n].sort().values

    def sample(self, n: int | None, seed: int) -> "ImageDataset":
        """A seeded random subset of ``n`` inputs, in pool order (all of them when ``n`` is None or
        at least the size): the same ``n`` and ``seed`` give the same subset."""
        positions = self.sample_positions(n, seed)
        return self if positions is None else self.subset(positions)

    def images(self, positions: Tensor | slice | None = None, device: torch.device | str = "cpu") -> Tensor:
        """Float images in [0, 1] on ``device``."""
        x = self.x if positions is None else self.x[positions]
        return to_float_images(x.to(device, non_blocking=True))

    def batches(
        self, batch_size: int, device: torch.device | str = "cpu"
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """Consecutive (images, labels) batches in pool order, images as floats in [0, 1]."""
        for start in range(0, len(self), batch_size):
            stop = start + batch_size
            yield self.images(slice(start, stop), device), self.y[start:stop].to(device, non_blocking=True)


def to_float_images(x: Tensor) -> Tensor:
    """uint8 images become float32 in [0, 1]; float images are returned as float32."""
    if x.dtype == torch.uint8:
        return x.float().div_(255)
    return x.float()


# --- built-in datasets -------------------------------------------------------------------------


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
    ds = _cifar10_class()(root=str(root), train=train, download=download)
    return torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(ds.targets), list(ds.classes)


def _svhn(root: Path, train: bool, download: bool):
    ds = _svhn_class()(root=str(root / "SVHN"), split="train" if train else "test", download=download)
    classes = [str(i) for i in range(10)]
    return torch.from_numpy(ds.data), torch.from_numpy(ds.labels).long(), classes


def _cifar10_class():
    """torchvision's CIFAR10 that accepts any file in the right format (no md5 of the full set)."""
    import torchvision.datasets as tvd

    class CIFAR10(tvd.CIFAR10):
        def _check_integrity(self) -> bool:
            base = Path(self.root) / self.base_folder
            return all((base / name).is_file() for name, _ in self.train_list + self.test_list)

    return CIFAR10


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
    A user file is one pool: ``all`` (alias ``test``), ``val`` or ``holdout``.
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
        full = load_npz(path) if path.suffix == ".npz" else load_image_folder(path)
        return full if split == "all" else _half(full, split)
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


# --- user data ---------------------------------------------------------------------------------


def load_npz(path: str | os.PathLike) -> ImageDataset:
    """An ``.npz`` with ``x`` (N,H,W or N,H,W,C; uint8, or float in [0, 1]) and integer ``y`` (N,)."""
    path = Path(path)
    if not path.is_file():
        raise DltestError(f"data file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as f:
            if "x" not in f or "y" not in f:
                raise DltestError(f"{path} must hold arrays 'x' and 'y'; it has {', '.join(f.files) or 'none'}")
            x, y = f["x"], f["y"]
            classes = [str(c) for c in f["classes"]] if "classes" in f else None
    except DltestError:
        raise
    except Exception as exc:  # zipfile, pickle refusal, corrupt arrays
        raise DltestError(f"cannot read {path} as an .npz file ({exc})") from None
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4:
        raise DltestError(f"{path}: x must have shape (N, H, W) or (N, H, W, C), not {x.shape}")
    if y.shape != (len(x),) or not np.issubdtype(y.dtype, np.integer):
        raise DltestError(f"{path}: y must be {len(x)} integer labels, got shape {y.shape} of {y.dtype}")
    if x.dtype != np.uint8:
        if not np.issubdtype(x.dtype, np.floating):
            raise DltestError(f"{path}: x must be uint8 or float in [0, 1], not {x.dtype}")
        if x.size and (x.min() < 0 or x.max() > 1):
            raise DltestError(f"{path}: float x must lie in [0, 1], found [{x.min():.3g}, {x.max():.3g}]")
        x = x.astype(np.float32)
    if len(y) and y.min() < 0:
        raise DltestError(f"{path}: labels must be >= 0, found {y.min()}")
    num_classes = int(y.max()) + 1 if len(y) else 0
    classes = classes or [str(i) for i in range(num_classes)]
    xt = torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2).contiguous()
    return ImageDataset(str(path), "all", xt, torch.from_numpy(y.astype(np.int64)), classes, torch.arange(len(y)))


def load_image_folder(path: str | os.PathLike) -> ImageDataset:
    """An ImageFolder directory (``root/<class>/<image>``); all images must share one size."""
    import torchvision.datasets as tvd
    from torchvision.transforms.functional import pil_to_tensor

    path = Path(path)
    try:
        ds = tvd.ImageFolder(str(path))
    except (FileNotFoundError, OSError) as exc:
        raise DltestError(f"cannot read image folder {path}: {exc}") from None
    images = []
    for file, _ in ds.samples:
        img = ds.loader(file)
        images.append(pil_to_tensor(img))
    shapes = {tuple(t.shape) for t in images}
    if len(shapes) != 1:
        raise DltestError(f"images in {path} differ in size or channels ({sorted(shapes)[:3]}...); resize them to one size")
    x = torch.stack(images)
    y = torch.tensor(ds.targets, dtype=torch.long)
    return ImageDataset(str(path), "all", x, y, list(ds.classes), torch.arange(len(y)))
