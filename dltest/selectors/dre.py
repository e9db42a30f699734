"""DRE: density-based robust sampling with entropy (the paper's Algorithm 1).

DRE samples the pool so that the entropy of the selection has the pool's distribution:
a 50-bin equal-width histogram of entropies, a quota per bin proportional to its count
(largest-remainder rounding, so quotas sum to the budget), and a seeded uniform draw in each bin.
Unlike the uncertainty selectors, it adds no bias towards high-entropy inputs, which is what
keeps adversarial training robust.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from dltest.selectors.base import Candidates, Selection, Selector, float64_probs, register
from dltest.selectors.uncertainty import entropy


def histogram_bins(values: Tensor, bins: int) -> Tensor:
    """Bin of each value in ``bins`` equal-width bins over [min, max]; the last bin is closed."""
    v = values.detach().double().cpu().numpy()
    lo, hi = v.min(), v.max()
    if hi <= lo:
        return torch.zeros(len(v), dtype=torch.long)
    edges = np.linspace(lo, hi, bins + 1)
    which = np.searchsorted(edges, v, side="right") - 1
    return torch.from_numpy(np.clip(which, 0, bins - 1))


def largest_remainder_quotas(counts: Tensor, budget: int) -> Tensor:
    """Integer quotas proportional to ``counts`` that sum to ``budget``; ties to lower bins.

    Quota k is floor(budget * count_k / n) plus one for the bins with the largest remainders
    budget * count_k mod n, compared as integers (exact: float remainders of equal fractions can
    differ in their last bit and would break ties by rounding, not by bin).
    """
    counts = counts.long()
    n = int(counts.sum())
    scaled = counts * budget
    quotas = scaled // n
    remainders = (scaled % n).numpy()
    short = budget - int(quotas.sum())
    order = np.lexsort((np.arange(len(remainders)), -remainders))[:short]
    quotas[torch.from_numpy(order)] += 1
    return quotas


@register
class DRE(Selector):
    name = "dre"
    summary = "DRE: random draw per entropy-histogram bin, matching the pool's entropy density"
    score_name = "entropy"

    def __init__(self, bins: int = 50):
        self.bins = bins

    def __call__(self, candidates: Candidates, budget: int, generator: torch.Generator) -> Selection:
        scores = entropy(float64_probs(candidates.outputs))
        which = histogram_bins(scores, self.bins)
        counts = torch.bincount(which, minlength=self.bins)
        quotas = largest_remainder_quotas(counts, budget)
        chosen = []
        for b in torch.nonzero(quotas).flatten().tolist():
            members = torch.nonzero(which == b).flatten()
            chosen.append(members[torch.randperm(len(members), generator=generator)[: quotas[b]]])
        picked = torch.cat(chosen)
        indices = picked[torch.randperm(len(picked), generator=generator)]  # no order by entropy
        return Selection(indices, scores[indices])
