"""Output-based selectors on hand-made probability matrices whose selections are known."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.spatial.distance import jensenshannon

from dltest import select
from dltest.errors import DltestError
from dltest.selectors.dre import histogram_bins, largest_remainder_quotas
from dltest.selectors.mcp import mcp_order, mcp_priority
from dltest.selectors.uncertainty import entropy, gini, least_confidence, margin

P = torch.tensor(
    [
        [1.0, 0.0, 0.0],  # 0: certain; entropy 0 (0 log 0 must be 0, not NaN)
        [0.5, 0.5, 0.0],  # 1: two-way tie
        [1 / 3, 1 / 3, 1 / 3],  # 2: uniform: the most uncertain
        [0.6, 0.3, 0.1],  # 3
        [0.8, 0.1, 0.1],  # 4
        [0.5, 0.5, 0.0],  # 5: same as 1 -> ties break by position
    ]
)


def test_scores_match_their_formulas():
    h = entropy(P)
    assert not torch.isnan(h).any()
    assert h[0] == 0
    assert h[2].item() == pytest.approx(np.log(3))
    assert h[3].item() == pytest.approx(-(0.6 * np.log(0.6) + 0.3 * np.log(0.3) + 0.1 * np.log(0.1)))
    assert gini(P)[3].item() == pytest.approx(1 - (0.36 + 0.09 + 0.01))
    assert least_confidence(P)[4].item() == pytest.approx(0.2)
    assert margin(P)[3].item() == pytest.approx(0.3)
    assert margin(P)[1].item() == 0


@pytest.mark.parametrize(
    "metric, expected",
    [
        ("entropy", [2, 3, 1, 5, 4, 0]),
        ("deepgini", [2, 3, 1, 5, 4, 0]),
        ("lc", [2, 1, 5, 3, 4, 0]),
        ("margin", [1, 2, 5, 3, 4, 0]),  # lowest first; 1, 2 and 5 tie at 0 -> position order
    ],
)
def test_rankings_are_known_and_ties_go_to_lower_position(metric, expected):
    result = select(metric, 6, outputs=P)
    assert result.indices == expected
    assert result.scores is not None and len(result.scores) == 6


# dyadic rows, so every formula is exact in float64: A = (.5, .25, .25, 0), B = (.375, .375, .125, .125),
# C = (.75, .125, .125, 0), each also permuted (mathematically the same scores)
TIED = torch.tensor(
    [
        [0.5, 0.25, 0.25, 0.0],  # 0: A
        [0.75, 0.125, 0.125, 0.0],  # 1: C
        [0.125, 0.375, 0.125, 0.375],  # 2: B permuted
        [0.25, 0.5, 0.0, 0.25],  # 3: A permuted
        [0.375, 0.375, 0.125, 0.125],  # 4: B
        [0.0, 0.25, 0.25, 0.5],  # 5: A permuted
        [0.125, 0.0, 0.75, 0.125],  # 6: C permuted
    ]
)
EXACT = {  # score of A, B, C by the formula, and the order: B before A before C, ties by position
    "lc": (0.5, 0.625, 0.25),
    "deepgini": (1 - 0.375, 1 - 0.3125, 1 - 0.59375),
    "margin": (0.25, 0.0, 0.625),
    "entropy": (1.5 * np.log(2), -(0.75 * np.log(0.375) + 0.25 * np.log(0.125)), -(0.75 * np.log(0.75) + 0.25 * np.log(0.125))),
}


@pytest.mark.parametrize("metric", sorted(EXACT))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tied_rows_get_their_exact_formula_and_tie_by_position(metric, dtype):
    result = select(metric, 7, outputs=TIED.to(dtype))
    assert result.indices == [2, 4, 0, 3, 5, 1, 6]
    a, b, c = EXACT[metric]
    expected = [b, b, a, a, a, c, c]
    if metric == "entropy":  # a log: the formula to the last bits, and tied rows bit-equal to each other
        assert result.scores == pytest.approx(expected, rel=1e-15)
        assert len({result.scores[i] for i in (0, 1)}) == 1 and len({result.scores[i] for i in (2, 3, 4)}) == 1
    else:
        assert result.scores == expected  # exact: 1 - p1, p1 - p2 and 1 - sum p^2 of dyadic values


def test_given_float64_probabilities_are_scored_as_given_also_after_labeled_inputs_are_removed():
    probs = torch.tensor([[1 / 3, 1 / 3, 1 / 3], [0.1, 0.7, 0.2], [0.6, 0.3, 0.1], [1 / 3, 1 / 3, 1 / 3]],
                         dtype=torch.float64)
    result = select("lc", 3, outputs=probs, labeled=[1])
    assert result.indices == [0, 3, 2]  # the two uniform rows tie exactly: lower position first
    assert result.scores == [1.0 - 1 / 3, 1.0 - 1 / 3, 1.0 - 0.6]
    assert select("margin", 1, outputs=probs).scores == [0.0]
    assert select("deepgini", 1, outputs=probs).scores == [1.0 - (1 / 3 * (1 / 3) + 1 / 3 * (1 / 3) + 1 / 3 * (1 / 3))]


def test_all_equal_rows_select_by_position():
    probs = torch.full((7, 4), 0.25)
    for metric in ("entropy", "deepgini", "lc", "margin", "mcp"):
        assert select(metric, 3, outputs=probs).indices == [0, 1, 2], metric


def test_single_class_model():
    probs = torch.ones(5, 1)
    assert select("margin", 2, outputs=probs).indices == [0, 1]
    assert select("entropy", 2, outputs=probs).scores == [0.0, 0.0]
    assert sorted(select("mcp", 5, outputs=probs).indices) == [0, 1, 2, 3, 4]


def test_random_is_seeded_distinct_and_seed_dependent():
    probs = torch.softmax(torch.randn(1000, 10, generator=torch.Generator().manual_seed(1)), 1)
    a = select("random", 100, outputs=probs, seed=3)
    b = select("random", 100, outputs=probs, seed=3)
    c = select("random", 100, outputs=probs, seed=4)
    assert a.indices == b.indices and a.indices != c.indices
    assert len(set(a.indices)) == 100 and a.seed == 3


def test_labeled_positions_are_never_selected():
    probs = torch.softmax(torch.randn(50, 3, generator=torch.Generator().manual_seed(0)), 1)
    full = select("entropy", 5, outputs=probs).indices
    result = select("entropy", 5, outputs=probs, labeled=full[:2])
    assert result.indices[:3] == full[2:5]
    assert not set(result.indices) & set(full[:2])
    assert result.labeled == 2
    with pytest.raises(DltestError, match="outside the pool"):
        select("entropy", 5, outputs=probs, labeled=[60])


# --- MCP ---------------------------------------------------------------------------------------


def test_mcp_clusters_and_priority():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6], [0.4, 0.4, 0.2]])
    cluster, priority = mcp_priority(probs)
    assert cluster.tolist() == [0 * 3 + 1, 2 * 3 + 1, 0 * 3 + 1]  # tie 0.4/0.4 -> class 0 first
    assert priority.tolist() == pytest.approx([0.2 / 0.7, 0.3 / 0.6, 1.0])


def test_mcp_rounds_take_the_best_of_every_cluster_then_the_best_remainder():
    # cluster (0,1): priorities 0.9, 0.5, 0.1 at positions 0, 1, 2
    # cluster (1,0): priorities 0.8, 0.2 at positions 3, 4
    # cluster (2,0): priority 0.3 at position 5
    def row(top1, top2, ratio):
        p = torch.zeros(3)
        p1 = 1 / (1 + ratio)
        p[top1], p[top2] = p1, ratio * p1
        return p

    probs = torch.stack([row(0, 1, 0.9), row(0, 1, 0.5), row(0, 1, 0.1), row(1, 0, 0.8), row(1, 0, 0.2), row(2, 0, 0.3)])
    # round 1 (3 clusters, budget 5 >= 3): 0, 3, 5 (by priority); round 2: 2 clusters left, 2 to go: 1, 4
    assert select("mcp", 5, outputs=probs).indices == [0, 3, 5, 1, 4]
    # budget 4: round 1 takes 0, 3, 5; remainder 1 < 2 clusters -> the best of (1: 0.5, 4: 0.2)
    assert select("mcp", 4, outputs=probs).indices == [0, 3, 5, 1]
    # budget 2 < 3 clusters: the two highest cluster-best priorities
    assert select("mcp", 2, outputs=probs).indices == [0, 3]


def test_mcp_never_picks_a_placeholder_when_priorities_underflow():
    probs = torch.zeros(20, 10)
    probs[:, 3] = 1.0  # p2 = 0 everywhere -> every priority 0, one cluster
    probs[7] = torch.tensor([0.0] * 5 + [0.5, 0.5] + [0.0] * 3)
    result = select("mcp", 4, outputs=probs)
    assert len(set(result.indices)) == 4
    assert result.indices[0] == 0 or 7 in result.indices
    assert 7 in result.indices  # its own cluster: selected in round 1


def test_mcp_order_is_a_permutation():
    probs = torch.softmax(torch.randn(300, 10, generator=torch.Generator().manual_seed(2)) * 3, 1)
    order = mcp_order(*mcp_priority(probs))
    assert sorted(order.tolist()) == list(range(300))


# --- DRE ---------------------------------------------------------------------------------------


def test_histogram_last_bin_is_closed():
    values = torch.tensor([0.0, 0.5, 1.0, 1.0])
    bins = histogram_bins(values, 2)
    assert bins.tolist() == [0, 1, 1, 1]  # the maximum belongs to the last bin
    ref, _ = np.histogram(values.numpy(), bins=2)
    assert torch.bincount(bins, minlength=2).tolist() == ref.tolist()


def test_largest_remainder_quotas_sum_to_budget_and_fit_their_bins():
    counts = torch.tensor([5, 3, 2, 0, 1])
    quotas = largest_remainder_quotas(counts, 4)  # exact 1.818, 1.09, 0.727, 0, 0.364
    assert quotas.tolist() == [2, 1, 1, 0, 0]
    for budget in range(1, 12):
        q = largest_remainder_quotas(counts, budget)
        assert int(q.sum()) == budget and bool((q <= counts).all())


def test_largest_remainder_ties_are_exact_and_go_to_the_lower_bin():
    # bins 0 and 3 have the same remainder, 2938 * 5005 = 46 * 5005 = 2244 (mod 5302); in floats
    # 2938 * 5005 / 5302 - 2773 is a hair below 46 * 5005 / 5302 - 43, and bin 3 got the seat
    counts = torch.tensor([2938, 1602, 716, 46])
    assert (2938 * 5005) % 5302 == (46 * 5005) % 5302 == 2244
    assert largest_remainder_quotas(counts, 5005).tolist() == [2774, 1512, 676, 43]


def test_uncertainty_scores_rank_in_float64(mnist_test):
    # issue 10: in float32 only 2,444 distinct DeepGini scores on the 10k MNIST test inputs
    from dltest import infer, load_model
    from dltest.selectors.base import float64_probs

    model, _ = load_model(dataset="mnist")
    outputs = infer(model, mnist_test, device="cpu")
    for fn in (gini, margin):
        distinct32 = len(torch.unique(fn(outputs.probs)))
        distinct64 = len(torch.unique(fn(float64_probs(outputs))))
        assert distinct64 > 2 * distinct32, (fn.__name__, distinct32, distinct64)
    result = select("deepgini", "30%", outputs=outputs)
    assert result.scores == sorted(result.scores, reverse=True)
    reference = gini(torch.softmax(outputs.logits.double(), dim=1)).numpy()
    order = sorted(range(len(reference)), key=lambda i: (-reference[i], i))[: result.budget]
    assert result.indices == order


def test_dre_degenerate_pool_is_a_uniform_draw():
    probs = torch.full((40, 4), 0.25)
    result = select("dre", 10, outputs=probs, seed=1)
    assert len(set(result.indices)) == 10
    assert select("dre", 10, outputs=probs, seed=1).indices == result.indices
    assert select("dre", 10, outputs=probs, seed=2).indices != result.indices


def _jsd(selected: torch.Tensor, pool: torch.Tensor, bins: int = 50) -> float:
    edges = np.linspace(float(pool.min()), float(pool.max()), bins + 1)
    p, _ = np.histogram(selected.numpy(), bins=edges)
    q, _ = np.histogram(pool.numpy(), bins=edges)
    return float(jensenshannon(p / p.sum(), q / q.sum(), base=2) ** 2)


def test_dre_matches_the_pool_entropy_density_unlike_uncertainty_selectors():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5000, 10, generator=g) * torch.rand(5000, 1, generator=g) * 6
    probs = torch.softmax(logits, 1)
    h = entropy(probs)
    budget = 200
    dre = select("dre", budget, outputs=probs, seed=0)
    jsd_dre = _jsd(h[dre.indices], h)
    for metric in ("entropy", "deepgini", "lc"):
        biased = select(metric, budget, outputs=probs)
        assert jsd_dre < 0.2 * _jsd(h[biased.indices], h), metric
    assert jsd_dre < 0.05
    # the quotas follow the histogram: bin counts of the selection = largest-remainder quotas
    which = histogram_bins(h, 50)
    expected = largest_remainder_quotas(torch.bincount(which, minlength=50), budget)
    assert torch.bincount(which[dre.indices], minlength=50).tolist() == expected.tolist()


def test_dre_selects_the_maximum_entropy_bin():
    # the maximum alone in the top bin, quota 3 * 1/4 = 0.75 -> it is drawn (closed last bin)
    probs = torch.tensor([[1.0, 0.0]] * 3 + [[0.5, 0.5]])
    for seed in range(5):
        assert 3 in select("dre", 3, outputs=probs, seed=seed).indices


def test_dre_is_reproducible_and_seed_dependent():
    probs = torch.softmax(torch.randn(2000, 10, generator=torch.Generator().manual_seed(5)) * 4, 1)
    a, b = (select("dre", 100, outputs=probs, seed=7) for _ in range(2))
    assert a.indices == b.indices
    assert a.indices != select("dre", 100, outputs=probs, seed=8).indices
    assert a.options == {"bins": 50}
