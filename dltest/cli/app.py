"""The Typer application; user errors become one line on stderr and exit code 2.

A :class:`DltestError` from the library and a usage error from the parser (an unknown option, a
missing value) are both printed as one ``error: ...`` line, without boxed panels, exit code 2.
Library messages name Python parameters; :func:`flag_message` writes them as flags (``budget`` ->
``--budget``; :func:`flags` renames the few that differ).
Every command's JSON starts with :func:`dltest.header.output_header`: ``command``, ``dltest_version``, ``seed``.
"""

from __future__ import annotations

import os
import re
import signal
import sys
import warnings
from contextlib import contextmanager, redirect_stdout
from typing import Annotated, Any, Iterator, Mapping, Optional

from typer._click.core import Context  # typer's vendored click
from typer._click.exceptions import ClickException, NoArgsIsHelpError, UsageError
import typer
from typer.core import TyperGroup

from dltest._version import __version__
from dltest.errors import DltestError


def flag(param: str, renamed: Mapping[str, str] | None = None) -> str:
    """The command-line flag of a library parameter: ``renamed[param]`` (``path`` -> ``--onnx``),
    else ``--`` and the name with dashes (``val_n`` -> ``--val-n``)."""
    return (renamed or {}).get(param) or "--" + param.replace("_", "-")


def flag_message(exc: DltestError, renamed: Mapping[str, str] | None = None) -> str:
    """``exc`` as the command line shows it: its ``cli`` text, else its message with the parameter
    it names (``exc.param``) written as the flag, the first time the word stands alone."""
    if exc.cli is not None or not exc.param:
        return exc.cli_message
    word = re.compile(rf"(?<![\w-]){re.escape(exc.param)}(?![\w-])")
    return word.sub(lambda _m: flag(exc.param, renamed), str(exc), count=1)


@contextmanager
def flags(**renamed: str) -> Iterator[None]:
    """Library errors raised inside the block name the command's flags where a parameter's flag is
    not ``--`` + its name (``with flags(path="--onnx", n_check="--n"): export_onnx(...)``)."""
    try:
        yield
    except DltestError as exc:
        if exc.cli is None and exc.param:
            exc.cli = flag_message(exc, renamed)
        raise


class _Group(TyperGroup):
    def invoke(self, ctx: typer.Context):
        try:
            with warnings.catch_warnings():
                # library deprecation notices (torch.jit, torchvision) must not bury dltest's one line
                warnings.simplefilter("ignore", FutureWarning)
                warnings.simplefilter("ignore", DeprecationWarning)
                return super().invoke(ctx)
        except DltestError as exc:
            if _is_main() or "failed or left the run" in str(exc):  # other ranks' errors repeat rank 0's
                typer.echo(f"error: {flag_message(exc)}", err=True)
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
        _flags_without_type(self)
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


def _flags_without_type(command: Any) -> None:
    """Show a boolean flag as the flag alone in the help (``--download``), not ``--download <bool>``:
    a flag takes no value."""
    help_option = command.get_help_option(Context(command))  # made once and kept by the command
    for param in [*command.params, *([help_option] if help_option is not None else [])]:
        if getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""
    for sub in getattr(command, "commands", {}).values():
        _flags_without_type(sub)


PIPED_HELP_WIDTH = 100  # columns of the help in a file or a CI log (rich would use 80: 28 for the text)


def _readable_help_when_piped() -> None:
    """Help that goes to a pipe or a file is laid out for :data:`PIPED_HELP_WIDTH` columns,
    unless the user set a width (``COLUMNS``, ``TERMINAL_WIDTH``); a terminal keeps its own."""
    if sys.stdout.isatty() or os.environ.get("COLUMNS") or os.environ.get("TERMINAL_WIDTH"):
        return
    os.environ["TERMINAL_WIDTH"] = str(PIPED_HELP_WIDTH)  # read by typer's help formatter when it is imported


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


def _alone() -> bool:
    """No torchrun group around this process (``WORLD_SIZE`` unset or 1)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) <= 1
    except ValueError:
        return False  # dltest.runtime reports a malformed WORLD_SIZE


def _is_main() -> bool:
    """Rank 0 or a process alone; torch is imported only under torchrun."""
    if _alone():
        return True
    from dltest.runtime import is_main

    return is_main()


def main() -> None:
    """Console-script entry point; under ``torchrun`` each process joins the group first, and
    only rank 0 prints (the others' standard output goes nowhere). Alone, nothing heavy is
    imported before a command needs it (``--help`` and ``--version`` stay fast)."""
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupt)
    _readable_help_when_piped()
    if _alone():
        app(prog_name="dltest")
        sys.exit(0)
    from dltest.runtime import distributed, is_main

    with distributed():
        if is_main():
            app(prog_name="dltest")
        else:
            from dltest.progress import console

            console.quiet = True
            with open(os.devnull, "w") as devnull, redirect_stdout(devnull):
                app(prog_name="dltest")
    sys.exit(0)
