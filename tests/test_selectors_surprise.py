"""Surprise adequacy (dsa, lsa, mdsa) against brute-force and scipy references."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats
import torch

from dltest.errors import DltestError
from dltest.selection import select
from dltest.selectors.surprise import dsa_scores, layer_activations, lsa_scores, mdsa_scores


def clustered(n: int, d: int, classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(classes, (n,), generator=gen)
    centers = 3.0 * torch.randn(classes, d, generator=gen)
    return centers[labels] + torch.randn(n, d, generator=gen), labels


def test_dsa_equals_a_brute_force_distance_loop():
    ref, ref_pred = clustered(120, 6, 3, seed=0)
    x, pred = clustered(40, 6, 3, seed=1)
    ours = dsa_scores(x, pred, ref, ref_pred).numpy()
    r, rp, xs = ref.double().numpy(), ref_pred.numpy(), x.double().numpy()
    expected = []
    for i in range(len(xs)):
        same = [j for j in range(len(r)) if rp[j] == pred[i]]
        dists = [np.sqrt(((xs[i] - r[j]) ** 2).sum()) for j in same]
        a = same[int(np.argmin(dists))]
        dist_b = min(np.sqrt(((r[a] - r[j]) ** 2).sum()) for j in range(len(r)) if rp[j] != pred[i])
        expected.append(min(dists) / dist_b)
    np.testing.assert_allclose(ours, expected, rtol=1e-5)


def test_lsa_equals_scipy_gaussian_kde_and_stays_finite_where_it_underflows():
    ref, ref_pred = clustered(200, 4, 2, seed=2)
    x, pred = clustered(30, 4, 2, seed=3)
    x[0] += 60.0  # far from everything: scipy's density underflows to 0
    ours = lsa_scores(x, pred, ref, ref_pred).numpy()
    for c in (0, 1):
        kde = scipy.stats.gaussian_kde(ref[ref_pred == c].double().numpy().T)
        rows = (pred == c).numpy()
        with np.errstate(divide="ignore"):
            expected = -np.log(kde(x[rows].double().numpy().T))
        finite = np.isfinite(expected)
        np.testing.assert_allclose(ours[rows][finite], expected[finite], rtol=1e-7)
    assert np.isfinite(ours).all()
    with np.errstate(divide="ignore"):
        assert not np.isfinite(-np.log(scipy.stats.gaussian_kde(ref[ref_pred == pred[0]].double().numpy().T)(
            x[:1].double().numpy().T)))[0]
    assert ours[0] == ours.max()


def sadl_lsa(ref: np.ndarray, ref_pred: np.ndarray, x: np.ndarray, pred: np.ndarray, var_threshold: float) -> np.ndarray:
    """LSA by the rule of Kim et al.'s code (sadl ``_get_kdes``), written here from its description:
    a neuron whose np.var over the reference inputs of any class is below the threshold is removed
    for every class; one scipy gaussian_kde per class on the remaining neurons; LSA = -logpdf."""
    removed = sorted({i for c in np.unique(ref_pred) for i in range(ref.shape[1])
                      if np.var(ref[ref_pred == c][:, i]) < var_threshold})
    keep = [i for i in range(ref.shape[1]) if i not in removed]
    kdes = {c: scipy.stats.gaussian_kde(ref[ref_pred == c][:, keep].T) for c in np.unique(ref_pred)}
    return np.array([-kdes[c].logpdf(x[k, keep][:, None])[0] for k, c in enumerate(pred)])


def test_lsa_drops_the_union_of_flat_neurons_over_classes_as_the_reference_code():
    gen = np.random.default_rng(8)
    # 4 neurons, 2 classes: neuron 3 is flat in class 0, neuron 2 in class 1 (variance ~1e-8 < 1e-5)
    ref = gen.normal(size=(160, 4)) + np.repeat([[2.0, 0, 0, 0], [-2.0, 1, 0, 0]], 80, axis=0)
    ref_pred = np.repeat([0, 1], 80)
    ref[:80, 3] = 0.5 + 1e-4 * gen.normal(size=80)
    ref[80:, 2] = -0.5 + 1e-4 * gen.normal(size=80)
    x = gen.normal(size=(40, 4)) * 1.5
    pred = np.arange(40) % 2
    expected = sadl_lsa(ref, ref_pred, x, pred, 1e-5)  # both densities in neurons 0 and 1
    as_t = (torch.from_numpy(a) for a in (x, pred, ref, ref_pred))
    ours = lsa_scores(*as_t, var_threshold=1e-5).numpy()
    np.testing.assert_allclose(ours, expected, rtol=1e-9)
    assert scipy.stats.spearmanr(ours, expected).statistic == pytest.approx(1.0)
    # the per-class rule keeps neuron 2 for class 0 and neuron 3 for class 1: other densities, other scores
    per_class = lsa_scores(*(torch.from_numpy(a) for a in (x, pred, ref, ref_pred)), var_threshold=1e-5,
                           var_scope="per-class").numpy()
    assert np.abs(per_class - expected).max() > 1.0
    with pytest.raises(DltestError, match="var_scope must be one of union, per-class"):
        lsa_scores(torch.from_numpy(x), torch.from_numpy(pred), torch.from_numpy(ref), torch.from_numpy(ref_pred),
                   var_scope="all")


def test_lsa_degenerate_kde_says_so_and_uses_the_spanned_subspace():
    ref, ref_pred = clustered(150, 3, 1, seed=4)
    x, pred = clustered(20, 3, 1, seed=5)
    pred = torch.zeros_like(pred)
    # a fourth neuron that is a copy of the first: singular covariance (scipy raises LinAlgError)
    ref4, x4 = torch.cat([ref, ref[:, :1]], 1), torch.cat([x, x[:, :1]], 1)
    messages = []
    ours = lsa_scores(x4, pred, ref4, torch.zeros(150, dtype=torch.long), on_degenerate=messages.append).numpy()
    assert len(messages) == 1 and "degenerate" in messages[0] and "rank 3" in messages[0]
    assert np.isfinite(ours).all()
    # the same density up to the constant Jacobian of the embedding: the same ranking as 3 neurons
    plain = lsa_scores(x, pred, ref, torch.zeros(150, dtype=torch.long)).numpy()
    np.testing.assert_allclose(ours - plain, np.full_like(ours, (ours - plain)[0]), atol=1e-6)
    with pytest.raises(DltestError, match="at least 2"):
        lsa_scores(x, pred, ref[:1], torch.zeros(1, dtype=torch.long))
    with pytest.raises(DltestError, match="var_threshold"):
        lsa_scores(x, pred, torch.ones(5, 3), torch.zeros(5, dtype=torch.long))


def test_mdsa_equals_the_mahalanobis_formula_with_a_pseudo_inverse():
    ref, ref_pred = clustered(100, 5, 2, seed=6)
    ref = torch.cat([ref, ref[:, :1] - ref[:, 1:2]], 1)  # singular covariance
    x, pred = clustered(25, 5, 2, seed=7)
    x = torch.cat([x, x[:, :1] - x[:, 1:2]], 1)
    ours = mdsa_scores(x, pred, ref, ref_pred).numpy()
    for c in (0, 1):
        data = ref[ref_pred == c].double().numpy()
        mean = data.mean(0)
        inv = np.linalg.pinv(np.cov(data.T, bias=True), rcond=1e-10, hermitian=True)
        rows = (pred == c).numpy()
        diff = x[rows].double().numpy() - mean
        np.testing.assert_allclose(ours[rows], np.sqrt(np.einsum("ij,jk,ik->i", diff, inv, diff)), rtol=1e-6)


@pytest.mark.slow
def test_surprise_selectors_through_select(trained_lenet, mnist_test, mnist_train_slice):
    pool = mnist_test.subset(torch.arange(300))
    reference = mnist_train_slice.subset(torch.arange(2000))
    for metric in ("dsa", "lsa", "mdsa"):
        a = select(metric, 30, model=trained_lenet, data=pool, reference=reference, seed=0, reference_size=800)
        b = select(metric, 30, model=trained_lenet, data=pool, reference=reference, seed=1, reference_size=800)
        assert a.indices == b.indices and len(set(a.indices)) == 30  # the score does not depend on the seed
        assert a.options["reference_inputs"] == 800 and a.options["reference_seed"] == 0
        assert a.options["reference"] == "mnist/train" and a.options["layer"] == "penultimate"
        assert a.scores == sorted(a.scores, reverse=True)
        c = select(metric, 30, model=trained_lenet, data=pool, reference=reference, reference_size=800, reference_seed=5)
        assert c.indices != a.indices
    # the cached penultimate embeddings equal the hooked activations of the head's input
    ats, preds = layer_activations(trained_lenet, pool)
    from dltest.inference import infer

    out = infer(trained_lenet, pool, device="cpu")
    torch.testing.assert_close(ats, out.embeddings)
    top2 = out.logits.topk(2, dim=1).values
    clear = top2[:, 0] - top2[:, 1] > 1e-4  # two forward passes: compare the argmax where it is not a near-tie
    assert clear.float().mean() > 0.95 and torch.equal(preds[clear], out.predictions[clear])
    conv = select("dsa", 10, model=trained_lenet, data=pool, reference=reference, reference_size=500, layer="features.3")
    assert conv.options["layer"] == "features.3" and len(conv.indices) == 10
    with pytest.raises(DltestError, match="not a module of the model"):
        select("dsa", 10, model=trained_lenet, data=pool, reference=reference, layer="nope")
    with pytest.raises(DltestError, match="training data"):
        select("mdsa", 10, model=trained_lenet, data=pool)
