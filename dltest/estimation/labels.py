"""The labels a user gives for a plan: a CSV sheet, an npz, a mapping or the pool's own labels."""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from dltest.errors import DltestError

MAX_SHEET_BYTES = 256 * 2**20


def labels_for(plan: Any, labels: Mapping[int, Any] | Sequence[int] | np.ndarray, what: str = "labels") -> np.ndarray:
    """The class index of every input the plan asks to label (``plan.labels_needed`` order).

    ``labels``: a mapping pool position -> label (class index or class name), or one label per
    pool input. A missing or unknown label is a one-line error naming the first such input.
    """
    needed = plan.labels_needed
    if not isinstance(labels, Mapping):
        array = np.asarray(labels)
        if array.ndim != 1 or len(array) != plan.pool_size:
            raise DltestError(f"{what}: give one label per pool input ({plan.pool_size}) or a mapping index -> label, "
                              f"got shape {array.shape}")
        labels = {i: array[i] for i in needed}
    missing = [i for i in needed if i not in labels or labels[i] is None or str(labels[i]).strip() == ""]
    if missing:
        raise DltestError(f"{what} has no label for {len(missing)} of the {len(needed)} inputs of the plan "
                          f"(first: index {missing[0]}); label every row of the sheet")
    return np.asarray([_class_index(labels[i], plan.classes, i, what) for i in needed], dtype=np.int64)


def _class_index(value: Any, classes: list[str], index: int, what: str) -> int:
    text = str(value).strip()
    if text in classes and not (text.lstrip("-").isdigit() and int(text) < len(classes)):
        return classes.index(text)  # a class name (a digit name like "7" is read as an index first)
    try:
        number = float(text)
    except ValueError:
        raise DltestError(f"{what}: label {text!r} of index {index} is neither a class index nor a class name "
                          f"({', '.join(classes[:10])}{', ...' if len(classes) > 10 else ''})") from None
    if number != int(number) or not 0 <= number < len(classes):
        raise DltestError(f"{what}: label {text!r} of index {index} is not a class index in [0, {len(classes)})")
    return int(number)


def read_label_file(path: str | os.PathLike) -> dict[int, Any]:
    """``index -> label`` from a CSV with columns ``index`` and ``label`` (the labeling sheet),
    or from an npz with arrays ``index`` and ``label``, or ``y`` (one label per pool input)."""
    path = Path(path)
    if not path.is_file():
        raise DltestError(f"labels file not found: {path}")
    if path.stat().st_size > MAX_SHEET_BYTES:
        raise DltestError(f"{path} is larger than {MAX_SHEET_BYTES // 2**20} MiB; a labels file is one row per input")
    if path.suffix.lower() == ".npz":
        return _read_npz(path)
    return _read_csv(path)


def _read_csv(path: Path) -> dict[int, Any]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            rows = list(csv.DictReader(handle))
    except (UnicodeDecodeError, csv.Error) as exc:
        raise DltestError(f"cannot read {path} as CSV ({exc})") from None
    if not rows or "index" not in rows[0] or "label" not in rows[0]:
        raise DltestError(f"{path} needs a header with the columns index and label (the sheet of "
                          "'dltest estimate plan --csv', with its label column filled in)")
    labels: dict[int, Any] = {}
    for line, row in enumerate(rows, start=2):
        text = (row.get("index") or "").strip()
        if not text.isdigit():
            raise DltestError(f"{path} line {line}: index {text!r} is not a pool position (an integer >= 0)")
        index = int(text)
        if index in labels:
            raise DltestError(f"{path} line {line}: index {index} appears twice")
        labels[index] = (row.get("label") or "").strip() or None
    return labels


def _read_npz(path: Path) -> dict[int, Any]:
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files if k in ("index", "label", "y")}
    except Exception as exc:  # noqa: BLE001 - bad zip, pickled arrays: one line
        raise DltestError(f"cannot read {path} as an .npz file ({str(exc).splitlines()[0] if str(exc) else exc})") from None
    if "index" in arrays and "label" in arrays:
        index, label = arrays["index"].reshape(-1), arrays["label"].reshape(-1)
        if len(index) != len(label) or not np.issubdtype(index.dtype, np.integer):
            raise DltestError(f"{path}: 'index' must be integers, as many as 'label'")
        return {int(i): v.item() if hasattr(v, "item") else v for i, v in zip(index, label)}
    if "y" in arrays:
        return {i: int(v) for i, v in enumerate(arrays["y"].reshape(-1))}
    raise DltestError(f"{path} must hold arrays 'index' and 'label', or 'y' (one label per pool input)")
