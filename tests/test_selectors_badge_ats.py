"""BADGE and ATS against slow references built from the papers' definitions."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dltest.inference import PoolOutputs, infer
from dltest.selection import select
from dltest.selectors import get_selector
from dltest.selectors.badge import gradient_embeddings, kmeans_pp_gradients

SEED = 3


# --- BADGE ---------------------------------------------------------------------------------------


def test_badge_gradient_embeddings_equal_autograd():
    torch.manual_seed(0)
    head = nn.Linear(6, 4).double()
    z = torch.randn(9, 6, dtype=torch.float64)
    probs = torch.softmax(head(z), dim=1).detach()
    ours = gradient_embeddings(probs, z)
    for i in range(len(z)):
        logits = head(z[i : i + 1])
        label = logits.argmax(dim=1)  # the hypothetical label: the prediction
        (grad,) = torch.autograd.grad(F.cross_entropy(logits, label, reduction="sum"), head.weight)
        np.testing.assert_allclose(ours[i].numpy(), grad.flatten().numpy(), rtol=1e-12, atol=1e-14)


def kmeans_pp_reference(g: torch.Tensor, budget: int, generator: torch.Generator) -> list[int]:
    """k-means++ seeding on explicit embeddings: first the largest norm, then D^2 sampling.

    Each draw is checked to fall clear of the boundaries between inputs (by 1e-6 of the total), and
    the largest norm clear of the second: otherwise rounding differences between this code and
    dltest's could legitimately pick a neighbour, and the comparison would test the CPU."""
    norms = g.norm(dim=1).sort(descending=True).values
    assert norms[0] - norms[1] > 1e-6 * norms[0]
    picked = [int(torch.argmax(g.norm(dim=1)))]
    while len(picked) < budget:
        d2 = torch.cdist(g, g[picked], compute_mode="donot_use_mm_for_euclid_dist").min(dim=1).values.pow(2)
        d2[picked] = 0
        u = float(torch.rand((), generator=generator, dtype=torch.float64)) * float(d2.sum())
        cumulative = np.cumsum(d2.double().numpy())
        assert np.abs(cumulative - u).min() > 1e-6 * cumulative[-1]
        picked.append(int(np.searchsorted(cumulative, u, side="right")))
    return picked


def test_badge_kmeans_pp_equals_reference_on_explicit_embeddings():
    torch.manual_seed(1)
    logits = 2.5 * torch.randn(60, 5, dtype=torch.float64)
    z = torch.randn(60, 7).abs()
    probs = torch.softmax(logits, dim=1)
    picked, distances = kmeans_pp_gradients(probs, z, 12, torch.Generator().manual_seed(SEED))
    g = gradient_embeddings(probs, z)
    ref = kmeans_pp_reference(g, 12, torch.Generator().manual_seed(SEED))
    assert picked.tolist() == ref
    assert distances[0] == pytest.approx(float(g[ref[0]].norm()))
    for k in range(1, 12):
        nearest = min(float((g[ref[k]] - g[c]).norm()) for c in ref[:k])
        assert distances[k] == pytest.approx(nearest, rel=1e-5)


def test_badge_picks_are_distinct_even_among_duplicates():
    probs = torch.tensor([[0.6, 0.4]] * 5 + [[0.9, 0.1]] * 3, dtype=torch.float64)
    z = torch.ones(8, 3)
    picked, _ = kmeans_pp_gradients(probs, z, 8, torch.Generator().manual_seed(0))
    assert sorted(picked.tolist()) == list(range(8))  # two distinct points, then uniform draws


def test_badge_through_select_is_seeded_and_diverse(trained_lenet, mnist_test):
    data = mnist_test.subset(torch.arange(400))
    outputs = infer(trained_lenet, data, device="cpu")
    a = select("badge", 40, outputs=outputs, data=data, seed=5)
    b = select("badge", 40, outputs=outputs, data=data, seed=5)
    c = select("badge", 40, outputs=outputs, data=data, seed=6)
    assert a.indices == b.indices and a.indices != c.indices
    assert len(set(a.indices)) == 40
    assert len(a.predicted_counts) >= 8  # diverse: most classes are represented
    with pytest.raises(Exception, match="embeddings"):
        select("badge", 4, outputs=PoolOutputs.from_probs(outputs.probs))


# --- ATS -----------------------------------------------------------------------------------------


def union_length(intervals: list[tuple[float, float]]) -> float:
    """Total length of a union of intervals, by a sweep over +1/-1 events (length where the count > 0)."""
    events = sorted([(a, 1) for a, _ in intervals] + [(b, -1) for _, b in intervals], key=lambda e: (e[0], -e[1]))
    total, depth, last = 0.0, 0, 0.0
    for x, step in events:
        if depth > 0:
            total += x - last
        depth, last = depth + step, x
    return total


def landing_point(x: np.ndarray, i: int, p: int, q: int) -> tuple[float, float]:
    """(x'_i, y) by geometry, not by the closed form: x' is the orthogonal projection of x onto the
    plane through the corners e_i, e_p, e_q; the ray from e_i through x' meets the line through e_p
    and e_q at y e_p + (1 - y) e_q (least squares on the C coordinates, exact for a consistent system)."""
    c = len(x)
    e = np.eye(c)
    basis = np.stack([e[p] - e[i], e[q] - e[i]], axis=1)  # (C, 2)
    coef, *_ = np.linalg.lstsq(basis, x - e[i], rcond=None)
    x_proj = e[i] + basis @ coef
    # e_i + s (x' - e_i) = e_q + y (e_p - e_q)  <=>  s (x' - e_i) - y (e_p - e_q) = e_q - e_i
    (s, y), *_ = np.linalg.lstsq(np.stack([x_proj - e[i], -(e[p] - e[q])], axis=1), e[q] - e[i], rcond=None)
    return float(x_proj[i]), float(y)


def ats_reference(probs: np.ndarray, upper=0.99, radius=0.005, threshold=0.001):
    """ATS (Gao et al., ICSE 2022) from the paper's construction, one input, pair and union at a time:
    per predicted class i, every input below ``upper`` is projected onto the plane of (i, p, q) for
    every pair of other classes, extended from e_i to the edge p--q, and covers [y - r, y + r] there
    (r = radius * (upper - x'_i)); the fitness of a set is the summed length of the unions; greedy by
    fitness gain. Returns (order, score of each ordered input): greedy picks by gain, then the
    inputs set aside by their own coverage (dltest's documented order after the paper's greedy)."""
    n, c = probs.shape
    predicted = probs.argmax(axis=1)
    picked, aside = [], []
    for i in sorted(set(predicted.tolist())):
        members = [k for k in range(n) if predicted[k] == i and probs[k, i] < upper]
        pairs = list(itertools.combinations([k for k in range(c) if k != i], 2))
        cover = {}
        for k in members:
            cover[k] = []
            for p, q in pairs:
                xi, y = landing_point(probs[k], i, p, q)
                d = upper - xi
                cover[k].append((min(max(y - radius * d, 0), 1), min(max(y + radius * d, 0), 1)) if d > 0 else None)

        def fitness(chosen):
            return sum(union_length([cover[k][t] for k in chosen if cover[k][t] is not None]) for t in range(len(pairs)))

        chosen, alive = [], set(members)
        while alive:
            base = fitness(chosen)
            gains = {k: fitness(chosen + [k]) - base for k in sorted(alive)}
            alive = {k for k in alive if gains[k] > threshold}
            if not alive:
                break
            best = max(sorted(alive), key=lambda k: gains[k])  # first of equal maxima
            chosen.append(best)
            picked.append((gains[best], best))
            alive.discard(best)
        for k in members:
            if k not in chosen:
                aside.append((sum(b - a for a, b in filter(None, cover[k])), k))
    ranked = sorted(picked, key=lambda t: (-t[0], t[1])) + sorted(aside, key=lambda t: (-t[0], t[1]))
    return [k for _, k in ranked], [g for g, _ in ranked]


def assert_same_order(order, scores, ref_order, ref_scores, tol=1e-9):
    """Scores within tolerance, and the same inputs in the same places except among near-equal scores
    (two codes may order those differently without either being wrong)."""
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-9, atol=1e-12)
    ref_score_of = dict(zip(ref_order, ref_scores))
    assert sorted(order) == sorted(ref_order)
    for k, (ours, theirs) in enumerate(zip(order, ref_order)):
        assert ours == theirs or abs(ref_score_of[ours] - ref_scores[k]) <= tol, (k, ours, theirs)


def test_ats_on_hand_made_outputs_gives_the_hand_computed_order_and_gains():
    from dltest.selectors.ats import ats_order

    probs = torch.tensor([
        [0.6, 0.2, 0.2],  # 0: class 0, lands at y = 0.2 / 0.4 = 0.5, r = 0.1 * 0.39: [0.461, 0.539]
        [0.6, 0.3, 0.1],  # 1: class 0, y = 0.75: [0.711, 0.789]
        [0.5, 0.25, 0.25],  # 2: class 0, y = 0.5, r = 0.049: [0.451, 0.549], covers all of input 0's
        [0.995, 0.004, 0.001],  # 3: confident: last
        [0.2, 0.7, 0.1],  # 4: class 1, pair (0, 2): y = 0.2 / 0.3, r = 0.029
    ], dtype=torch.float64)
    order, scores = ats_order(probs, torch.Generator().manual_seed(0), radius=0.1)
    # greedy gains: 2 (0.098) then 1 (0.078) in class 0, 4 (0.058) in class 1; 0 adds nothing once 2
    # is picked: set aside with its own coverage 0.078; the confident input comes last
    assert order.tolist() == [2, 1, 4, 0, 3]
    np.testing.assert_allclose(scores[:4].numpy(), [0.098, 0.078, 0.058, 0.078], rtol=1e-12)
    assert math.isnan(scores[4])
    ref_order, ref_scores = ats_reference(probs.numpy(), radius=0.1)
    assert ref_order == [2, 1, 4, 0]
    np.testing.assert_allclose(ref_scores, [0.098, 0.078, 0.058, 0.078], rtol=1e-12)


def test_ats_projection_lands_on_the_opposite_edge():
    from dltest.selectors.ats import ats_intervals

    # on the face (0, 1, 2) of a 4-class simplex: x' = x; the ray from e_0 through (0.5, 0.3, 0.2)
    # meets the edge e_1--e_2 at y = 0.3 / 0.5 = 0.6, with radius 0.005 * (0.99 - 0.5)
    lo, hi, pairs = ats_intervals(torch.tensor([[0.5, 0.3, 0.2, 0.0]], dtype=torch.float64), 0)
    assert pairs == [(1, 2), (1, 3), (2, 3)]
    r = 0.005 * 0.49
    assert lo[0, 0].item() == pytest.approx(0.6 - r) and hi[0, 0].item() == pytest.approx(0.6 + r)
    # confident: x'_0 >= 0.99 -> no interval
    lo, hi, _ = ats_intervals(torch.tensor([[0.995, 0.005, 0.0, 0.0]], dtype=torch.float64), 0)
    assert torch.equal(lo, hi)


def test_ats_equals_the_papers_greedy_on_small_pools():
    from dltest.selectors.ats import ats_order

    gen = torch.Generator().manual_seed(0)
    for trial in range(3):
        logits = 3.0 * torch.randn(70, 5, generator=gen, dtype=torch.float64)
        logits[:8, 0] += 12  # some confident inputs
        probs = torch.softmax(logits, dim=1)
        order, scores = ats_order(probs, torch.Generator().manual_seed(1))
        ref_order, ref_scores = ats_reference(probs.numpy())
        confident = (probs.max(dim=1).values >= 0.99).sum().item()
        assert confident >= 8
        assert_same_order(order[: len(ref_order)].tolist(), scores[: len(ref_order)].numpy(), ref_order, ref_scores)
        assert sorted(order.tolist()) == list(range(70))
        assert torch.isnan(scores[len(ref_order):]).all() and len(order) - len(ref_order) == confident


def test_ats_is_seeded_and_selects_distinct_inputs(trained_lenet, mnist_test):
    data = mnist_test.subset(torch.arange(300))
    outputs = infer(trained_lenet, data, device="cpu")
    a = select("ats", 250, outputs=outputs, seed=1)
    b = select("ats", 250, outputs=outputs, seed=1)
    c = select("ats", 250, outputs=outputs, seed=2)
    assert a.indices == b.indices and len(set(a.indices)) == 250
    head = [i for i, s in zip(a.indices, a.scores) if s is not None]
    assert c.indices[: len(head)] == head  # only the confident tail depends on the seed
    if len(head) < 250:
        assert a.indices != c.indices
    with pytest.raises(Exception, match="upper"):
        get_selector("ats", upper=1.5)
