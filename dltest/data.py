"""Datasets as in-memory image tensors in [0, 1], with the paper's splits.

Built-in datasets come through torchvision's dataset classes; user data comes as an ``.npz``
file (``x``: N,H,W[,C] uint8 or float in [0,1]; ``y``: N labels) or an ImageFolder directory.
Images are kept as uint8 (N, C, H, W) where possible and turned into floats one batch at a time.
Normalisation belongs to the model, never to the data.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from torch import Tensor

from dltest.errors import DltestError
from dltest.settings import data_root, download_allowed

BUILTIN_SPLITS = ("train", "test", "val", "holdout")
FILE_SPLITS = ("all", "train", "val", "holdout")
MAX_CLASSES = 100_000  # a label beyond this is a corrupt file, not a classifier (ImageNet-21k has 21,841)
HALVES_SEED = 0  # fixed: the val/holdout halves are the same for every user and every run


@dataclass
class ImageDataset:
    """Images ``x`` (N, C, H, W; uint8, or float in [0, 1]) with labels ``y`` (N,).

    ``source_index[i]`` is the position of row ``i`` in the file or torchvision split it came
    from (for ``val``/``holdout``: its position in the test set). A user file without labels
    has ``labeled=False`` (``y`` is all -1): enough to select from, not to evaluate or train.
    """

    name: str
    split: str
    x: Tensor
    y: Tensor
    classes: list[str]
    source_index: Tensor
    labeled: bool = True

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
            self.classes, self.source_index[positions], self.labeled,
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

    def require_labels(self, purpose: str) -> "ImageDataset":
        """Fail with one line when the data has no labels but ``purpose`` needs them."""
        if not self.labeled:
            raise DltestError(f"{self.name} has no labels (no 'y' array): {purpose} needs them")
        return self

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
                          f"arrays ({_first_line(exc)}); refusing to unpickle it: replace it with the original") from None
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


# --- user data ---------------------------------------------------------------------------------


def max_array_bytes() -> int:
    """The largest array a user file may hold: ``$DLTEST_MAX_BYTES``, else half the machine's memory."""
    if os.environ.get("DLTEST_MAX_BYTES"):
        return int(os.environ["DLTEST_MAX_BYTES"])
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
    except (ValueError, OSError, AttributeError):
        return 8 * 2**30


def _npz_headers(path: Path) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Shape and dtype of every array in an ``.npz``, read from the headers only (no data)."""
    headers = {}
    with zipfile.ZipFile(path) as archive:
        for member in archive.infolist():
            if not member.filename.endswith(".npy"):
                continue
            with archive.open(member) as f:
                version = np.lib.format.read_magic(f)
                if version == (1, 0):
                    shape, _, dtype = np.lib.format.read_array_header_1_0(f)
                elif version == (2, 0):
                    shape, _, dtype = np.lib.format.read_array_header_2_0(f)
                else:
                    shape, _, dtype = np.lib.format._read_array_header(f, version)
            headers[member.filename[:-4]] = (tuple(shape), dtype)
    return headers


def _nbytes(shape: tuple[int, ...], dtype: np.dtype) -> int:
    return int(np.prod(shape, dtype=object)) * dtype.itemsize


FLOAT32 = np.dtype(np.float32)


def check_npz_sizes(path: Path, headers: dict[str, tuple[tuple[int, ...], np.dtype]] | None = None,
                    keys: tuple[str, ...] | None = None,
                    as_float32: tuple[str, ...] = ()) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Refuse, on the headers alone, arrays of Python objects and arrays larger than
    :func:`max_array_bytes` (checked before any of them is read); returns the headers.

    The arrays named in ``as_float32`` are checked also at the size they take once converted to
    float32 images (4 bytes a pixel: 4x a uint8 file's), since that is what loading makes of them."""
    try:
        headers = headers if headers is not None else _npz_headers(path)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise DltestError(f"cannot read {path} as an .npz file ({_first_line(exc)})") from None
    limit = max_array_bytes()
    for key in keys if keys is not None else tuple(headers):
        if key in headers:
            shape, dtype = headers[key]
            if dtype.hasobject:
                raise DltestError(f"{path}: array {key!r} holds Python objects; save plain numeric arrays")
            if _nbytes(shape, dtype) > limit:
                raise DltestError(f"{path}: array {key!r} of shape {shape} ({dtype}) needs "
                                  f"{_nbytes(shape, dtype) / 2**30:.1f} GiB, more than the {limit / 2**30:.1f} GiB "
                                  "allowed (DLTEST_MAX_BYTES); split it into smaller files")
            if key in as_float32 and _nbytes(shape, FLOAT32) > limit:
                raise DltestError(f"{path}: array {key!r} of shape {shape} ({dtype}) needs "
                                  f"{_nbytes(shape, FLOAT32) / 2**30:.1f} GiB as float32 images, more than the "
                                  f"{limit / 2**30:.1f} GiB allowed (DLTEST_MAX_BYTES); split it into smaller files")
    return headers


def load_npz(path: str | os.PathLike, part: str = "test") -> ImageDataset:
    """An ``.npz`` of images ``x`` and integer labels ``y`` (optional: without them the pool can
    only be selected from), optional ``classes`` names; ``part="train"`` reads ``x_train`` and
    ``y_train`` (Keras' ``x_test``/``y_test`` are accepted for ``x``/``y``).

    ``x`` is (N, H, W) or (N, H, W, C) (NCHW is detected), C 1 or 3, uint8 or float in [0, 1].
    Everything is checked on the arrays' headers before their data is read: the size against
    :func:`max_array_bytes`, the shapes against each other; then NaN/inf pixels, the value range
    and the labels.
    """
    path = Path(path)
    if not path.is_file():
        raise DltestError(f"data file not found: {path}")
    try:
        headers = _npz_headers(path)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise DltestError(f"cannot read {path} as an .npz file ({_first_line(exc)})") from None
    if part == "train":
        x_key, y_key = "x_train", "y_train"
        if x_key not in headers:
            raise DltestError(f"{path} has no training data: add arrays x_train and y_train (as in Keras' "
                              f"mnist.npz) beside x and y; it has {', '.join(headers) or 'no arrays'}")
    else:
        x_key, y_key = ("x", "y") if "x" in headers else ("x_test", "y_test")
        if x_key not in headers:
            raise DltestError(f"{path} must hold an array 'x' (images) and usually 'y' (labels); "
                              f"it has {', '.join(headers) or 'no arrays'}")
    check_npz_sizes(path, headers, (x_key, y_key, "classes"))
    x_shape, x_dtype = headers[x_key]
    n = x_shape[0] if x_shape else 0
    if len(x_shape) not in (3, 4):
        raise DltestError(f"{path}: {x_key} must have shape (N, H, W), (N, H, W, C) or (N, C, H, W), not {x_shape}")
    if n == 0:
        raise DltestError(f"{path}: {x_key} holds no images")
    if not (x_dtype == np.uint8 or np.issubdtype(x_dtype, np.floating)):
        raise DltestError(f"{path}: {x_key} must be uint8 (0..255) or float in [0, 1], not {x_dtype}")
    labeled = y_key in headers
    if labeled:
        y_shape, y_dtype = headers[y_key]
        if y_shape not in ((n,), (n, 1)):
            raise DltestError(f"{path}: {y_key} must hold {n} labels, one per image, but has shape {y_shape}")
        if not np.issubdtype(y_dtype, np.integer) or y_dtype == np.bool_:
            raise DltestError(f"{path}: {y_key} must be integer class labels, not {y_dtype}")
    try:
        with np.load(path, allow_pickle=False) as f:
            x = f[x_key]
            y = f[y_key].reshape(-1) if labeled else None
            classes = [str(c) for c in f["classes"].reshape(-1)] if "classes" in f else None
    except Exception as exc:  # noqa: BLE001 - truncated members, CRC errors: one line
        raise DltestError(f"cannot read {path} as an .npz file ({_first_line(exc)})") from None
    x = _images_nchw(x, path, x_key)
    check_pixels(x, path, x_key)
    if labeled:
        check_labels(y, path, y_key, classes)
        num_classes = len(classes) if classes else int(y.max()) + 1
        yt = torch.from_numpy(y.astype(np.int64))
    else:
        num_classes = len(classes) if classes else 0
        yt = torch.full((n,), -1, dtype=torch.long)
    classes = classes or [str(i) for i in range(num_classes)]
    split = "train" if part == "train" else "all"
    return ImageDataset(str(path), split, _as_tensor(x), yt, classes, torch.arange(n), labeled)


def check_pixels(x: np.ndarray, path: Path | str, key: str = "x") -> None:
    """Float images must be finite and lie in [0, 1] (uint8 images always fit); one line naming
    how many images break that and the first one."""
    if x.dtype == np.uint8:
        return
    if not np.issubdtype(x.dtype, np.floating):
        raise DltestError(f"{path}: {key} must be uint8 (0..255) or float in [0, 1], not {x.dtype}")
    n = len(x)
    finite = np.isfinite(x).reshape(n, -1).all(axis=1)
    if not finite.all():
        first = int(np.flatnonzero(~finite)[0])
        raise DltestError(f"{path}: {int((~finite).sum())} images hold NaN or infinite pixels (first: image {first})")
    low, high = (float(x.min()), float(x.max())) if x.size else (0.0, 0.0)
    if low < 0 or high > 1:
        raise DltestError(f"{path}: float {key} must lie in [0, 1], found [{low:.3g}, {high:.3g}] "
                          "(uint8 images: save them as uint8)")


def check_labels(y: np.ndarray, path: Path | str, key: str = "y", classes: list[str] | None = None) -> None:
    """Labels must be integers in [0, number of classes); one line naming the first bad one."""
    if len(y) == 0:
        return
    low, high = int(y.min()), int(y.max())
    if low < 0:
        raise DltestError(f"{path}: labels must be >= 0, found {low} ({key}[{int(np.argmin(y))}])")
    bound = len(classes) if classes else MAX_CLASSES
    if high >= bound:
        what = f"the {len(classes)} class names" if classes else f"at most {MAX_CLASSES} classes"
        raise DltestError(f"{path}: label {high} ({key}[{int(np.argmax(y))}]) is out of range for {what}")


def check_examples(arrays: dict[str, np.ndarray], path: Path | str, classes: list[str] | None = None) -> None:
    """An adversarial-examples file's arrays (``x`` N,H,W,C float in [0, 1], ``y`` and ``indices``
    one integer per image, labels within ``classes``): one line naming what is wrong."""
    x, y, idx = arrays["x"], arrays["y"], arrays["indices"]
    if x.ndim != 4 or x.shape[3] not in (1, 3):
        raise DltestError(f"{path}: x must have shape (N, H, W, C) with C 1 or 3, not {x.shape}")
    for key, values in (("y", y), ("indices", idx)):
        if values.shape != (len(x),) or not np.issubdtype(values.dtype, np.integer) or values.dtype == np.bool_:
            raise DltestError(f"{path}: {key} must be {len(x)} integers, one per image, not shape {values.shape} "
                              f"of {values.dtype}")
    if len(x) == 0:
        raise DltestError(f"{path} holds no adversarial examples")
    check_pixels(x, path, "x")
    check_labels(y, path, "y", classes)
    if idx.min() < 0:
        raise DltestError(f"{path}: indices must be >= 0, found {int(idx.min())}")


def _images_nchw(x: np.ndarray, path: Path, key: str) -> np.ndarray:
    """(N, H, W) or (N, H, W, C) or (N, C, H, W) -> (N, C, H, W) with C in (1, 3)."""
    if x.ndim == 3:
        return x[:, None]
    if x.shape[3] in (1, 3):
        return x.transpose(0, 3, 1, 2)
    if x.shape[1] in (1, 3):
        return x  # already channels first (NCHW)
    raise DltestError(f"{path}: {key} of shape {x.shape} has neither 1 nor 3 channels, first or last")


def _as_tensor(x: np.ndarray) -> Tensor:
    """An (N, C, H, W) tensor with standard strides (a permuted single channel keeps odd strides
    through ``contiguous()``, which later reshapes trip on), uint8 or float32."""
    dtype = torch.uint8 if x.dtype == np.uint8 else torch.float32
    out = torch.empty(x.shape, dtype=dtype)
    out.copy_(torch.from_numpy(np.asarray(x, dtype=np.uint8 if dtype == torch.uint8 else np.float32)))
    return out


GREY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"}


def load_image_folder(path: str | os.PathLike, part: str = "test") -> ImageDataset:
    """An ImageFolder directory (``root/<class>/<image>``), or ``root/train/<class>/...`` and
    ``root/test/<class>/...`` (``part`` picks one); all images must share one size.

    Grey images (every one in a grey mode) load as one channel, others as RGB. A file that is
    not a readable image is a one-line error naming it; the total size is checked against
    :func:`max_array_bytes` on the image headers, before any pixel is decoded.
    """
    import torchvision.datasets as tvd
    from PIL import Image

    path = Path(path)
    parts = {p.name for p in path.iterdir() if p.is_dir()} if path.is_dir() else set()
    if "train" in parts and ("test" in parts or "val" in parts):
        path = path / ("train" if part == "train" else "test" if "test" in parts else "val")
    elif part == "train":
        raise DltestError(f"{path} has no training data: put the training images in {path}/train/<class>/ and "
                          f"the pool in {path}/test/<class>/")
    try:
        ds = tvd.ImageFolder(str(path))
    except (FileNotFoundError, OSError) as exc:
        raise DltestError(f"cannot read image folder {path}: {_first_line(exc)}") from None
    sizes, modes = set(), set()
    for file, _ in ds.samples:
        try:
            with Image.open(file) as img:
                sizes.add(img.size)
                modes.add(img.mode)
        except Exception as exc:  # noqa: BLE001 - not an image, truncated header, decompression bomb
            raise DltestError(f"cannot read image {file} ({_first_line(exc)}); remove or replace it") from None
    grey = modes <= GREY_MODES
    channels = 1 if grey else 3
    if len(sizes) != 1:
        raise DltestError(f"images in {path} differ in size ({sorted(sizes)[:3]}...); resize them to one size")
    (w, h), = sizes
    total = len(ds.samples) * channels * h * w
    if total > max_array_bytes():
        raise DltestError(f"{path}: {len(ds.samples)} images of {w}x{h} need {total / 2**30:.1f} GiB, more than "
                          f"the {max_array_bytes() / 2**30:.1f} GiB allowed (DLTEST_MAX_BYTES)")
    x = torch.empty((len(ds.samples), channels, h, w), dtype=torch.uint8)
    for i, (file, _) in enumerate(ds.samples):
        try:
            with Image.open(file) as img:
                img = img.convert("L" if grey else "RGB")
                x[i] = torch.from_numpy(np.asarray(img, dtype=np.uint8).reshape(h, w, channels)).permute(2, 0, 1)
        except Exception as exc:  # noqa: BLE001 - a header that opened, pixels that do not decode
            raise DltestError(f"cannot read image {file} ({_first_line(exc)}); remove or replace it") from None
    y = torch.tensor(ds.targets, dtype=torch.long)
    split = "train" if part == "train" and path.name == "train" else "all"
    return ImageDataset(str(path.parent if path.name in ("train", "test", "val") and parts else path), split, x, y,
                        list(ds.classes), torch.arange(len(y)))


def fingerprint(data: ImageDataset) -> str:
    """A digest of the data's identity and contents (images, labels, source positions): two runs
    that train on different data (another dataset, size, seed's subset, selection or attack)
    never share a resumable state."""
    h = hashlib.sha256(f"{data.name}|{data.split}|{len(data)}|{tuple(data.x.shape)}|{data.x.dtype}".encode())
    for t in (data.x, data.y, data.source_index):
        h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def fit_channels(data: ImageDataset, channels: int) -> ImageDataset:
    """``data`` with ``channels`` channels where that loses nothing: grey -> 3 equal channels, or
    3 equal channels (a grey image saved as RGB) -> 1; otherwise ``data`` unchanged."""
    have = data.input_shape[0]
    if have == channels:
        return data
    if have == 1 and channels == 3:
        x = data.x.expand(-1, 3, -1, -1).contiguous()
    elif have == 3 and channels == 1 and torch.equal(data.x[:, 0], data.x[:, 1]) and torch.equal(data.x[:, 0], data.x[:, 2]):
        x = data.x[:, :1].contiguous()
    else:
        return data
    return ImageDataset(data.name, data.split, x, data.y, data.classes, data.source_index, data.labeled)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
