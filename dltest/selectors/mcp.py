"""MCP: multiple-boundary clustering and prioritisation (Shen et al., ASE 2020).

Each input belongs to the cluster of its ordered (top-1, top-2) class pair, with priority
p2 / p1 (higher = nearer that boundary). Round k takes the k-th best input of every cluster
that still has one, while the budget left covers them all; the last, partial round takes the
best of those by priority. Equivalently: sort by (rank in cluster, -priority, position) and
take the first ``budget``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from dltest.selectors.base import Candidates, Selection, Selector, float64_probs, register


def mcp_priority(probs: Tensor) -> tuple[Tensor, Tensor]:
    """(cluster id, priority p2/p1) of each row; classes tied in probability go lower index first."""
    p = probs.detach().double().cpu()
    n, c = p.shape
    rows = torch.arange(n)
    first = p.argmax(dim=1)  # argmax returns the first of tied maxima
    if c == 1:
        return first, torch.zeros(n, dtype=torch.float64)
    rest = p.clone()
    rest[rows, first] = -1.0
    second = rest.argmax(dim=1)
    return first * c + second, p[rows, second] / p[rows, first]


def mcp_order(cluster: Tensor, priority: Tensor) -> Tensor:
    """All positions in MCP's selection order."""
    cl, pr = cluster.numpy(), priority.numpy()
    positions = np.arange(len(cl))
    by_cluster = np.lexsort((positions, -pr, cl))  # within each cluster: best first
    rank = np.empty(len(cl), dtype=np.int64)
    sorted_cl = cl[by_cluster]
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_cl)) + 1]
    run_lengths = np.diff(np.r_[starts, len(cl)])
    rank[by_cluster] = np.arange(len(cl)) - np.repeat(starts, run_lengths)
    return torch.from_numpy(np.lexsort((positions, -pr, rank)))


@register
class MCP(Selector):
    name = "mcp"
    summary = "MCP: round-robin over (top-1, top-2) class-pair clusters, highest p2/p1 first"
    score_name = "p2 / p1"

    def __call__(self, candidates: Candidates, budget: int, generator: torch.Generator) -> Selection:
        cluster, priority = mcp_priority(float64_probs(candidates.outputs))
        indices = mcp_order(cluster, priority)[:budget]
        return Selection(indices, priority[indices].float())
