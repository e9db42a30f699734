"""The gate's configuration: a ``[gate]`` table in dltest.toml or ``[tool.dltest.gate]`` in pyproject.toml."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from dltest.errors import DltestError

CONFIG_KEYS = (
    "min-accuracy", "min-robust", "max-drop", "max-relative-drop", "confidence", "attacks", "baseline",
    "dataset", "split", "model", "n", "seed", "eps", "steps", "alpha", "queries", "allow-randomised",
)


def read_config(path: str | os.PathLike | None = None, folder: str | os.PathLike = ".") -> tuple[dict[str, Any], str | None]:
    """The gate's settings from ``path``, else ``dltest.toml`` (table ``[gate]``), else
    ``pyproject.toml`` (table ``[tool.dltest.gate]``) in ``folder``; ``({}, None)`` when none."""
    if path is not None:
        candidates = [Path(path)]
        if not candidates[0].is_file():
            raise DltestError(f"config file not found: {path}")
    else:
        candidates = [Path(folder) / "dltest.toml", Path(folder) / "pyproject.toml"]
    for candidate in candidates:
        if not candidate.is_file():
            continue
        document = _read_toml(candidate)
        if candidate.name == "pyproject.toml":
            table = _table_at(document, ("tool", "dltest", "gate"), candidate)
            where = "[tool.dltest.gate]"
        else:
            table = document.get("gate", _table_at(document, ("tool", "dltest", "gate"), candidate))
            where = "[gate]"
        if table is None:
            if path is not None:
                raise DltestError(f"{candidate} has no {where} table")
            continue
        if not isinstance(table, dict):
            raise DltestError(f"{candidate}: {where} must be a table")
        unknown = sorted(set(table) - set(CONFIG_KEYS))
        if unknown:
            raise DltestError(f"{candidate} {where}: unknown key {unknown[0]!r}; allowed: {', '.join(CONFIG_KEYS)}")
        flag = table.get("allow-randomised")
        if flag is not None and not isinstance(flag, bool):
            raise DltestError(f"{candidate} {where}: allow-randomised must be true or false (a TOML boolean, "
                              f"not a string), got {flag!r}")
        return dict(table), str(candidate)
    return {}, None


MAX_TOML_BYTES = 2**20  # a gate configuration is a few lines; a larger file is not one


def _read_toml(path: Path) -> dict[str, Any]:
    """Parse a TOML file with a one-line error for malformed, oversized or absurdly nested input."""
    try:
        if path.stat().st_size > MAX_TOML_BYTES:
            raise DltestError(f"{path} is {path.stat().st_size} bytes, too large for a configuration "
                              f"(at most {MAX_TOML_BYTES})")
        text = path.read_text(encoding="utf-8")
        return _tomllib().loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise DltestError(f"{path} is not valid TOML ({str(exc).splitlines()[0]})") from None
    except RecursionError:
        raise DltestError(f"{path} is nested too deeply to be a configuration") from None


def _table_at(document: dict[str, Any], keys: tuple[str, ...], path: Path) -> Any:
    """``document[k1][k2]...``, or None where a key is missing; a non-table on the way is an error."""
    value: Any = document
    for depth, key in enumerate(keys):
        if not isinstance(value, dict):
            raise DltestError(f"{path}: [{'.'.join(keys[:depth])}] must be a table, got {value!r:.40}")
        value = value.get(key)
        if value is None:
            return None
    return value


def _tomllib():
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        import tomli as tomllib
    return tomllib
