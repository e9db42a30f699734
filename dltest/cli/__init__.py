"""The ``dltest`` command line: a thin layer over the Python API, one module per command."""

from dltest.cli.app import app, main
from dltest.cli import attack, evaluate, metrics, retrain, select, train  # noqa: F401  (registers the commands)
from dltest.cli import export, gate  # noqa: F401
from dltest.cli import analyze  # noqa: F401
from dltest.cli import robust_al  # noqa: F401
from dltest.cli import estimate  # noqa: F401

__all__ = ["app", "main"]
