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


def greedy_reference(probs: np.ndarray, budget: int) -> tuple[list[int], list[float]]:
    picks, scores = [], []
    for _ in range(budget):
        values = {j: mutual_information(probs, picks + [j]) for j in range(len(probs)) if j not in picks}
        best = max(sorted(values), key=lambda j: values[j])
        picks.append(best)
        scores.append(values[best])
    return picks, scores


def test_batchbald_equals_the_papers_formula_while_exact():
    probs = mc_samples(14, 5, 3, seed=0)
    picks, scores = batchbald(probs, 4, torch.Generator().manual_seed(0), joint_samples=100, chunk=3)  # 3^4 = 81 <= 100
    ref_picks, ref_scores = greedy_reference(probs.numpy(), 4)
    assert picks.tolist() == ref_picks
    np.testing.assert_allclose(scores.numpy(), ref_scores, rtol=1e-10)
    # the first pick is the BALD maximum, and the batch avoids the near-duplicate BALD would take next
    bald = [mutual_information(probs.numpy(), [j]) for j in range(14)]
    assert picks[0] == int(np.argmax(bald))


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
    assert a.indices == b.indices and a.scores == b.scores and a.indices != c.indices
    assert len(set(a.indices)) == 12 and a.scores == sorted(a.scores)  # mutual information grows with the batch
    assert a.options["candidates"] == 120 and a.options["planned_memory_mb"] <= 1024
    chunk, planned = memory_plan(200, 120, 10, 10, 200, max_memory_mb=1)
    assert planned <= 2**20 and 1 <= chunk < 120
    small = select("batchbald", 12, model=trained_lenet, data=data, seed=4, joint_samples=200, max_memory_mb=1)
    assert small.indices == a.indices  # chunked to fit, same result
    with pytest.raises(DltestError, match="above max_memory_mb=1"):
        select("batchbald", 12, model=trained_lenet, data=data, joint_samples=10**6, max_memory_mb=1)
    with pytest.raises(DltestError, match="max_memory_mb must be > 0"):
        get_selector("batchbald", max_memory_mb=0)
