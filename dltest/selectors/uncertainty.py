"""Output-based uncertainty scores and their selectors: entropy, DeepGini, least confidence, margin.

The score functions are pure functions of the probability matrix (n, C); the analyses reuse them
as the characteristics whose selection bias they measure. The selectors score float64
probabilities (:func:`float64_probs`: the given ones when the pool's outputs were given as
probabilities), so that rankings do not depend on float32 rounding.

Ties are exact: each score is computed from the row's probabilities sorted in decreasing order,
summed in a fixed order (:func:`ordered_sum`), so rows that are permutations of each other get the
same bits whatever the row's position, the pool's size or the CPU, and a tie goes to the lower pool
position as SPEC says (lc and margin need no sum: 1 - p1 and p1 - p2 of the given values).
"""

from __future__ import annotations

import torch
from torch import Tensor

from dltest.selectors.base import Candidates, ScoreSelector, float64_probs, ordered_sum, register


def _sorted_desc(probs: Tensor) -> Tensor:
    return probs.sort(dim=-1, descending=True, stable=True).values


def entropy(probs: Tensor) -> Tensor:
    """Shannon entropy (nats) along the last dimension; ``xlogy`` makes 0 log 0 = 0, never NaN."""
    p = _sorted_desc(probs)
    return 0.0 - ordered_sum(torch.special.xlogy(p, p), dim=-1)  # 0.0 - x: no negative zeros


def gini(probs: Tensor) -> Tensor:
    """DeepGini impurity 1 - sum p^2."""
    p = _sorted_desc(probs)
    return 1.0 - ordered_sum(p * p, dim=1)


def least_confidence(probs: Tensor) -> Tensor:
    """1 - p1, where p1 is the top probability."""
    return 1.0 - probs.max(dim=1).values


def top2(probs: Tensor) -> tuple[Tensor, Tensor]:
    """The largest and second-largest probability of each row (p2 = 0 with a single class)."""
    if probs.shape[1] == 1:
        return probs[:, 0], torch.zeros_like(probs[:, 0])
    values = probs.topk(2, dim=1).values
    return values[:, 0], values[:, 1]


def margin(probs: Tensor) -> Tensor:
    """p1 - p2; small margins lie near the decision boundary."""
    p1, p2 = top2(probs)
    return p1 - p2


@register
class Entropy(ScoreSelector):
    name = "entropy"
    summary = "MaxEntropy: highest softmax entropy first"
    score_name = "entropy"

    def score(self, candidates: Candidates) -> Tensor:
        return entropy(float64_probs(candidates.outputs))


@register
class DeepGini(ScoreSelector):
    name = "deepgini"
    summary = "DeepGini: highest Gini impurity 1 - sum p^2 first"
    score_name = "gini"

    def score(self, candidates: Candidates) -> Tensor:
        return gini(float64_probs(candidates.outputs))


@register
class LeastConfidence(ScoreSelector):
    name = "lc"
    summary = "Least confidence: highest 1 - p1 first"
    score_name = "1 - p1"

    def score(self, candidates: Candidates) -> Tensor:
        return least_confidence(float64_probs(candidates.outputs))


@register
class Margin(ScoreSelector):
    name = "margin"
    summary = "Margin: lowest p1 - p2 first"
    score_name = "p1 - p2"
    highest = False

    def score(self, candidates: Candidates) -> Tensor:
        return margin(float64_probs(candidates.outputs))
