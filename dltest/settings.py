"""Where dltest looks for data and which device it computes on."""

from __future__ import annotations

import os
from pathlib import Path

import torch

DATA_ENV = "DLTEST_DATA"
DEVICE_ENV = "DLTEST_DEVICE"
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
    """``explicit``, else ``$DLTEST_DEVICE``, else CUDA when there is one, else the CPU."""
    name = explicit or os.environ.get(DEVICE_ENV)
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
