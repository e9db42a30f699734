"""The ``dltest`` command line: a thin layer over the Python API, one module per command."""

from dltest.cli.app import app, main
from dltest.cli import analyze, attack, evaluate, metrics, retrain, select, train  # noqa: F401  (registers the commands)

__all__ = ["app", "main"]
