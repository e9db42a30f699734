"""The Typer application; user errors become one line on stderr and exit code 2."""

from __future__ import annotations

import signal
import sys
import warnings

import typer
from typer._click.exceptions import NoArgsIsHelpError, UsageError  # typer's own copy of click
from typer.core import TyperGroup

from dltest.errors import DltestError


def _usage_error(exc: UsageError) -> typer.Exit:
    """A usage error as one plain line (no boxed panel), exit code 2."""
    where = f" (see '{exc.ctx.command_path} --help')" if exc.ctx is not None else ""
    typer.echo(f"error: {exc.format_message()}{where}", err=True)
    return typer.Exit(2)


class _Group(TyperGroup):
    def make_context(self, *args, **kwargs):
        try:
            return super().make_context(*args, **kwargs)
        except NoArgsIsHelpError:
            raise
        except UsageError as exc:
            raise _usage_error(exc) from None

    def invoke(self, ctx: typer.Context):
        try:
            with warnings.catch_warnings():
                # library deprecation notices (torch.jit, torchvision) must not bury dltest's one line
                warnings.simplefilter("ignore", FutureWarning)
                warnings.simplefilter("ignore", DeprecationWarning)
                return super().invoke(ctx)
        except NoArgsIsHelpError:
            raise
        except UsageError as exc:
            raise _usage_error(exc) from None
        except DltestError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(130) from None


def _interrupt(signum, _frame) -> None:
    """SIGTERM / SIGHUP unwind like Ctrl-C, so half-written temporary files are removed."""
    raise KeyboardInterrupt(signal.Signals(signum).name)


app = typer.Typer(
    cls=_Group,
    help="dltest: select, attack, retrain and gate deep-learning image classifiers.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def main() -> None:
    """Console-script entry point."""
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupt)
    app(prog_name="dltest")
    sys.exit(0)
