"""Core-set: k-center greedy on penultimate-layer embeddings (Sener & Savarese 2018; SPEC §1).

Each step picks the pool input farthest from its nearest center and makes it a center. The
centers start from the labeled set when there is one (``dltest select --labeled FILE``, the labeled
pool of robust active learning), else from one seeded random pool input. One vector holds each
pool input's squared distance to its nearest center and is updated with every new center: O(n d)
memory, never an n x n matrix; distances to the labeled set are computed in chunks. The work runs
on the pool's device (the GPU when there is one).

Squared distances use ||a||^2 + ||b||^2 - 2 a.b (one matrix-vector product per new center) on
embeddings centred on their mean, which keeps the float32 rounding far below the distances. The
score of a selected input is its distance to the nearest center when it was picked (+inf for the
random first center of a selection without a labeled set).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from dltest.errors import DltestError
from dltest.selectors.base import Candidates, Selection, Selector, register

CHUNK = 4096  # rows per block of the pool-to-labeled distances (CHUNK x CHUNK floats at a time)


def _min_sq_distances(x: Tensor, x_sq: Tensor, centers: Tensor, shift: Tensor, chunk: int = CHUNK) -> Tensor:
    """Squared distance of each row of ``x`` to its nearest row of ``centers``, block by block."""
    out = torch.full((len(x),), math.inf, dtype=x.dtype, device=x.device)
    for c in range(0, len(centers), chunk):
        block = centers[c : c + chunk].to(x.device, x.dtype) - shift
        block_sq = block.pow(2).sum(dim=1)
        for r in range(0, len(x), chunk):
            d2 = x_sq[r : r + chunk, None] + block_sq[None, :] - 2.0 * (x[r : r + chunk] @ block.T)
            out[r : r + chunk] = torch.minimum(out[r : r + chunk], d2.min(dim=1).values)
    return out.clamp_min_(0)


def k_center_greedy(
    embeddings: Tensor,
    budget: int,
    generator: torch.Generator,
    labeled: Tensor | None = None,
    device: torch.device | str = "cpu",
) -> tuple[Tensor, Tensor]:
    """(positions, scores) of ``budget`` k-center-greedy picks from ``embeddings`` (n, d)."""
    n = len(embeddings)
    if budget > n:
        raise DltestError(f"core-set budget {budget} exceeds the pool of {n}")
    x = embeddings.to(device, torch.float32)
    shift = x.mean(dim=0)
    x = x - shift
    x_sq = torch.einsum("ij,ij->i", x, x)  # no n x d temporary
    picked = torch.empty(budget, dtype=torch.long)
    scores = torch.empty(budget, dtype=torch.float64)
    start = 0
    if labeled is not None and len(labeled):
        min_sq = _min_sq_distances(x, x_sq, labeled, shift)
    else:
        first = int(torch.randint(n, (1,), generator=generator))
        picked[0], scores[0] = first, math.inf
        min_sq = (x_sq + x_sq[first] - 2.0 * (x @ x[first])).clamp_min_(0)
        min_sq[first] = -math.inf
        start = 1
    for k in range(start, budget):
        j = int(torch.argmax(min_sq))  # the first of equal maxima: ties go to the lower position
        picked[k], scores[k] = j, math.sqrt(max(float(min_sq[j]), 0.0))
        torch.minimum(min_sq, (x_sq + x_sq[j] - 2.0 * (x @ x[j])).clamp_min_(0), out=min_sq)
        min_sq[j] = -math.inf  # a center is never picked again, even among duplicates
    return picked, scores


@register
class CoreSet(Selector):
    name = "coreset"
    summary = "Core-set: k-center greedy on penultimate embeddings, from the labeled set if any"
    score_name = "distance to the nearest center when picked"
    needs_embeddings = True

    def __call__(self, candidates: Candidates, budget: int, generator: torch.Generator) -> Selection:
        indices, scores = k_center_greedy(
            candidates.outputs.embeddings, budget, generator, labeled=candidates.labeled_embeddings, device=candidates.device
        )
        return Selection(indices, scores)
