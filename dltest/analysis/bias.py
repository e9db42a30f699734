"""Selection bias (the paper's Section 6): how far a selection's distribution of a characteristic
lies from the pool's, as the Jensen-Shannon divergence of their 50-bin histograms.

A selection that samples the pool faithfully (random, DRE) has a bias near 0; one that takes
only the most uncertain inputs (entropy, DeepGini, least confidence) has a bias near 1 for the
uncertainty characteristics. The paper relates this bias to the robustness that adversarial
training reaches on the selection.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from scipy.special import rel_entr
from torch import Tensor

from dltest.errors import DltestError
from dltest.selectors.dre import histogram_bins
from dltest.selectors.uncertainty import entropy, gini, least_confidence, margin

if TYPE_CHECKING:
    from dltest.data import ImageDataset
    from dltest.selection import SelectionResult

BINS = 50
CHARACTERISTICS = ("entropy", "gini", "lc", "margin")


def jsd(p, q) -> float:
    """Jensen-Shannon divergence, base 2, of two histograms (counts or probabilities): in [0, 1].

    0 for identical distributions, 1 for distributions with disjoint supports.
    ``scipy.spatial.distance.jensenshannon`` returns the JS *distance*, the square root of this
    value; the paper (and dltest) report the divergence itself.
    """
    p = np.asarray(p, dtype=np.float64).ravel()
    q = np.asarray(q, dtype=np.float64).ravel()
    if p.shape != q.shape:
        raise DltestError(f"histograms differ in length: {p.size} and {q.size} bins")
    if (p < 0).any() or (q < 0).any() or not (np.isfinite(p).all() and np.isfinite(q).all()):
        raise DltestError("histograms must hold finite, non-negative counts")
    if p.sum() == 0 or q.sum() == 0:
        raise DltestError("an empty histogram has no distribution")
    p, q = p / p.sum(), q / q.sum()
    m = (p + q) / 2
    divergence = (rel_entr(p, m).sum() + rel_entr(q, m).sum()) / (2 * np.log(2))
    return float(min(max(divergence, 0.0), 1.0))  # rounding can step a hair outside [0, 1]


def characteristics(probs: Tensor) -> dict[str, Tensor]:
    """The output characteristics of each row of ``probs`` (n, C) whose bias the paper measures:
    entropy (nats, ``xlogy`` so 0 log 0 = 0), gini (1 - sum p^2), lc (1 - p1), margin (p1 - p2)."""
    probs = _check_probs(probs)
    return {"entropy": entropy(probs), "gini": gini(probs), "lc": least_confidence(probs), "margin": margin(probs)}


def histogram_pair(values: Tensor, selected: Tensor, bins: int = BINS) -> tuple[Tensor, Tensor]:
    """Counts of ``values[selected]`` and of all ``values`` in the same ``bins`` equal-width bins
    over the pool's [min, max], the last bin closed (DRE's binning). A constant pool has one bin."""
    which = histogram_bins(values, bins)
    return torch.bincount(which[selected], minlength=bins), torch.bincount(which, minlength=bins)


def selection_bias(
    probs: Tensor, labels: Tensor | None, selected: Tensor, bins: int = BINS
) -> dict[str, float]:
    """Bias of the selection ``selected`` (positions into the pool) for each characteristic: the JSD
    (base 2) between the ``bins``-bin histogram of the selected rows and that of the whole pool
    ``probs`` (n, C); with ``labels`` (n,) also ``label``, the JSD of the class histograms."""
    probs = _check_probs(probs)
    n = probs.shape[0]
    if bins < 1:
        raise DltestError(f"bins must be at least 1, got {bins}")
    selected = torch.as_tensor(selected, dtype=torch.long).flatten()
    if selected.numel() == 0:
        raise DltestError("the selection is empty: its bias is undefined")
    if selected.min() < 0 or selected.max() >= n:
        bad = selected[(selected < 0) | (selected >= n)][:5].tolist()
        raise DltestError(f"selected positions outside the pool of {n}: {bad}")
    bias = {}
    for name, values in characteristics(probs).items():
        bias[name] = jsd(*histogram_pair(values, selected, bins))
    if labels is not None:
        labels = torch.as_tensor(labels, dtype=torch.long).flatten()
        if labels.shape[0] != n:
            raise DltestError(f"labels cover {labels.shape[0]} inputs but the pool has {n}")
        if labels.min() < 0:
            raise DltestError("labels must be non-negative class indices")
        classes = max(probs.shape[1], int(labels.max()) + 1)
        bias["label"] = jsd(torch.bincount(labels[selected], minlength=classes), torch.bincount(labels, minlength=classes))
    return bias


def _check_probs(probs: Tensor) -> Tensor:
    probs = torch.as_tensor(probs)
    if probs.ndim != 2 or probs.shape[0] == 0 or probs.shape[1] == 0:
        raise DltestError(f"probabilities must be a non-empty (n, C) matrix, got shape {tuple(probs.shape)}")
    return probs.float()


def selection_bias_report(
    model: torch.nn.Module,
    data: "ImageDataset",
    selection: "SelectionResult",
    *,
    labeled: "SelectionResult | None" = None,
    bins: int = BINS,
    batch_size: int = 256,
    device: str | torch.device | None = None,
    progress: bool = False,
    source: str | None = None,
    model_name: str | None = None,
) -> dict[str, Any]:
    """``dltest analyze bias`` of a selection file: the bias of ``selection`` against the pool it was
    chosen from, ``data`` less the inputs ``labeled`` lists (labeled before, so not in that pool).

    Checks that the selection fits the data before the one inference pass; the report starts with
    ``output_header`` and names the ``source`` file and ``model_name``.
    """
    from dltest.header import output_header
    from dltest.inference import infer

    n = len(data)
    where = source or "the selection"
    if selection.pool_size and selection.pool_size != n:
        raise DltestError(f"{where} selects from a pool of {selection.pool_size} inputs, but {data.name}/{data.split} "
                          f"holds {n}: pass the pool it was made from as data", param="data")
    chosen = _positions(selection, n, where)
    pool = torch.arange(n)
    if labeled is not None:
        done = _positions(labeled, n, "labeled", param="labeled")
        keep = torch.ones(n, dtype=torch.bool)
        keep[done] = False
        if not keep[chosen].all():
            raise DltestError(f"{where} selects inputs that labeled lists: not the pool it was made from", param="labeled")
        pool = torch.nonzero(keep).flatten()
    outputs = infer(model, data, batch_size=batch_size, device=device, embeddings=False, progress=progress)
    bias = selection_bias(outputs.probs[pool], data.y[pool], torch.searchsorted(pool, chosen), bins=bins)
    note = None
    if selection.labeled and labeled is None:
        note = (f"the selection left {selection.labeled} labeled inputs out of its pool; they count in the pool "
                "here (pass labeled to leave them out)")
    return {**output_header("analyze bias", selection.seed), "source": source, "kind": "selection",
            "metric": selection.metric, "dataset": data.name, "split": data.split, "model": model_name,
            "pool_size": len(pool), "selected": len(chosen), "bins": bins, "bias": bias, "note": note}


def _positions(selection: "SelectionResult", n: int, where: str, param: str | None = None) -> Tensor:
    chosen = torch.tensor(selection.indices, dtype=torch.long)
    if len(chosen) and (chosen.min() < 0 or chosen.max() >= n):
        raise DltestError(f"{where} holds indices outside the pool of {n}", param=param)
    return chosen
