"""Acquisition functions, registered by name (``REGISTRY``); one module per selector family."""

from dltest.selectors import ats, badge, batchbald, coreset, dfal, dre, egl, mc_dropout, mcp, random, surprise, uncertainty  # noqa: F401  (registers them)
from dltest.selectors.base import (
    REGISTRY, SAMPLINGS, Candidates, ScoreSelector, Selection, Selector, rank, register, stochastic_rank, with_sampling,
)

__all__ = ["REGISTRY", "SAMPLINGS", "Candidates", "ScoreSelector", "Selection", "Selector", "rank", "register",
           "stochastic_rank", "get_selector", "score_based"]


def score_based() -> list[str]:
    """The metrics that rank scores, so that ``sampling`` applies to them."""
    return sorted(name for name, cls in REGISTRY.items() if issubclass(cls, ScoreSelector))


def get_selector(name: str, *, sampling: str | None = None, temperature: float | None = None, **options) -> Selector:
    """An instance of the selector called ``name``, with ``options`` for its constructor.

    ``sampling`` (``power``, ``softmax`` or ``rank``, with ``temperature``, default 1) makes a
    score-based selector draw its batch stochastically (:func:`stochastic_rank`) instead of
    taking the top scores.
    """
    from dltest.errors import DltestError

    if name not in REGISTRY:
        raise DltestError(f"unknown metric {name!r}; choose one of {', '.join(sorted(REGISTRY))}")
    cls = REGISTRY[name]
    allowed = cls.option_defaults()
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        takes = ", ".join(allowed) or "no options"
        raise DltestError(f"metric {name!r} does not take option(s) {', '.join(unknown)} (it takes {takes})")
    if sampling is None:
        if temperature is not None:
            raise DltestError("temperature applies only with sampling (power, softmax or rank)")
        return cls(**options)
    if sampling not in SAMPLINGS:
        raise DltestError(f"sampling must be one of {', '.join(SAMPLINGS)}, not {sampling!r}")
    if not issubclass(cls, ScoreSelector):
        raise DltestError(f"metric {name!r} does not rank scores, so sampling does not apply to it "
                          f"(it applies to: {', '.join(score_based())})")
    temperature = 1.0 if temperature is None else float(temperature)
    if not temperature > 0 or temperature == float("inf"):
        raise DltestError(f"temperature must be a positive number, not {temperature}")
    selector = with_sampling(cls)(**options)
    selector.sampling, selector.temperature = sampling, temperature
    if sampling == "power" and not cls.highest:
        raise DltestError(f"power sampling needs scores where higher is better; {name!r} ranks its lowest scores "
                          "first: use sampling softmax or rank")
    return selector
