"""Acquisition functions, registered by name (``REGISTRY``); one module per selector family."""

from dltest.selectors import ats, badge, coreset, dfal, dre, egl, mc_dropout, mcp, random, uncertainty  # noqa: F401  (registers them)
from dltest.selectors.base import REGISTRY, Candidates, Selection, Selector, rank, register

__all__ = ["REGISTRY", "Candidates", "Selection", "Selector", "rank", "register", "get_selector"]


def get_selector(name: str, **options) -> Selector:
    """An instance of the selector called ``name``, with ``options`` for its constructor."""
    from dltest.errors import DltestError

    if name not in REGISTRY:
        raise DltestError(f"unknown metric {name!r}; choose one of {', '.join(sorted(REGISTRY))}")
    cls = REGISTRY[name]
    allowed = cls.option_defaults()
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        takes = ", ".join(allowed) or "no options"
        raise DltestError(f"metric {name!r} does not take option(s) {', '.join(unknown)} (it takes {takes})")
    return cls(**options)
