"""The Typer application; user errors become one line on stderr and exit code 2.

A :class:`DltestError` from the library and a usage error from the parser (an unknown option, a
missing value) are both printed as one ``error: ...`` line, without boxed panels, exit code 2.
Every command's JSON starts with :func:`output_header`: ``command``, ``dltest_version``, ``seed``.
"""

from __future__ import annotations

import os
import signal
import sys
import warnings
from contextlib import contextmanager, redirect_stdout
from typing import Annotated, Any, Iterator, Optional

from typer._click.exceptions import ClickException, NoArgsIsHelpError, UsageError  # typer's vendored click
import typer
from typer.core import TyperGroup

from dltest import __version__
from dltest.errors import DltestError
from dltest.runtime import distributed, is_main


class _Group(TyperGroup):
    def invoke(self, ctx: typer.Context):
        try:
            with warnings.catch_warnings():
                # library deprecation notices (torch.jit, torchvision) must not bury dltest's one line
                warnings.simplefilter("ignore", FutureWarning)
                warnings.simplefilter("ignore", DeprecationWarning)
                return super().invoke(ctx)
        except DltestError as exc:
            if is_main() or "failed or left the run" in str(exc):  # other ranks' errors repeat rank 0's
                typer.echo(f"error: {exc.cli_message}", err=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(130) from None
        except OSError as exc:  # a path the system refuses (name too long, permission, I/O): the user's input
            name = str(exc.filename) if exc.filename is not None else ""
            base = len(os.fsencode(os.path.basename(name)))
            shown = f"{name[:60]}... (file name of {base} bytes)" if len(name) > 80 else name
            typer.echo(f"error: {shown + ': ' if shown else ''}{exc.strerror or exc}", err=True)
            raise typer.Exit(2) from None

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except NoArgsIsHelpError as exc:  # plain `dltest`: the help, as click shows it
            typer.echo(exc.ctx.get_help() if exc.ctx else exc.format_message())
            sys.exit(exc.exit_code)
        except ClickException as exc:  # usage errors: one line, no panel
            typer.echo(f"error: {_one_line(exc)}", err=True)
            sys.exit(exc.exit_code)
        except typer.Abort:
            typer.echo("aborted", err=True)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


def _one_line(exc: ClickException) -> str:
    message = " ".join(exc.format_message().split())
    ctx = getattr(exc, "ctx", None)
    if isinstance(exc, UsageError) and ctx is not None:
        message += f" (see '{ctx.command_path} --help')"
    return message


def _interrupt(signum, _frame) -> None:
    """SIGTERM / SIGHUP unwind like Ctrl-C, so half-written temporary files are removed."""
    raise KeyboardInterrupt(signal.Signals(signum).name)


@contextmanager
def robustness_warnings_as_lines() -> Iterator[None]:
    """Inside the block, robustness warnings (randomised model, train mode, gradient masking) are
    collected; after it, each is printed as one ``warning: ...`` line on stderr."""
    from dltest.robustness import RobustnessWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RobustnessWarning)
        yield
    for w in caught:
        if issubclass(w.category, RobustnessWarning):
            typer.echo(f"warning: {w.message}", err=True)


def output_header(command: str, seed: int | list[int] | None) -> dict[str, Any]:
    """The fields every command's JSON starts with: ``command`` (``"dltest <name>"``),
    ``dltest_version`` and ``seed``."""
    return {"command": f"dltest {command}", "dltest_version": __version__, "seed": seed}


app = typer.Typer(
    cls=_Group,
    help="dltest: select, attack, retrain and gate deep-learning image classifiers.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"dltest {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[Optional[bool], typer.Option(
        "--version", callback=_print_version, is_eager=True, help="Print dltest's version and exit.")] = None,
) -> None:
    """dltest: select, attack, retrain and gate deep-learning image classifiers."""


def main() -> None:
    """Console-script entry point; under ``torchrun`` each process joins the group first, and
    only rank 0 prints (the others' standard output goes nowhere)."""
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupt)
    with distributed():
        if is_main():
            app(prog_name="dltest")
        else:
            from dltest.progress import console

            console.quiet = True
            with open(os.devnull, "w") as devnull, redirect_stdout(devnull):
                app(prog_name="dltest")
    sys.exit(0)
