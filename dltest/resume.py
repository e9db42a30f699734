"""Resumable state of a long job (train, retrain, robust-al): one file, whole or not at all.

A job saves its state (weights, optimizer, records: tensors and plain values) with
:meth:`ResumeState.save` after every finished step, atomically (a temporary file renamed onto
the old one, so a crash mid-write leaves the previous state). :meth:`ResumeState.load` reads it
back with ``torch.load(weights_only=True)`` and refuses it in one line when it is unreadable,
of another kind, written with other settings (naming the settings that differ) or edited since
(a digest of its contents). Once the job's final output is written, :meth:`ResumeState.remove`
deletes it.

On disk the state is a dict: the job's own keys beside ``format`` (kind and version),
``settings`` (the job's settings as JSON values) and ``digest`` (sha256 of all the rest).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import Tensor

from dltest.errors import DltestError
from dltest.io import atomic_path

RESERVED = ("format", "settings", "digest")
EDITED = "its contents do not match their digest (edited or damaged)"


def partial_path(output: str | os.PathLike) -> Path:
    """``<output>.partial``: where a job that writes ``output`` keeps its resumable state."""
    return Path(f"{output}.partial")


@dataclass(frozen=True)
class Wording:
    """How a job's refusals read: what an unreadable file is, what other settings mean, the remedy."""

    unreadable: str = "it is empty, truncated or not a dltest partial"
    other_settings: str = "it was written by a run with other settings or data"
    remedy: str = "remove it to start over"


class ResumeState:
    """The state file at ``path`` of a job of ``kind`` (e.g. ``"dltest train partial"``) run with
    ``settings``. ``legacy`` reads an older format of the same job: given the file's dict and this
    object (for :meth:`refuse`, :meth:`check_settings`), it returns the job's keys, checked, or None
    when the file is not of that format either."""

    def __init__(self, path: str | os.PathLike, kind: str, version: int, settings: Mapping[str, Any], *,
                 wording: Wording = Wording(),
                 legacy: Callable[[dict[str, Any], ResumeState], dict[str, Any] | None] | None = None) -> None:
        self.path = Path(path)
        self.format = f"{kind} {version}"
        self.settings = _as_json(dict(settings))  # as it reads back
        self.wording = wording
        self.legacy = legacy

    def exists(self) -> bool:
        """Whether something (a state file, or something in the way) is at ``path``."""
        return os.path.lexists(self.path)

    def refuse(self, why: str) -> DltestError:
        """The one-line refusal ``cannot resume from <path>: <why>; <remedy>``."""
        return DltestError(f"cannot resume from {self.path}: {why}; {self.wording.remedy}")

    def check_settings(self, saved: Any) -> None:
        """Refuse, naming them, settings that differ from this job's."""
        differ = differences(_as_json(saved), self.settings)
        if differ:
            shown = ", ".join(differ[:6]) + (f" and {len(differ) - 6} more" if len(differ) > 6 else "")
            raise self.refuse(f"{self.wording.other_settings} ({shown})")

    def save(self, state: Mapping[str, Any]) -> None:
        """Write ``state`` (tensors and plain values; none of the keys in :data:`RESERVED`) with the
        format, the settings and a digest, atomically."""
        clash = sorted(set(state) & set(RESERVED))
        if clash:
            raise ValueError(f"state keys {clash} are reserved for the state file itself")
        payload = {**state, "format": self.format, "settings": self.settings}
        payload["digest"] = digest(payload)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.path) as tmp:
            torch.save(payload, tmp)

    def load(self) -> dict[str, Any] | None:
        """The saved state (its job's keys, on the CPU), None when there is no file; a one-line
        error when it cannot be used."""
        if not self.exists():
            return None
        if not self.path.is_file():
            raise self.refuse("not a regular file")
        try:
            raw = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - empty, truncated or foreign file
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise self.refuse(f"{self.wording.unreadable} ({reason[:120]})") from None
        if not isinstance(raw, dict):
            raise self.refuse(f"{self.wording.unreadable} (it holds a {type(raw).__name__}, not a dict)")
        if raw.get("format") != self.format:
            state = self.legacy(raw, self) if self.legacy is not None else None
            if state is None:
                raise self.refuse(f"it is not a {self.format} file (its format: {str(raw.get('format'))[:60]!r})")
            return state
        self.check_settings(raw.get("settings"))
        if raw.get("digest") != digest({k: v for k, v in raw.items() if k != "digest"}):
            raise self.refuse(EDITED)
        return {k: v for k, v in raw.items() if k not in RESERVED}

    def remove(self) -> None:
        """Delete the state file: the job finished and wrote its final output."""
        discard(self.path)


def discard(path: str | os.PathLike) -> None:
    """Delete a finished job's state file, once its final output is written (none there: nothing to do)."""
    Path(path).unlink(missing_ok=True)


def _as_json(value: Any) -> Any:
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def differences(saved: Any, wanted: Any, prefix: str = "") -> list[str]:
    """The names of the settings in which ``saved`` and ``wanted`` differ, nested ones as ``a.b``."""
    if not isinstance(saved, dict) or not isinstance(wanted, dict):
        return [] if saved == wanted else [prefix.rstrip(".") or "settings"]
    names = []
    for key in sorted(set(saved) | set(wanted), key=str):
        if key in saved and key in wanted:
            names += differences(saved[key], wanted[key], f"{prefix}{key}.")
        else:
            names.append(f"{prefix}{key}")
    return names


def digest(value: Any) -> str:
    """``sha256:<hex>`` of a nested structure of dicts, lists, tuples, tensors and plain values:
    every tensor's dtype, shape and bytes, every key and value, in a fixed order."""
    h = hashlib.sha256()
    _feed(h, value)
    return "sha256:" + h.hexdigest()


def _feed(h: Any, value: Any) -> None:
    if isinstance(value, Tensor):
        t = value.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(value, dict):
        h.update(f"D{len(value)}|".encode())
        for key in sorted(value, key=repr):
            h.update(f"{key!r}:".encode())
            _feed(h, value[key])
    elif isinstance(value, (list, tuple)):
        h.update(f"{type(value).__name__[0]}{len(value)}|".encode())
        for item in value:
            _feed(h, item)
    else:  # str, int, float (repr round-trips), bool, None
        h.update(f"{type(value).__name__}:{value!r}|".encode())
