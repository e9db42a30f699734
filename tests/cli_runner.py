"""Run the command line in-process, as a user would type it: the one helper every CLI test uses."""

from __future__ import annotations

from typing import Mapping

from typer.testing import CliRunner, Result

from dltest.cli import app


def run_cli(*args: object, env: Mapping[str, str] | None = None) -> Result:
    """Invoke ``dltest ARGS...`` (each argument as ``str``, so paths and numbers can be passed as they are)
    and return typer's result: ``exit_code``, ``stdout``, ``stderr``, ``output``."""
    return CliRunner().invoke(app, [str(a) for a in args], env=env)
