"""Safe files: outputs checked before the work, written whole or not at all; JSON read with limits."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import stat
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from dltest.errors import DltestError
from dltest.runtime import is_main


NAME_MAX = 255  # bytes in one file name on Linux, macOS and Windows file systems
MIN_FREE_BYTES = 16 * 2**20  # an output needs at least this much free disk before the work starts
_TMP_SUFFIX = ".tmp"


def check_writable(path: str | os.PathLike, *, need_bytes: int = MIN_FREE_BYTES) -> Path:
    """Fail early, before any work, when ``path`` cannot be written: a missing, read-only or full
    folder, a name too long, or something other than a regular file in the way (a folder, a
    device file, a named pipe, a socket: never replaced)."""
    path = Path(path)
    name_bytes = len(os.fsencode(path.name))
    if not path.name or path.name in (".", ".."):
        raise DltestError(f"cannot write {path}: not a file name")
    if name_bytes > NAME_MAX:
        raise DltestError(f"cannot write {str(path)[:60]}...: its name is {name_bytes} bytes long (at most {NAME_MAX})")
    folder = path.parent
    try:
        if not folder.is_dir():
            raise DltestError(f"cannot write {path}: folder {folder} does not exist")
        mode = path.lstat().st_mode if os.path.lexists(path) else None
    except OSError as exc:
        raise DltestError(f"cannot write {path}: {exc.strerror or exc}") from None
    if mode is not None and stat.S_ISDIR(mode):
        raise DltestError(f"cannot write {path}: it is a folder")
    if mode is not None and not (stat.S_ISREG(mode) or stat.S_ISLNK(mode)):
        kind = ("a named pipe" if stat.S_ISFIFO(mode) else "a device file" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
                else "a socket" if stat.S_ISSOCK(mode) else "not a regular file")
        raise DltestError(f"cannot write {path}: it is {kind}; dltest only writes regular files")
    try:  # the real test: read-only mounts, permissions and ACLs all show here
        fd, probe = tempfile.mkstemp(prefix=".dltest-write-test.", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise DltestError(f"cannot write {path}: folder {folder} is not writable ({exc.strerror or exc})") from None
    free = shutil.disk_usage(folder).free
    if free < need_bytes:
        raise DltestError(f"cannot write {path}: {free / 2**20:.1f} MiB free on its disk, "
                          f"{need_bytes / 2**20:.0f} MiB needed; free some space first")
    return path


def check_outputs(outputs: dict[str, str | os.PathLike | None],
                  inputs: dict[str, str | os.PathLike | None] | None = None) -> None:
    """Check every output of one command (``{"--out": path, ...}``, None for unused ones) before
    the work: each writable, no two the same file, none of them one of the ``inputs``."""
    seen: dict[str, str] = {}
    for flag, path in outputs.items():
        if path is None:
            continue
        check_writable(path)
        key = os.path.realpath(path)
        if key in seen:
            raise DltestError(f"{seen[key]} and {flag} are the same file {path}; give them different paths")
        seen[key] = flag
    for flag, path in (inputs or {}).items():
        if path is None or not os.path.exists(path):
            continue
        key = os.path.realpath(path)
        if key in seen:
            raise DltestError(f"{seen[key]} {path} is also the input {flag}: writing it would destroy the input; "
                              "choose another output path")


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.

    The temporary file is removed whatever happens (an error, Ctrl-C, SIGTERM in the CLI); an
    ``OSError`` while writing (e.g. a full disk) is a one-line error and ``path`` is untouched.
    """
    path = check_writable(path, need_bytes=0)
    if not is_main():  # under torchrun only rank 0 writes; the others write to a scratch file
        fd, tmp = tempfile.mkstemp(suffix=_TMP_SUFFIX)
        os.close(fd)
        try:
            yield Path(tmp)
        finally:
            os.unlink(tmp)
        return
    prefix = _tmp_prefix(path.name)
    remove_stale_temporaries(path.parent, prefix)
    fd, tmp = tempfile.mkstemp(prefix=f"{prefix}{_OWNER}.", suffix=_TMP_SUFFIX, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, path)
    except OSError as exc:
        raise DltestError(f"cannot write {path}: {exc.strerror or exc}; nothing was written") from None
    except RuntimeError as exc:  # torch.save reports a failed write as RuntimeError
        if "write" not in str(exc).lower():
            raise
        raise DltestError(f"cannot write {path}: {str(exc).splitlines()[0]}; nothing was written") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


_HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:40] or "host"
_OWNER = f"{_HOST}-{os.getpid()}"  # who writes a temporary file: a dead owner's are stale
_STALE = re.compile(r"\.dltest-(?P<host>[A-Za-z0-9-]+)-(?P<pid>[0-9]+)\.[^.]+" + re.escape(_TMP_SUFFIX) + "$")


def _tmp_prefix(name: str) -> str:
    """``.<name>.dltest-`` (the name cut so that the whole temporary name fits in NAME_MAX bytes)."""
    stem = os.fsencode(name)[: NAME_MAX - 80].decode(errors="ignore")
    return f".{stem}.dltest-"


def remove_stale_temporaries(folder: str | os.PathLike, prefix: str) -> list[Path]:
    """Remove the temporary files ``<prefix><host>-<pid>.<random>.tmp`` that a process of this host
    left when it was killed (SIGKILL, power loss) between writing and renaming: their pid is no
    longer running. Files of live processes, and of other hosts sharing the folder, are kept."""
    removed = []
    try:
        names = [n for n in os.listdir(folder) if n.startswith(prefix) and n.endswith(_TMP_SUFFIX)]
    except OSError:
        return removed
    for name in names:
        match = _STALE.search(name[len(prefix) - len(".dltest-"):])
        if match is None or match["host"] != _HOST or _running(int(match["pid"])):
            continue
        try:
            os.unlink(os.path.join(folder, name))
            removed.append(Path(folder) / name)
        except OSError:
            pass  # another process removed it first, or the folder is not ours to clean
    return removed


def _running(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # someone else's process (or a pid this system cannot hold): leave its file
    return True


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
