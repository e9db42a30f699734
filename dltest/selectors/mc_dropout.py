"""MC-dropout selectors: BALD and dropout entropy (SPEC §1, "MC dropout").

Both score T stochastic predictions per input, drawn with dropout on by
:func:`dltest.inference.mc_predictions` (which says where the dropout goes), as baal's
heuristics score an array of predictions:

- ``bald``: H(mean_t p_t) - mean_t H(p_t), the mutual information between label and weights;
- ``dropout-entropy``: H(mean_t p_t), the entropy of the averaged prediction,

with ``xlogy`` so that a zero probability gives 0, never NaN. The options written into a
selection record what was used: ``dropout`` is the model's own rate(s) when it has dropout
modules, else the rate dltest put in, and ``dropout_placement`` says where (``model``,
``head``, ``last-linear`` or ``input``; see :func:`dltest.inference.dropout_placement`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from dltest.errors import DltestError
from dltest.inference import dropout_placement, mc_predictions
from dltest.runtime import dropout_modules
from dltest.selectors.base import Candidates, ScoreSelector, register
from dltest.selectors.uncertainty import entropy


def mc_probabilities(candidates: Candidates, samples: int = 10, dropout: float = 0.1,
                     generator: torch.Generator | None = None) -> Tensor:
    """The (T, n, C) MC-dropout predictions of the candidates (their cached embeddings reused)."""
    if candidates.model is None:
        raise DltestError("MC dropout needs the model")
    return mc_predictions(candidates.model, candidates.data, samples, dropout, generator,
                          embeddings=candidates.outputs.embeddings, device=candidates.device)


def bald_from_samples(probs: Tensor) -> Tensor:
    """BALD of (T, n, C) sampled probabilities: H(mean_t p_t) - mean_t H(p_t)."""
    probs = probs.double()
    return entropy(probs.mean(0)) - entropy(probs).mean(0)


def dropout_entropy_from_samples(probs: Tensor) -> Tensor:
    """H(mean_t p_t) of (T, n, C) sampled probabilities."""
    return entropy(probs.double().mean(0))


class _MCDropoutSelector(ScoreSelector):
    needs_model = True
    needs_mc_samples = True

    def __init__(self, samples: int = 10, dropout: float = 0.1):
        if int(samples) != samples or samples < 1:
            raise DltestError(f"samples (T) must be a whole number >= 1, not {samples}")
        if not 0.0 <= float(dropout) < 1.0:
            raise DltestError(f"dropout must lie in [0, 1), not {dropout}")
        self.samples = int(samples)
        self.dropout = float(dropout)
        self.used: dict[str, Any] = {}  # what the last call used: dropout rate(s) and placement

    def from_samples(self, probs: Tensor) -> Tensor:
        raise NotImplementedError

    def options(self) -> dict[str, Any]:
        return {**super().options(), **self.used}

    def scored(self, candidates: Candidates, budget: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        if candidates.model is None:
            raise DltestError("MC dropout needs the model")
        placement = dropout_placement(candidates.model)
        rates = sorted({float(m.p) for m in dropout_modules(candidates.model)})
        used = (rates[0] if len(rates) == 1 else rates) if placement == "model" else self.dropout
        self.used = {"dropout": used, "dropout_placement": placement}
        scores = self.from_samples(mc_probabilities(candidates, self.samples, self.dropout, generator))
        return torch.arange(len(candidates)), scores


@register
class BALD(_MCDropoutSelector):
    name = "bald"
    summary = "BALD: highest mutual information H(mean p) - mean H(p) over T MC-dropout samples"
    score_name = "BALD (nats)"

    def from_samples(self, probs: Tensor) -> Tensor:
        return bald_from_samples(probs)


@register
class DropoutEntropy(_MCDropoutSelector):
    name = "dropout-entropy"
    summary = "MC-dropout entropy: highest entropy of the mean of T MC-dropout predictions"
    score_name = "entropy of the MC-dropout mean (nats)"

    def from_samples(self, probs: Tensor) -> Tensor:
        return dropout_entropy_from_samples(probs)
