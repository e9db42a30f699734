"""Stochastic batch acquisition (Kirsch et al., TMLR 2023) as a composition over any score selector.

:class:`Sampling` holds a mode (``power``, ``softmax`` or ``rank``), a temperature and the score
direction, and is checked once, when it is made; :meth:`Sampling.draw` trusts it.
:class:`SampledSelector` wraps any :class:`~dltest.selectors.base.ScoreSelector`: it scores as
the selector does (:meth:`~dltest.selectors.base.ScoreSelector.scored`) and draws the batch with
its :class:`Sampling` instead of taking the top scores. ``get_selector(name, sampling=...,
temperature=...)`` builds it; a new score selector gets sampling for free.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from dltest.errors import DltestError
from dltest.selectors.base import Candidates, ScoreSelector, Selection, Selector, rank

SAMPLINGS = ("power", "softmax", "rank")
DEFAULT_TEMPERATURE = 1.0


@dataclass(frozen=True)
class Sampling:
    """How a batch is drawn from scores, checked on construction (the one place):

    - ``power``: p_i proportional to s_i^(1/T) (scores >= 0, higher is better);
    - ``softmax``: p_i proportional to exp(s_i / T) (for lowest-first scores, exp(-s_i / T));
    - ``rank``: p_i proportional to r_i^(-1/T), r_i the 1-based rank in the deterministic order.

    ``highest`` is the scores' direction (False: the lowest scores come first); ``metric`` only
    names the metric in messages.
    """

    mode: str
    temperature: float = DEFAULT_TEMPERATURE
    highest: bool = True
    metric: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.mode not in SAMPLINGS:
            raise DltestError(f"sampling must be one of {', '.join(SAMPLINGS)}, not {self.mode!r}")
        try:
            temperature = float(self.temperature)
        except (TypeError, ValueError):
            temperature = math.nan
        if not temperature > 0 or not math.isfinite(temperature):
            raise DltestError(f"temperature must be a positive number, not {self.temperature}")
        object.__setattr__(self, "temperature", temperature)
        if self.mode == "power" and not self.highest:
            who = repr(self.metric) if self.metric else "this metric"
            raise DltestError(f"power sampling needs scores where higher is better; {who} ranks its lowest scores "
                              "first: use sampling softmax or rank")

    @property
    def label(self) -> str:
        """``power``, or ``power(T=0.5)`` away from the default temperature."""
        if self.temperature == DEFAULT_TEMPERATURE:
            return self.mode
        return f"{self.mode}(T={self.temperature:g})"

    def draw(self, scores: Tensor, budget: int, generator: torch.Generator) -> Tensor:
        """``budget`` positions drawn without replacement with this mode's probabilities.

        The Gumbel-top-k trick: log p_i + Gumbel noise from ``generator``, best ``budget`` kept,
        which samples without replacement exactly by those probabilities. As T goes to 0 every
        mode becomes the deterministic ranking; large T approaches a uniform draw. Scores of -inf
        (or +inf for lowest-first) have probability 0 and come last, by position. Only what the
        settings cannot know is checked here: power needs scores >= 0.
        """
        highest = self.highest
        s = scores.detach().double().cpu()
        s = torch.where(torch.isnan(s), torch.tensor(-math.inf if highest else math.inf, dtype=torch.float64), s)
        beta = 1.0 / self.temperature
        if self.mode == "power":
            if bool((s < 0).any()):
                raise DltestError(f"power sampling needs scores >= 0; this metric gave {float(s.min()):.4g}")
            log_p = beta * torch.log(s)
        elif self.mode == "softmax":
            log_p = beta * (s if highest else -s)
            finite = torch.isfinite(log_p)
            if bool(finite.any()):
                log_p = log_p - log_p[finite].max()  # exp stays in range; +inf keys stay on top
        else:
            ranks = torch.empty(len(s), dtype=torch.float64)
            ranks[rank(s, len(s), highest)] = torch.arange(1, len(s) + 1, dtype=torch.float64)
            log_p = -beta * torch.log(ranks)
        u = torch.rand(len(s), generator=generator, dtype=torch.float64).clamp_(min=torch.finfo(torch.float64).tiny)
        keys = log_p - torch.log(-torch.log(u))
        return rank(keys, budget, highest=True)


def stochastic_rank(scores: Tensor, budget: int, sampling: str, temperature: float,
                    generator: torch.Generator, highest: bool = True) -> Tensor:
    """``budget`` positions drawn from ``scores`` by ``sampling`` at ``temperature`` (see :class:`Sampling`)."""
    return Sampling(sampling, temperature, highest).draw(scores, budget, generator)


class SampledSelector(Selector):
    """A score selector that draws its batch with a :class:`Sampling` instead of taking the top
    scores; it has the wrapped selector's name, needs and options, plus ``sampling`` and
    ``temperature``."""

    _SHARED = ("name", "summary", "score_name", "needs_model", "needs_reference", "needs_embeddings",
               "needs_mc_samples", "highest")

    def __init__(self, selector: ScoreSelector, sampling: Sampling):
        self.selector, self.sampling = selector, sampling
        for attribute in self._SHARED:
            setattr(self, attribute, getattr(selector, attribute))

    def __call__(self, candidates: Candidates, budget: int, generator: torch.Generator) -> Selection:
        positions, scores = self.selector.scored(candidates, budget, generator)
        order = self.sampling.draw(scores, budget, generator)
        return Selection(positions[order], scores[order])

    def options(self) -> dict[str, Any]:
        return {**self.selector.options(), "sampling": self.sampling.mode, "temperature": self.sampling.temperature}

    @property
    def label(self) -> str:
        """``entropy+power`` (``entropy+power(T=0.5)`` away from the default temperature)."""
        return f"{self.name}+{self.sampling.label}"
