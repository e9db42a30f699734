"""Selection bias (JSD base 2 of 50-bin histograms) on hand-made inputs with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.spatial.distance import jensenshannon

from dltest import select
from dltest.analysis.bias import characteristics, histogram_pair, jsd, selection_bias
from dltest.errors import DltestError


def test_identical_histograms_give_zero():
    assert jsd([3, 1, 0, 6], [3, 1, 0, 6]) == 0.0
    assert jsd([3, 1, 0, 6], [0.3, 0.1, 0.0, 0.6]) == pytest.approx(0.0, abs=1e-15)  # counts or probabilities


def test_disjoint_histograms_give_one():
    assert jsd([5, 0, 0], [0, 2, 7]) == pytest.approx(1.0)


def test_small_case_by_hand():
    # p = (1, 0), q = (1/2, 1/2), m = (3/4, 1/4):
    # JSD = 1/2 [log2(4/3)] + 1/2 [1/2 log2(2/3) + 1/2 log2(2)] = 3/4 log2(4/3)
    assert jsd([1, 0], [1, 1]) == pytest.approx(0.75 * math.log2(4 / 3), rel=1e-12)


def test_is_scipys_distance_squared_not_the_distance():
    rng = np.random.default_rng(0)
    for _ in range(5):
        p, q = rng.integers(0, 20, size=50), rng.integers(0, 20, size=50)
        distance = jensenshannon(p, q, base=2)
        assert jsd(p, q) == pytest.approx(distance**2, rel=1e-9)
        assert jsd(p, q) < distance  # the divergence, in (0, 1), lies below its square root


def test_bad_histograms_are_one_line_errors():
    with pytest.raises(DltestError, match="differ in length"):
        jsd([1, 2], [1, 2, 3])
    with pytest.raises(DltestError, match="empty histogram"):
        jsd([0, 0], [1, 1])
    with pytest.raises(DltestError, match="non-negative"):
        jsd([-1, 2], [1, 1])


def test_characteristics_match_their_formulas():
    probs = torch.tensor([[0.6, 0.3, 0.1], [1.0, 0.0, 0.0]])
    c = characteristics(probs)
    assert set(c) == {"entropy", "gini", "lc", "margin"}
    assert c["entropy"][0].item() == pytest.approx(-(0.6 * math.log(0.6) + 0.3 * math.log(0.3) + 0.1 * math.log(0.1)))
    assert c["entropy"][1].item() == 0.0  # xlogy: 0 log 0 = 0, not NaN
    assert c["gini"][0].item() == pytest.approx(1 - 0.46)
    assert c["lc"][0].item() == pytest.approx(0.4)
    assert c["margin"][0].item() == pytest.approx(0.3)
    assert c["margin"][1].item() == pytest.approx(1.0)


# Two certain rows (entropy 0, first bin) and two uniform rows (entropy ln 2, the pool's maximum:
# the closed last bin); labels 0, 1, 0, 1.
POOL = torch.tensor([[1.0, 0.0], [0.5, 0.5], [1.0, 0.0], [0.5, 0.5]])
LABELS = torch.tensor([0, 1, 0, 1])


def test_selection_bias_of_a_known_pool():
    # selecting both uniform rows: histogram (0, ..., 2) against the pool's (2, ..., 2)
    bias = selection_bias(POOL, LABELS, torch.tensor([1, 3]))
    expected = 0.75 * math.log2(4 / 3)
    assert bias == pytest.approx({"entropy": expected, "gini": expected, "lc": expected, "margin": expected, "label": expected})
    # one of each: the selection has the pool's distribution for every characteristic
    assert selection_bias(POOL, LABELS, torch.tensor([0, 1])) == pytest.approx(
        {"entropy": 0.0, "gini": 0.0, "lc": 0.0, "margin": 0.0, "label": 0.0}, abs=1e-12)
    assert "label" not in selection_bias(POOL, None, torch.tensor([0, 1]))


def test_histograms_share_the_pools_edges_and_close_the_last_bin():
    values = torch.tensor([0.0, 0.5, 1.0, 1.0])
    sel, pool = histogram_pair(values, torch.tensor([2, 3]), bins=4)
    assert pool.tolist() == [1, 0, 1, 2]  # the maximum 1.0 belongs to the last bin
    assert sel.tolist() == [0, 0, 0, 2]


def test_constant_pool_has_no_bias():
    probs = torch.full((10, 4), 0.25)
    assert selection_bias(probs, None, torch.tensor([3])) == {"entropy": 0.0, "gini": 0.0, "lc": 0.0, "margin": 0.0}


def test_dre_is_far_less_biased_than_entropy_on_a_random_pool():
    g = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(5000, 10, generator=g)
    probs = torch.softmax(logits, dim=1)
    dre = selection_bias(probs, None, torch.tensor(select("dre", 250, outputs=probs, seed=0).indices))
    top = selection_bias(probs, None, torch.tensor(select("entropy", 250, outputs=probs).indices))
    assert dre["entropy"] < 0.01
    assert top["entropy"] > 0.5
    assert all(dre[k] < top[k] for k in ("entropy", "gini", "lc", "margin"))


def test_bad_selections_are_one_line_errors():
    with pytest.raises(DltestError, match="outside the pool of 4"):
        selection_bias(POOL, None, torch.tensor([0, 4]))
    with pytest.raises(DltestError, match="empty"):
        selection_bias(POOL, None, torch.tensor([], dtype=torch.long))
    with pytest.raises(DltestError, match="labels cover 3"):
        selection_bias(POOL, LABELS[:3], torch.tensor([0]))
    with pytest.raises(DltestError, match=r"\(n, C\) matrix"):
        selection_bias(torch.ones(4), None, torch.tensor([0]))


class _FixedProbs(torch.nn.Module):
    """A 'model' whose probabilities for input i are row i of a table (the input holds i), counting
    its forward passes."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table, self.calls = table, 0

    def forward(self, x):
        self.calls += 1
        return torch.log(self.table[x.flatten(1)[:, 0].round().long()])


def _fixed_pool(n: int = 40):
    from dltest.data import ImageDataset

    gen = torch.Generator().manual_seed(3)
    table = torch.softmax(3 * torch.randn(n, 4, generator=gen), dim=1)
    x = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1)
    return _FixedProbs(table), ImageDataset("fixed", "pool", x, torch.arange(n) % 4, ["a", "b", "c", "d"], torch.arange(n)), table


def test_selection_bias_report_leaves_the_labeled_inputs_out_of_the_pool():
    from dltest.analysis.bias import selection_bias_report
    from dltest.selection import SelectionResult

    model, data, table = _fixed_pool()
    chosen, done = [3, 7, 20, 31], [0, 1, 2, 5, 8]
    selection = SelectionResult(metric="entropy", budget=4, budget_spec="4", indices=chosen, pool_size=0, seed=5)
    report = selection_bias_report(model, data, selection, labeled=SelectionResult(
        metric="random", budget=5, budget_spec="5", indices=done, pool_size=0, seed=0), bins=5)
    pool = torch.tensor([i for i in range(40) if i not in done])
    expected = selection_bias(table[pool], data.y[pool], torch.tensor([int((pool == c).nonzero()) for c in chosen]), bins=5)
    assert report["bias"] == pytest.approx(expected)
    assert (report["pool_size"], report["selected"], report["seed"], report["command"]) == (35, 4, 5, "dltest analyze bias")
    whole = selection_bias_report(model, data, selection, bins=5)
    assert whole["pool_size"] == 40 and whole["bias"] == pytest.approx(selection_bias(table, data.y, torch.tensor(chosen), bins=5))


@pytest.mark.parametrize("indices, labeled, pool_size, message", [
    ([3, 40], None, 0, "holds indices outside the pool of 40"),
    ([3, 4], [4], 0, "selects inputs that labeled lists"),
    ([3], [41], 0, "labeled holds indices outside the pool of 40"),
    ([3], None, 50, "selects from a pool of 50 inputs"),
])
def test_a_selection_that_does_not_fit_the_pool_is_refused_before_any_forward_pass(indices, labeled, pool_size, message):
    from dltest.analysis.bias import selection_bias_report
    from dltest.selection import SelectionResult

    model, data, _ = _fixed_pool()
    selection = SelectionResult(metric="dre", budget=len(indices), budget_spec="x", indices=indices, pool_size=pool_size,
                                seed=0)
    done = SelectionResult(metric="random", budget=1, budget_spec="1", indices=labeled, pool_size=0, seed=0) if labeled else None
    with pytest.raises(DltestError, match=message):
        selection_bias_report(model, data, selection, labeled=done)
    assert model.calls == 0
