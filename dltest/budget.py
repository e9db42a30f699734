"""Labeling budgets: ``400`` inputs or ``4%`` of the pool."""

from __future__ import annotations

import re
import sys
from fractions import Fraction

from dltest.errors import DltestError

_PERCENT = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*%\s*$")
_COUNT = re.compile(r"^\s*\d+\s*$")


def parse_budget(spec: str | int, pool_size: int) -> int:
    """The number of inputs a budget asks for: an integer count, or a percentage of the pool.

    A percentage rounds half up (exactly, in rational arithmetic: ``100%`` of any pool is the
    pool); the result must lie in [1, pool_size].
    """
    text = str(spec)
    if _COUNT.match(text):
        budget = int(text)
    elif match := _PERCENT.match(text):
        percent = Fraction(match.group(1))
        if not 0 < percent <= 100:
            raise DltestError(f"budget {text!r} is not a percentage in (0%, 100%]", param="budget")
        budget = int(pool_size * percent / 100 + Fraction(1, 2))  # floor of a positive rational
        if budget < 1:
            raise DltestError(f"budget {text!r} of a pool of {pool_size} selects no input; ask for more",
                              param="budget")
    else:
        raise DltestError(f"budget {text!r} is neither a count (e.g. 400) nor a percentage (e.g. 4%)",
                          param="budget")
    if budget < 1:
        raise DltestError(f"budget {text!r} must select at least one input", param="budget")
    if budget > pool_size:
        raise DltestError(f"budget {text!r} exceeds the pool of {pool_size} inputs", param="budget")
    return budget


def check_budget(spec: str | int) -> None:
    """A budget's syntax and range that no pool size can change (a count >= 1, a percentage in
    (0%, 100%]), checked before the pool is loaded; :func:`parse_budget` checks it against the pool."""
    parse_budget(spec, sys.maxsize)
