"""ATS: adaptive test selection (Gao et al., ICSE 2022), from the outputs only.

ATS selects inputs whose output probabilities cover many different "fault patterns". Inputs are
grouped by predicted class i. Those with p_i >= ``upper`` (0.99) are confident and come last,
in a seeded random order. For every other input x and every pair {p, q} of the other classes:

1. project p(x) onto the face of the simplex spanned by e_i, e_p, e_q:
   x'_k = x_k + (1 - x_i - x_p - x_q) / 3 for k in {i, p, q};
2. extend the ray from e_i through x' to the opposite edge e_p--e_q, where it lands at
   y = x'_p / (1 - x'_i) in [0, 1];
3. the input covers the interval [y - r, y + r] of that edge (clipped to [0, 1]), with the radius
   r = ``radius`` * (upper - x'_i) larger for inputs further from class i's corner; no interval
   when x'_i >= upper.

The fitness of a set of inputs of class i is the total length of the union of their intervals,
summed over the C(C-1, 2) pairs. Per class, inputs are picked greedily by their gain in fitness
(ties to the lower pool position); an input whose gain falls to ``threshold`` or below is set
aside for good (gains only shrink as the union grows). The selection order is then: all greedy
picks of all classes by decreasing gain; the inputs set aside, by decreasing coverage of their own
(the summed length of their intervals); the confident inputs.

The greedy gains are exact and vectorised: per pair, the endpoints of all intervals of the class
cut the edge into elementary segments, a covered flag per segment records the union, and every
candidate's gain is a difference of two prefix sums of uncovered length, for all candidates and
pairs at once.

Differences from the authors' code (SSCT-Lab/ATS), which this follows otherwise (upper 0.99,
radius 0.005, threshold 0.001): its projection writes the q-coordinate into p and leaves q at 0,
so it measured the wrong coordinate; an input with p_i exactly 0.99 fell in no region and was
lost; interval ends were rounded to 5 decimals; and the ranking of the set-aside inputs indexed
a list by its own values. Here the projection is the one the paper describes, every input is
ranked, no rounding is applied, and the set-aside inputs are ranked by their own coverage.
"""

from __future__ import annotations

import itertools
import math

import torch
from torch import Tensor

from dltest.errors import DltestError
from dltest.selectors.base import Candidates, Selection, Selector, float64_probs, rank, register


def ats_intervals(probs: Tensor, label: int, upper: float = 0.99, radius: float = 0.005) -> tuple[Tensor, Tensor, list[tuple[int, int]]]:
    """(lo, hi, pairs): each input's covered interval [lo, hi] on the edge of every pair (p, q) of
    classes other than ``label`` (m, P); an empty interval has lo == hi."""
    c = probs.shape[1]
    pairs = list(itertools.combinations([k for k in range(c) if k != label], 2))
    if not pairs:
        empty = torch.zeros((len(probs), 0), dtype=torch.float64)
        return empty, empty.clone(), pairs
    x = probs.double()
    p_idx = torch.tensor([p for p, _ in pairs])
    q_idx = torch.tensor([q for _, q in pairs])
    xi = x[:, label : label + 1]
    shift = (1.0 - xi - x[:, p_idx] - x[:, q_idx]) / 3.0
    xi_proj = xi + shift
    xp_proj = x[:, p_idx] + shift
    distance = upper - xi_proj
    covers = distance > 0
    y = xp_proj / torch.where(covers, 1.0 - xi_proj, torch.ones_like(xi_proj))
    r = radius * distance
    lo = (y - r).clamp(0.0, 1.0)
    hi = (y + r).clamp(0.0, 1.0)
    lo = torch.where(covers, lo, torch.zeros_like(lo))
    hi = torch.where(covers, torch.maximum(hi, lo), lo)
    return lo, hi, pairs


def greedy_coverage(lo: Tensor, hi: Tensor, threshold: float) -> tuple[list[int], list[float]]:
    """Greedy picks (rows of ``lo``/``hi``) by coverage gain, and the gain of each when picked."""
    m, npairs = lo.shape
    if m == 0 or npairs == 0:
        return [], []
    ends = torch.cat([lo, hi], dim=0).T  # (P, 2m): every endpoint of every pair's intervals
    points, _ = ends.sort(dim=1)
    seg_len = points[:, 1:] - points[:, :-1]  # (P, 2m - 1) elementary segments
    start = torch.searchsorted(points.contiguous(), lo.T.contiguous())  # (P, m): first segment of each interval
    stop = torch.searchsorted(points.contiguous(), hi.T.contiguous())  # one past its last segment
    covered = torch.zeros_like(seg_len, dtype=torch.bool)
    alive = torch.ones(m, dtype=torch.bool)
    segments = torch.arange(seg_len.shape[1]).unsqueeze(0)
    zero = torch.zeros((npairs, 1), dtype=torch.float64)
    picks, gains = [], []
    while bool(alive.any()):
        uncovered = torch.cat([zero, torch.where(covered, 0.0, seg_len).cumsum(dim=1)], dim=1)
        gain = (uncovered.gather(1, stop) - uncovered.gather(1, start)).sum(dim=0)
        alive &= gain > threshold
        if not bool(alive.any()):
            break
        best = int(torch.argmax(torch.where(alive, gain, -math.inf)))  # first maximum: lower row
        picks.append(best)
        gains.append(float(gain[best]))
        alive[best] = False
        covered |= (segments >= start[:, best : best + 1]) & (segments < stop[:, best : best + 1])
    return picks, gains


def ats_order(probs: Tensor, generator: torch.Generator, upper: float = 0.99, radius: float = 0.005,
              threshold: float = 0.001) -> tuple[Tensor, Tensor]:
    """(order, scores) of the whole pool: greedy picks by gain, then the set-aside inputs by their
    own coverage, then the confident inputs (p_i >= upper) in a seeded random order (score NaN)."""
    probs = probs.double()
    predicted = probs.argmax(dim=1)
    confident = probs.max(dim=1).values >= upper
    picked, picked_gain, aside, aside_cover = [], [], [], []
    for label in torch.unique(predicted).tolist():
        members = torch.nonzero((predicted == label) & ~confident).flatten()
        if len(members) == 0:
            continue
        lo, hi, _ = ats_intervals(probs[members], label, upper, radius)
        rows, gains = greedy_coverage(lo, hi, threshold)
        picked.append(members[rows] if rows else members[:0])
        picked_gain.append(torch.tensor(gains, dtype=torch.float64))
        rest = torch.ones(len(members), dtype=torch.bool)
        rest[rows] = False
        aside.append(members[rest])
        aside_cover.append((hi - lo)[rest].sum(dim=1))

    def by_score(positions: list[Tensor], scores: list[Tensor]) -> tuple[Tensor, Tensor]:
        if not positions:
            return torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.float64)
        pos, sc = torch.cat(positions), torch.cat(scores)
        order = pos.argsort()  # rank() breaks ties by position within what it is given
        pos, sc = pos[order], sc[order]
        ranked = rank(sc, len(sc), highest=True)
        return pos[ranked], sc[ranked]

    first, first_scores = by_score(picked, picked_gain)
    second, second_scores = by_score(aside, aside_cover)
    last = torch.nonzero(confident).flatten()
    last = last[torch.randperm(len(last), generator=generator)]
    order = torch.cat([first, second, last])
    scores = torch.cat([first_scores, second_scores, torch.full((len(last),), math.nan, dtype=torch.float64)])
    return order, scores


@register
class ATS(Selector):
    name = "ats"
    summary = "ATS: greedy coverage of fault patterns in the output space, per predicted class"
    score_name = "coverage gain when picked (then: own coverage; null: confident, p >= upper)"

    def __init__(self, upper: float = 0.99, radius: float = 0.005, threshold: float = 0.001):
        if not 0.0 < float(upper) <= 1.0:
            raise DltestError(f"upper must lie in (0, 1], not {upper}")
        if not float(radius) > 0:
            raise DltestError(f"radius must be > 0, not {radius}")
        if not float(threshold) >= 0:
            raise DltestError(f"threshold must be >= 0, not {threshold}")
        self.upper = float(upper)
        self.radius = float(radius)
        self.threshold = float(threshold)

    def __call__(self, candidates: Candidates, budget: int, generator: torch.Generator) -> Selection:
        order, scores = ats_order(float64_probs(candidates.outputs), generator, self.upper, self.radius, self.threshold)
        return Selection(order[:budget], scores[:budget])
