"""The fields every command's JSON starts with, built in one place (no torch: the CLI imports it)."""

from __future__ import annotations

from typing import Any

from dltest._version import __version__


def output_header(command: str, seed: int | list[int] | None, **extra: Any) -> dict[str, Any]:
    """``command`` (``"dltest <command>"``), ``dltest_version`` and ``seed``, then ``extra`` in order.

    ``command`` is the name after ``dltest`` (``"train"``, ``"estimate plan"``); every JSON output
    starts with these three keys so that readers can tell what wrote a file and with which version."""
    return {"command": f"dltest {command}", "dltest_version": __version__, "seed": seed, **extra}
