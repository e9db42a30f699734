"""The gate's configuration: a ``[gate]`` table in dltest.toml or ``[tool.dltest.gate]`` in pyproject.toml."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from dltest.errors import DltestError

if TYPE_CHECKING:
    from dltest.gate.policy import GatePolicy

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


@dataclass(frozen=True)
class GateSettings:
    """One gate run's settings, merged and checked: the bars (``policy``), the attacks and their
    overrides, the subset and seed, the files to load, and the config file they came from."""

    policy: "GatePolicy"
    attacks: list[str]
    eps: float | None
    n: int | None
    seed: int | None
    steps: int | None
    queries: int | None
    alpha: float | None
    baseline: str | None
    dataset: str
    split: str
    model: str | None
    allow_randomised: bool
    source: str | None

    def evaluation(self) -> dict[str, Any]:
        """The keyword arguments of :func:`dltest.gate.run_gate` that these settings fix."""
        return {"attacks": self.attacks, "eps": self.eps, "n": self.n, "seed": self.seed, "steps": self.steps,
                "queries": self.queries, "alpha": self.alpha, "allow_randomised": self.allow_randomised}


def gate_settings(given: Mapping[str, Any], config: str | os.PathLike | None = None,
                  folder: str | os.PathLike = ".") -> GateSettings:
    """The settings of a gate run: ``given`` (keys of :data:`CONFIG_KEYS`; ``None`` = not given)
    over those of the configuration file (:func:`read_config`), each checked, before anything is
    loaded. Bars are not checked against a baseline here (:meth:`GatePolicy.check` does that)."""
    from dltest.attacks import parse_attack_list, parse_eps
    from dltest.gate.policy import GatePolicy
    from dltest.runtime import check_seed

    unknown = sorted(set(given) - set(CONFIG_KEYS))
    if unknown:
        raise DltestError(f"unknown gate setting {unknown[0]!r}; allowed: {', '.join(CONFIG_KEYS)}")
    settings, source = read_config(config, folder)
    settings.update({key: value for key, value in given.items() if value is not None})
    policy = GatePolicy(min_accuracy=settings.get("min-accuracy"), min_robust=settings.get("min-robust"),
                        max_drop=settings.get("max-drop"), max_relative_drop=settings.get("max-relative-drop"),
                        confidence=_number(settings.get("confidence", 0.95), "confidence"))
    attacks = settings.get("attacks")
    if isinstance(attacks, (list, tuple)):
        attacks = ",".join(str(a) for a in attacks)
    flag = settings.get("allow-randomised", False)
    if not isinstance(flag, bool):
        raise DltestError(f"allow-randomised must be true or false, got {flag!r}")
    return GateSettings(
        policy=policy, attacks=parse_attack_list(str(attacks)) if attacks is not None else [],
        eps=parse_eps(settings.get("eps")), n=_integer(settings.get("n"), "n"),
        seed=check_seed(_integer(settings.get("seed"), "seed")), steps=_integer(settings.get("steps"), "steps"),
        queries=_integer(settings.get("queries"), "queries"),
        alpha=_number(settings["alpha"], "alpha") if settings.get("alpha") is not None else None,
        baseline=_text(settings.get("baseline"), "baseline"), dataset=_text(settings.get("dataset", "mnist"), "dataset"),
        split=_text(settings.get("split", "holdout"), "split"), model=_text(settings.get("model"), "model"),
        allow_randomised=flag, source=source)


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool):
        raise DltestError(f"{what} must be a number, got {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise DltestError(f"{what} must be a number, got {value!r}") from None


def _integer(value: Any, what: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise DltestError(f"{what} must be an integer, got {value!r}")
    return value


def _text(value: Any, what: str) -> str | None:
    """A file or name setting: a string (a path from the command line counts), or absent."""
    if value is None:
        return None
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if not isinstance(value, str):
        raise DltestError(f"{what} must be a string, got {value!r:.40}")
    return value
