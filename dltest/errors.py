"""The one exception type that reaches a user as a single line (exit code 2)."""


class DltestError(Exception):
    """A problem with what the user asked for: a bad value, a missing file, a misfit model.

    The CLI prints its message on one line and exits with code 2; it is never a bug report.
    The message names Python parameters (``variant='last-layer'``); where the way out differs on
    the command line, ``cli`` holds the same message in its words (``--egl-variant last-layer``),
    and the CLI prints that instead. ``param`` names the Python parameter the message is about
    (``budget``): the CLI writes that word as its flag (``--budget``) where no ``cli`` text is given.
    """

    def __init__(self, message: str, *, cli: str | None = None, param: str | None = None):
        super().__init__(message)
        self.cli = cli
        self.param = param

    @property
    def cli_message(self) -> str:
        """The message as the command line shows it."""
        return self.cli or str(self)


def first_line(exc: BaseException) -> str:
    """The first line of ``exc``'s message (its type name when empty), for one-line errors."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
