"""Acquisition functions, registered by name (``REGISTRY``); one module per selector family."""

from dltest.selectors import ats, badge, batchbald, coreset, dfal, dre, egl, mc_dropout, mcp, random, surprise, uncertainty  # noqa: F401  (registers them)
from dltest.selectors.base import REGISTRY, Candidates, ScoreSelector, Selection, Selector, rank, register
from dltest.selectors.sampling import SAMPLINGS, SampledSelector, Sampling, stochastic_rank

__all__ = ["REGISTRY", "SAMPLINGS", "Candidates", "SampledSelector", "Sampling", "ScoreSelector", "Selection",
           "Selector", "rank", "register", "stochastic_rank", "get_selector", "score_based"]


def score_based() -> list[str]:
    """The metrics that rank scores, so that ``sampling`` applies to them."""
    return sorted(name for name, cls in REGISTRY.items() if issubclass(cls, ScoreSelector))


def get_selector(name: str, *, sampling: str | None = None, temperature: float | None = None, **options) -> Selector:
    """An instance of the selector called ``name``, with ``options`` for its constructor.

    ``sampling`` (``power``, ``softmax`` or ``rank``, with ``temperature``, default 1) makes a
    score-based selector draw its batch stochastically (:class:`SampledSelector`, checked by
    :class:`Sampling`) instead of taking the top scores.
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
    if not issubclass(cls, ScoreSelector):
        raise DltestError(f"metric {name!r} does not rank scores, so sampling does not apply to it "
                          f"(it applies to: {', '.join(score_based())})")
    how = Sampling(sampling, 1.0 if temperature is None else temperature, cls.highest, metric=name)
    return SampledSelector(cls(**options), how)
