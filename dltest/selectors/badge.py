"""BADGE: batch active learning by diverse gradient embeddings (Ash et al., ICLR 2020).

Each pool input is represented by the gradient of the cross-entropy, at its predicted label
y^ = argmax p, with respect to the weights of the final linear layer: g = (p - e_y^) z^T, a
C x d matrix, where z is the penultimate embedding. Its norm is large for uncertain inputs, its
direction encodes what the input would teach the model. BADGE picks the batch with k-means++
seeding on these embeddings: the first center is the largest gradient embedding, each next one
is drawn with probability proportional to its squared distance to the nearest center (D^2
sampling, from the selection's seeded generator).

The embeddings are never built. With a = p - e_y^, ||g_i||^2 = ||a_i||^2 ||z_i||^2 and
<g_i, g_j> = <a_i, a_j><z_i, z_j>, so each new center costs at most one pass over the cached
probabilities (n x C) and embeddings (n x d): O(n (C + d)) time and memory per center, never
n x C x d and never n x n. Since |<z_i, z_j>| <= ||z_i|| ||z_j||, the C-dimensional factors alone
bound each distance to the new center from below; the d-dimensional product is computed only for
the inputs whose bound falls below their current D^2 (exact: the others cannot move). The bias of the final layer is left out, as in the authors' code.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from dltest.errors import DltestError
from dltest.selectors.base import Candidates, Selection, Selector, float64_probs, register


def gradient_embedding_factors(probs: Tensor, embeddings: Tensor) -> tuple[Tensor, Tensor]:
    """(a, z) with g_i = a_i z_i^T the last-layer gradient embedding: a = p - onehot(argmax p)
    (n, C, float64), z the penultimate embeddings (n, d)."""
    probs = probs.double()
    a = probs.clone()
    a[torch.arange(len(a)), probs.argmax(dim=1)] -= 1.0
    return a, embeddings


def gradient_embeddings(probs: Tensor, embeddings: Tensor) -> Tensor:
    """The full gradient embeddings (n, C * d), float64: for small pools and tests only."""
    a, z = gradient_embedding_factors(probs, embeddings)
    return (a.unsqueeze(2) * z.double().unsqueeze(1)).flatten(1)


def kmeans_pp_gradients(
    probs: Tensor, embeddings: Tensor, budget: int, generator: torch.Generator, device: torch.device | str = "cpu"
) -> tuple[Tensor, Tensor]:
    """(positions, distances) of ``budget`` k-means++ seeds on the gradient embeddings.

    ``distances[k]`` is the distance of pick k to its nearest earlier center (the first pick: its
    norm). Picks are distinct: once every remaining input coincides with a center (all D^2 = 0),
    the rest are drawn uniformly from the inputs not yet picked.
    """
    n = len(probs)
    if budget > n:
        raise DltestError(f"badge budget {budget} exceeds the pool of {n}")
    a, z = gradient_embedding_factors(probs.to(device), embeddings.to(device, torch.float32))
    a_norm, z_norm = a.norm(dim=1), z.double().norm(dim=1)
    g_sq = (a_norm * z_norm).pow(2)
    picked = torch.empty(budget, dtype=torch.long)
    distances = torch.empty(budget, dtype=torch.float64)
    chosen = torch.zeros(n, dtype=torch.bool)
    d2 = torch.full((n,), math.inf, dtype=torch.float64, device=a.device)
    j = int(torch.argmax(g_sq))  # the first of equal maxima: the lower position
    for k in range(budget):
        picked[k] = j
        distances[k] = math.sqrt(float(g_sq[j])) if k == 0 else math.sqrt(max(float(d2[j]), 0.0))
        chosen[j] = True
        # Cauchy-Schwarz on <z_i, z_j> bounds the distance to the new center from below with the
        # C-dimensional factors alone; only the inputs that bound does not rule out pay for the
        # d-dimensional product (on MNIST most confident inputs are ruled out at most steps)
        aa = a @ a[j]
        lower = g_sq + g_sq[j] - 2.0 * aa.abs() * z_norm * z_norm[j]
        near = torch.nonzero(lower < d2 * (1 + 1e-9)).flatten()
        if len(near):
            zz = (z[near] @ z[j]).double()  # in float32, the rest in float64
            to_j = (g_sq[near] + g_sq[j] - 2.0 * aa[near] * zz).clamp_min_(0)
            d2[near] = torch.minimum(d2[near], to_j)
        d2[j] = 0.0  # a center is never drawn again (its earlier peers stay at 0 through the minimum)
        if k + 1 == budget:
            break
        cumulative = torch.cumsum(d2, 0).cpu()
        total = float(cumulative[-1])
        if total > 0:
            u = torch.rand((), generator=generator, dtype=torch.float64) * total
            j = int(torch.searchsorted(cumulative, u, right=True))
            if j >= n:  # u rounded onto the very end of the cumulative sum
                j = int(torch.nonzero(d2 > 0).flatten()[-1])
        else:
            rest = torch.nonzero(~chosen).flatten()
            j = int(rest[torch.randint(len(rest), (1,), generator=generator)])
    return picked, distances


@register
class BADGE(Selector):
    name = "badge"
    summary = "BADGE: k-means++ seeding on last-layer gradient embeddings (uncertain and diverse)"
    score_name = "gradient-embedding distance to the nearest earlier pick (first: its norm)"
    needs_embeddings = True

    def __call__(self, candidates: Candidates, budget: int, generator: torch.Generator) -> Selection:
        indices, distances = kmeans_pp_gradients(
            float64_probs(candidates.outputs), candidates.outputs.embeddings, budget, generator, device=candidates.device
        )
        return Selection(indices, distances)
