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
from dltest.selectors import Pool, get_selector
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
    """k-means++ seeding on explicit embeddings: first the largest norm, then D^2 sampling."""
    picked = [int(torch.argmax(g.norm(dim=1)))]
    while len(picked) < budget:
        d2 = torch.cdist(g, g[picked], compute_mode="donot_use_mm_for_euclid_dist").min(dim=1).values.pow(2)
        d2[picked] = 0
        u = float(torch.rand((), generator=generator, dtype=torch.float64)) * float(d2.sum())
        total = 0.0
        for i, v in enumerate(d2.tolist()):
            total += v
            if total > u:
                picked.append(i)
                break
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
