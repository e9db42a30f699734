"""Progress on stderr: a rich bar on a terminal, plain periodic lines elsewhere (CI logs).

Off for ``enabled=False`` (the library's default; the CLI turns it on). Off a terminal, a line
``description: done/total (percent) elapsed`` is printed at most every
:data:`PLAIN_INTERVAL` seconds, and a last one when such a job ends, so short jobs print nothing
and a long one shows in a log that it is alive and how far it got.
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from typing import Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from dltest.runtime import is_main

console = Console(stderr=True)
PLAIN_INTERVAL = float(os.environ.get("DLTEST_PROGRESS_INTERVAL", "30"))  # seconds between plain lines


@contextmanager
def progress_bar(description: str, total: int, enabled: bool = True) -> Iterator[Callable[[int], None]]:
    """Yield ``advance(k)``; a bar on a terminal, periodic plain lines on stderr otherwise."""
    if not enabled or not is_main():  # under torchrun only rank 0 shows progress
        yield lambda k=1: None
        return
    if not console.is_terminal:
        with plain_progress(description, total, PLAIN_INTERVAL) as advance:
            yield advance
        return
    columns = (
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task(description, total=total)
        yield lambda k=1: bar.advance(task, k)


@contextmanager
def plain_progress(description: str, total: int, interval: float,
                   write: Callable[[str], None] | None = None) -> Iterator[Callable[[int], None]]:
    """``advance(k)`` that writes ``description: done/total (p%) elapsed`` every ``interval`` seconds."""
    write = write or (lambda line: console.print(line, markup=False, highlight=False, soft_wrap=True))
    started = last = time.monotonic()
    done = 0
    printed = False

    def line() -> str:
        share = f" ({100 * done / total:.0f}%)" if total else ""
        return f"{description}: {done}/{total}{share} {time.monotonic() - started:.0f} s"

    def advance(k: int = 1) -> None:
        nonlocal done, last, printed
        done += k
        now = time.monotonic()
        if now - last >= interval:
            write(line())
            last, printed = now, True

    yield advance
    if printed:
        write(line())
