"""Where dltest looks for data (the device is resolved in :mod:`dltest.runtime`)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

DATA_ENV = "DLTEST_DATA"
DOWNLOAD_ENV = "DLTEST_DOWNLOAD"


def data_root(explicit: str | os.PathLike | None = None) -> Path:
    """The data root: an explicit path, else ``$DLTEST_DATA``, else ``~/.cache/dltest/data``."""
    if explicit:
        return Path(explicit).expanduser()
    if os.environ.get(DATA_ENV):
        return Path(os.environ[DATA_ENV]).expanduser()
    return Path.home() / ".cache" / "dltest" / "data"


def download_allowed(explicit: bool | None = None) -> bool:
    """Whether dataset downloads are allowed: only when the user asked (flag or ``DLTEST_DOWNLOAD=1``)."""
    if explicit is not None:
        return explicit
    return os.environ.get(DOWNLOAD_ENV, "").lower() in {"1", "true", "yes"}


def default_device(explicit: str | torch.device | None = None) -> torch.device:
    """Kept for code written against it: :func:`dltest.runtime.resolve_device`."""
    from dltest.runtime import resolve_device

    return resolve_device(explicit)
