"""The Typer application; user errors become one line on stderr and exit code 2."""

from __future__ import annotations

import sys

import typer
from typer.core import TyperGroup

from dltest.errors import DltestError


class _Group(TyperGroup):
    def invoke(self, ctx: typer.Context):
        try:
            return super().invoke(ctx)
        except DltestError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(130) from None


app = typer.Typer(
    cls=_Group,
    help="dltest: select, attack, retrain and gate deep-learning image classifiers.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def main() -> None:
    """Console-script entry point."""
    app(prog_name="dltest")
    sys.exit(0)
