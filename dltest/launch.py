"""``python -m dltest.launch [torchrun options] COMMAND ...``: torchrun for dltest, with failures in one line.

``torchrun ... -m dltest select ...`` works too, but when a rank fails, torchrun's launcher adds a
40-line Python traceback and a failure table to the rank's own ``error: ...`` line. This launcher
takes torchrun's options (``--standalone``, ``--nproc-per-node 8``, ``--nnodes``, ``--rdzv-*``,
...) followed by a dltest command and its arguments, runs it exactly as torchrun would, and on a
failure adds one line: which ranks failed with which exit code. It exits with the code of the
first failure (2 for bad input), so a CI step fails as it would with one process.
"""

from __future__ import annotations

import logging
import sys
from typing import Sequence

USAGE = ("usage: python -m dltest.launch [torchrun options] COMMAND [ARGS...]  "
         "(e.g. --standalone --nproc-per-node 2 select --metric bald ...)")


def split_arguments(argv: Sequence[str], commands: Sequence[str]) -> tuple[list[str], list[str]]:
    """(torchrun's options, dltest's command line): dltest's starts at the first command name."""
    for position, word in enumerate(argv):
        if word in commands:
            return list(argv[:position]), list(argv[position:])
    raise SystemExit(f"error: no dltest command among the arguments; {USAGE}")


def failure_line(failures: dict[int, object]) -> str:
    """One line naming every failed rank and its exit code (or signal)."""
    parts = []
    for rank, failure in sorted(failures.items()):
        code = getattr(failure, "exitcode", None)
        signal_name = getattr(failure, "signal_name", lambda: "")() if code is not None and code < 0 else ""
        parts.append(f"rank {rank}: " + (f"killed by {signal_name}" if signal_name else f"exit code {code}"))
    return f"error: dltest failed on {len(failures)} rank(s) ({', '.join(parts)}); see the rank's error line above"


def main(argv: Sequence[str] | None = None) -> None:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    from dltest.cli import app

    argv = list(sys.argv[1:] if argv is None else argv)
    commands = [c.name or c.callback.__name__ for c in app.registered_commands]
    commands += [g.name for g in app.registered_groups if g.name]
    launcher, command = split_arguments(argv, commands)
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)  # its failure table: our one line
    try:
        run(parse_args([*launcher, "--module", "dltest", *command]))
    except ChildFailedError as exc:
        print(failure_line(exc.failures), file=sys.stderr)
        first = min(exc.failures.values(), key=lambda f: getattr(f, "timestamp", 0))
        code = getattr(first, "exitcode", 1)
        sys.exit(code if isinstance(code, int) and 0 < code < 128 else 1)


if __name__ == "__main__":
    main()
