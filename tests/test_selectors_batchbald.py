"""BatchBALD against a brute-force evaluation of the paper's joint mutual information."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from dltest.errors import DltestError
from dltest.selection import select
from dltest.selectors import get_selector
from dltest.selectors.batchbald import batchbald, memory_plan


def mc_samples(n: int, t: int, c: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(n, 1, c, generator=gen, dtype=torch.float64) * 1.5
    noise = torch.randn(n, t, c, generator=gen, dtype=torch.float64) * torch.rand(n, 1, 1, generator=gen, dtype=torch.float64) * 2
    return torch.softmax(base + noise, dim=2)  # (n, T, C)


def mutual_information(probs: np.ndarray, batch: list[int]) -> float:
    """a_BatchBALD(batch) = H(y_batch) - sum_i E_t H(y_i | w_t), every configuration enumerated."""
    n, t, c = probs.shape
    joint = 0.0
    for config in itertools.product(range(c), repeat=len(batch)):
        p = np.mean([np.prod([probs[i, s, y] for i, y in zip(batch, config)]) for s in range(t)])
        joint -= p * math.log(p) if p > 0 else 0.0
    cond = sum(-np.mean([sum(probs[i, s, y] * math.log(probs[i, s, y]) for y in range(c)) for s in range(t)])
               for i in batch)
    return joint - cond


def greedy_reference(probs: np.ndarray, budget: int) -> tuple[list[int], list[float], list[float]]:
    """Plain greedy on the brute-force formula: picks, their scores, and at each step the gap between
    the best and the second-best candidate (a pick is only comparable where that gap is clear)."""
    picks, scores, gaps = [], [], []
    for _ in range(budget):
        values = {j: mutual_information(probs, picks + [j]) for j in range(len(probs)) if j not in picks}
        ranked = sorted(values.values(), reverse=True)
        best = max(sorted(values), key=lambda j: values[j])
        picks.append(best)
        scores.append(values[best])
        gaps.append(ranked[0] - ranked[1] if len(ranked) > 1 else math.inf)
    return picks, scores, gaps


@pytest.mark.parametrize("chunk", [1, 3, 14])
def test_batchbald_equals_the_papers_formula_while_exact(chunk):
    probs = mc_samples(14, 5, 3, seed=0)
    picks, scores = batchbald(probs, 4, torch.Generator().manual_seed(0), joint_samples=100, chunk=chunk)  # 3^4 = 81 <= 100
    ref_picks, ref_scores, gaps = greedy_reference(probs.numpy(), 4)
    assert min(gaps) > 1e-6  # every step has a clear winner: the picks are comparable across the two codes
    assert picks.tolist() == ref_picks
    np.testing.assert_allclose(scores.numpy(), ref_scores, rtol=1e-10)
    # the first pick is the BALD maximum, and the batch avoids the near-duplicate BALD would take next
    bald = [mutual_information(probs.numpy(), [j]) for j in range(14)]
    assert picks[0] == int(np.argmax(bald))


def test_batchbald_chunking_changes_no_bit_of_a_selection():
    """Exact by construction: every candidate is scored by the same elementwise operations in the same
    order whatever the chunk, and the lazy greedy judges candidates one at a time, so any chunk gives
    the bits of chunk=1 (the same arithmetic, not two codes that happen to agree)."""
    probs = mc_samples(40, 6, 4, seed=2)
    runs = {chunk: batchbald(probs, 9, torch.Generator().manual_seed(7), joint_samples=50, chunk=chunk)
            for chunk in (1, 2, 7, 40)}  # 4^3 = 64 > 50: picks 4..9 are scored on drawn configurations
    picks, scores = runs[1]
    for chunk, (other_picks, other_scores) in runs.items():
        assert other_picks.tolist() == picks.tolist(), chunk
        assert torch.equal(other_scores, scores), chunk
    assert len(set(picks.tolist())) == 9


def test_lazy_greedy_only_skips_candidates_whose_stale_gain_is_beaten():
    from dltest.selectors.batchbald import lazy_best

    # stale marginal gains 5, 4, 3, 2 (positions 0..3); fresh gains with batch entropy 1: 3.5, 4.5, 2, 9
    fresh = {0: 4.5, 1: 5.5, 2: 3.0, 3: 10.0}
    for chunk in (1, 2, 4):
        bound = torch.tensor([5.0, 4.0, 3.0, 2.0], dtype=torch.float64)
        scored: list[int] = []

        def gain_of(rows):
            scored.extend(rows.tolist())
            return torch.tensor([fresh[r] for r in rows.tolist()], dtype=torch.float64)

        best = lazy_best(torch.arange(4), bound, chunk, gain_of, batch_entropy=1.0)
        # after 0 and 1 the best fresh marginal gain is 4.5 > 3 (position 2's stale gain): stop there,
        # position 3 (fresh gain 10) is never re-scored, whatever the chunk
        assert best == (5.5, 1), chunk
        assert bound.tolist() == [3.5, 4.5, 3.0, 2.0], chunk  # only what the one-at-a-time rule scored


@pytest.mark.slow
def test_batchbald_sampled_joint_entropy_estimates_the_exact_one():
    probs = mc_samples(12, 8, 4, seed=1)
    # with 2000 configurations, batches of up to 5 picks are enumerated (4^5 = 1024), the 7th pick
    # is scored on 2000 drawn configurations of the first 6 (4^6 = 4096)
    estimates = []
    for seed in range(5):
        picks, scores = batchbald(probs, 7, torch.Generator().manual_seed(seed), joint_samples=2000)
        direct = [mutual_information(probs.numpy(), picks[: k + 1].tolist()) for k in range(7)]
        np.testing.assert_allclose(scores.numpy()[:6], direct[:6], rtol=1e-10)  # exact
        assert scores[6].item() == pytest.approx(direct[6], rel=0.05)  # importance-sampled
        estimates.append(scores[6].item() / direct[6])
    assert np.mean(estimates) == pytest.approx(1.0, abs=0.015)  # no bias beyond the noise


def test_batchbald_is_seeded_and_its_memory_bound_is_enforced(trained_lenet, mnist_test):
    data = mnist_test.subset(torch.arange(200))
    a = select("batchbald", 12, model=trained_lenet, data=data, seed=4, joint_samples=200)
    b = select("batchbald", 12, model=trained_lenet, data=data, seed=4, joint_samples=200)
    c = select("batchbald", 12, model=trained_lenet, data=data, seed=5, joint_samples=200)
    assert a.indices == b.indices and a.scores == b.scores and a.indices != c.indices  # same run, same bits
    assert len(set(a.indices)) == 12
    # the mutual information grows with the batch: exactly while configurations are enumerated (10^2 <= 200
    # for the first 2 picks), and up to the estimate's sampling error after (a dip of 0.005 nats was seen)
    assert a.scores[0] < a.scores[1] < a.scores[-1] and np.all(np.diff(a.scores) > -0.05)
    assert a.options["candidates"] == 120 and a.options["planned_memory_mb"] <= 1024
    chunk, planned = memory_plan(200, 120, 10, 10, 200, max_memory_mb=1)
    assert planned <= 2**20 and 1 <= chunk < 120
    small = select("batchbald", 12, model=trained_lenet, data=data, seed=4, joint_samples=200, max_memory_mb=1)
    assert small.options["chunk"] == chunk < a.options["chunk"]
    # chunked to fit: the same arithmetic for every candidate (see the test above), so the same picks
    assert small.indices == a.indices and small.scores == a.scores
    with pytest.raises(DltestError, match="above max_memory_mb=1"):
        select("batchbald", 12, model=trained_lenet, data=data, joint_samples=10**6, max_memory_mb=1)
    with pytest.raises(DltestError, match="max_memory_mb must be > 0"):
        get_selector("batchbald", max_memory_mb=0)


def test_ordered_sum_is_the_sum_and_does_not_depend_on_the_other_rows():
    from dltest.selectors.base import ordered_sum

    x = torch.rand(37, 13, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    np.testing.assert_allclose(ordered_sum(x, dim=1).numpy(), [math.fsum(row) for row in x.tolist()], rtol=1e-15)
    alone = torch.stack([ordered_sum(x[i : i + 1], dim=1)[0] for i in range(37)])
    assert torch.equal(alone, ordered_sum(x, dim=1))  # the same elementwise additions for a row, alone or not
    assert torch.equal(ordered_sum(x.T.contiguous(), dim=0), ordered_sum(x, dim=1))  # nor on the layout
