"""Atomic writes: a file is written whole or not at all."""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from dltest.errors import DltestError
from dltest.runtime import is_main


def check_writable(path: str | os.PathLike) -> Path:
    """Fail early, before any work, when ``path`` cannot be written (its folder is missing)."""
    path = Path(path)
    if not path.parent.is_dir():
        raise DltestError(f"cannot write {path}: folder {path.parent} does not exist")
    if path.is_dir():
        raise DltestError(f"cannot write {path}: it is a folder")
    return path


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds."""
    path = check_writable(path)
    if not is_main():  # under torchrun only rank 0 writes; the others write to a scratch file
        fd, tmp = tempfile.mkstemp(suffix=".tmp")
        os.close(fd)
        try:
            yield Path(tmp)
        finally:
            os.unlink(tmp)
        return
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(path: str | os.PathLike, data: Any) -> Path:
    """Write ``data`` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, default=_jsonable) + "\n")
    return Path(path)


def read_json(path: str | os.PathLike) -> Any:
    """Read a JSON file, with a one-line error when it is missing or malformed."""
    path = Path(path)
    if not path.is_file():
        raise DltestError(f"file not found: {path}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DltestError(f"{path} is not a valid JSON file ({exc})") from None


def _jsonable(value: Any) -> Any:
    if hasattr(value, "tolist"):  # tensors and numpy arrays / scalars
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")
