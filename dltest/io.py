"""Atomic writes: a file is written whole or not at all."""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from dltest.errors import DltestError


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
        text = path.read_text()
    except (UnicodeDecodeError, OSError) as exc:
        raise DltestError(f"cannot read {path} as a JSON file ({_first_line(str(exc))})") from None
    return parse_json_text(text, str(path))


def _jsonable(value: Any) -> Any:
    if hasattr(value, "tolist"):  # tensors and numpy arrays / scalars
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


MAX_JSON_DEPTH = 64  # selection files and --arch-kwargs are shallow; deeper is a malformed or hostile file


def parse_json_text(text: str, what: str) -> Any:
    """Parse JSON text with a one-line error for malformed or absurdly nested input."""
    depth = max_depth = 0
    in_string = escaped = False
    for ch in text:  # bracket depth outside strings, before json.loads recurses into it
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
            continue
        if ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            max_depth = max(max_depth, depth)
        elif ch in "]}":
            depth -= 1
    if max_depth > MAX_JSON_DEPTH:
        raise DltestError(f"{what} is nested {max_depth} levels deep (at most {MAX_JSON_DEPTH} allowed)")
    try:
        return json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise DltestError(f"{what} is not valid JSON ({_first_line(str(exc))})") from None


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else "empty"
