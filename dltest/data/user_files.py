"""User data: ``.npz`` files and ImageFolder directories, checked (sizes on the headers before any
data is read, pixels, labels) with one-line errors; also the checks of adversarial-examples files."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from dltest.data.dataset import ImageDataset
from dltest.errors import DltestError, first_line

MAX_CLASSES = 100_000  # a label beyond this is a corrupt file, not a classifier (ImageNet-21k has 21,841)


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
        raise DltestError(f"cannot read {path} as an .npz file ({first_line(exc)})") from None
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
        raise DltestError(f"cannot read {path} as an .npz file ({first_line(exc)})") from None
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
        raise DltestError(f"cannot read {path} as an .npz file ({first_line(exc)})") from None
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
        raise DltestError(f"cannot read image folder {path}: {first_line(exc)}") from None
    sizes, modes = set(), set()
    for file, _ in ds.samples:
        try:
            with Image.open(file) as img:
                sizes.add(img.size)
                modes.add(img.mode)
        except Exception as exc:  # noqa: BLE001 - not an image, truncated header, decompression bomb
            raise DltestError(f"cannot read image {file} ({first_line(exc)}); remove or replace it") from None
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
            raise DltestError(f"cannot read image {file} ({first_line(exc)}); remove or replace it") from None
    y = torch.tensor(ds.targets, dtype=torch.long)
    split = "train" if part == "train" and path.name == "train" else "all"
    return ImageDataset(str(path.parent if path.name in ("train", "test", "val") and parts else path), split, x, y,
                        list(ds.classes), torch.arange(len(y)))
