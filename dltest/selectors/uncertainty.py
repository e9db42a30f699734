"""Output-based uncertainty scores and their selectors: entropy, DeepGini, least confidence, margin.

The score functions are pure functions of the probability matrix (n, C); the analyses reuse them
as the characteristics whose selection bias they measure. The selectors score float64
probabilities (:func:`float64_probs`), so that rankings do not depend on float32 rounding.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dltest.selectors.base import Candidates, ScoreSelector, float64_probs, register


def entropy(probs: Tensor) -> Tensor:
    """Shannon entropy (nats) along the last dimension; ``xlogy`` makes 0 log 0 = 0, never NaN."""
    return 0.0 - torch.special.xlogy(probs, probs).sum(dim=-1)  # 0.0 - x: no negative zeros


def gini(probs: Tensor) -> Tensor:
    """DeepGini impurity 1 - sum p^2."""
    return 1.0 - probs.pow(2).sum(dim=1)


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
