"""The one exception type that reaches a user as a single line (exit code 2)."""


class DltestError(Exception):
    """A problem with what the user asked for: a bad value, a missing file, a misfit model.

    The CLI prints its message on one line and exits with code 2; it is never a bug report.
    """
