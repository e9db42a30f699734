"""Surprise adequacy: DSA, LSA (Kim et al., ICSE 2019) and MDSA (Weiss et al., 2021).

How surprising an input is, relative to what the model saw in training, measured on the
activation traces (ATs) of one layer (the penultimate by default; ``layer`` names any module of
the model). The reference is a seeded random subsample of ``reference_size`` inputs of a
reference set (the training data: ``select(..., reference=train)``, ``dltest select
--reference-split train``); its inputs are grouped by the model's predicted class, as in both
papers' code. Each pool input is compared with the reference inputs of its own predicted class:

- ``dsa``: dist_a / dist_b, with x_a the nearest reference AT of the same class, dist_a the
  distance to it and dist_b the distance from x_a to the nearest reference AT of another class;
- ``lsa``: -log of a Gaussian kernel density estimate of the class's reference ATs (scipy's
  ``gaussian_kde``: Scott's bandwidth, covariance of the data times n^(-2/(d+4))), evaluated in log
  space (log-sum-exp), so a density that underflows float64 still gives a finite LSA. Neurons
  whose variance (population, as numpy's ``var``) is below ``var_threshold`` over the reference
  inputs of **any** class are left out of every class's density, as Kim et al.'s code does
  (sadl's ``_get_kdes``: the union over classes), so that all class densities live in the same
  dimensions (``var_scope="union"``, the default; classes with a single reference input have no
  variance to judge by and are left out of that rule). ``var_scope="per-class"`` drops, for each
  class, only the neurons that are flat in that class (dltest's earlier rule: scores of different
  classes then come from densities of different dimension). A
  bandwidth covariance that is still singular is **degenerate**: existing implementations then
  return density 0 (LSA +inf) or LSA 0 for every input. Here a one-line notice says so and the
  KDE falls back to the subspace the reference spans (directions with eigenvalues above 1e-9 of
  the largest); a class with fewer than 2 reference inputs, or no direction left, is an error
  that says what to change;
- ``mdsa``: the Mahalanobis distance to the mean of the class's reference ATs, with their
  covariance (maximum likelihood; its pseudo-inverse when singular, as scikit-learn's
  ``EmpiricalCovariance`` does).

Higher is more surprising and is selected first. Distances are computed block by block on the
pool's device (the GPU when there is one): O(block x reference) memory, never pool x reference.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import Tensor, nn

from dltest.adapter import ModelAdapter, embedding_head, unwrap
from dltest.data import ImageDataset
from dltest.errors import DltestError
from dltest.inference import INFERENCE_BATCH
from dltest.progress import console
from dltest.runtime import eval_mode, on_device
from dltest.selectors.base import Candidates, ScoreSelector, register

BLOCK = 2048  # pool rows per distance block (BLOCK x reference distances at a time)
PENULTIMATE = "penultimate"


def notice(message: str) -> None:
    console.print(f"notice: {message}", soft_wrap=True, markup=False, highlight=False)


def _layer_hook(model: nn.Module, layer: str) -> tuple[nn.Module, bool]:
    """(module, take_input): where the activations of ``layer`` come from."""
    if layer == PENULTIMATE:
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        split = embedding_head(model)
        if split is not None:
            return split[1], True  # the head's input: the penultimate features
        if not linears:
            raise DltestError("the model has no final linear layer to take penultimate activations from; "
                              "name a layer with the 'layer' option")
        return linears[-1], True
    modules = dict(unwrap(model).named_modules())  # the user's names, not the adapter's
    if layer not in modules or layer == "":
        named = ", ".join(name for name in modules if name) or "none"
        raise DltestError(f"layer {layer!r} is not a module of the model (its modules: {named})")
    return modules[layer], False


@torch.inference_mode()
def layer_activations(model: nn.Module, data: ImageDataset, layer: str = PENULTIMATE,
                      device: torch.device | str = "cpu", batch_size: int = INFERENCE_BATCH) -> tuple[Tensor, Tensor]:
    """(activations (n, D) float32 on the CPU, predicted classes (n,)) of ``data`` at ``layer``:
    the module's output, or for ``penultimate`` the input of the final linear layer (for an
    outside model, its embeddings as :class:`~dltest.adapter.ModelAdapter` finds them)."""
    if layer == PENULTIMATE and isinstance(model, ModelAdapter) and model.embedding_kind is not None:
        with on_device(model, device), eval_mode(model):
            pairs = [model.scores_and_embeddings(data.images(slice(s, s + batch_size), device))
                     for s in range(0, len(data), batch_size)]
        return torch.cat([z.float().cpu() for _, z in pairs]), torch.cat([out.argmax(1).cpu() for out, _ in pairs])
    module, take_input = _layer_hook(model, layer)
    if isinstance(module, torch.jit.ScriptModule):
        raise DltestError(f"layer {layer!r} is inside a TorchScript model, where no hook can read it; use the "
                          "penultimate layer of a model with embeddings, or load the state_dict with its architecture")
    captured: list[Tensor] = []

    def hook(_m: nn.Module, args: tuple, output: Any = None) -> None:
        value = args[0] if take_input else output
        if isinstance(value, (tuple, list)):
            value = value[0]
        captured.append(value.detach().flatten(1).float().cpu())

    handle = module.register_forward_pre_hook(hook) if take_input else module.register_forward_hook(hook)
    feats, preds = [], []
    try:
        with on_device(model, device), eval_mode(model):
            for s in range(0, len(data), batch_size):
                captured.clear()
                out = model(data.images(slice(s, s + batch_size), device))
                if isinstance(out, (tuple, list)):
                    out = out[0]
                if not captured:
                    raise DltestError(f"layer {layer!r} was not run by the model's forward pass")
                feats.append(captured[-1])
                preds.append(out.argmax(dim=1).cpu())
    finally:
        handle.remove()
    return torch.cat(feats), torch.cat(preds)


def _sq_distances(a: Tensor, b: Tensor) -> Tensor:
    """Squared Euclidean distances (len(a), len(b)), float64 accumulation of centred float32 rows."""
    a64, b64 = a.double(), b.double()
    d2 = a64.pow(2).sum(1, keepdim=True) + b64.pow(2).sum(1).unsqueeze(0) - 2.0 * (a64 @ b64.T)
    return d2.clamp_min_(0)


def _nearest(x: Tensor, ref: Tensor, block: int = BLOCK) -> tuple[Tensor, Tensor]:
    """(distance, index) of the nearest row of ``ref`` to each row of ``x``, block by block.

    The search runs in float32 (one matrix product per block); the distance to the row found is
    then computed exactly in float64, so an input that is in the reference gets distance 0.
    """
    dist = torch.empty(len(x), dtype=torch.float64, device=x.device)
    idx = torch.empty(len(x), dtype=torch.long, device=x.device)
    x32, ref32 = x.float(), ref.float()
    ref_sq = ref32.pow(2).sum(dim=1)
    for s in range(0, len(x), block):
        xb = x32[s : s + block]
        d2 = torch.addmm(ref_sq.unsqueeze(0), xb, ref32.T, alpha=-2.0)  # ||r||^2 - 2 x.r: the ||x||^2 term ranks nothing
        nearest = d2.argmin(dim=1)
        idx[s : s + block] = nearest
        dist[s : s + block] = (x[s : s + block].double() - ref[nearest].double()).norm(dim=1)
    return dist, idx


def dsa_scores(ats: Tensor, preds: Tensor, ref_ats: Tensor, ref_preds: Tensor) -> Tensor:
    """DSA of every row of ``ats`` (predicted classes ``preds``) against the reference."""
    out = torch.empty(len(ats), dtype=torch.float64)
    shift = ref_ats.mean(dim=0)  # centring keeps the float rounding of ||a||^2 + ||b||^2 - 2ab small
    ats, ref_ats = ats - shift, ref_ats - shift.to(ref_ats.device)
    for c in torch.unique(preds).tolist():
        rows = torch.nonzero(preds == c).flatten()
        same = torch.nonzero(ref_preds == c).flatten()
        other = torch.nonzero(ref_preds != c).flatten()
        if len(same) == 0 or len(other) == 0:
            raise DltestError(f"dsa: the reference has {len(same)} input(s) predicted as class {c} and {len(other)} of "
                              "other classes; both must be present (raise reference_size)")
        dist_a, nearest = _nearest(ats[rows], ref_ats[same])
        used, back = torch.unique(nearest, return_inverse=True)
        dist_b, _ = _nearest(ref_ats[same][used], ref_ats[other])
        out[rows] = (dist_a / dist_b[back]).cpu()
    return out


def _principal(cov: Tensor, rel: float = 1e-9) -> tuple[Tensor, Tensor]:
    """(eigenvalues, eigenvectors) of a symmetric matrix above ``rel`` of the largest eigenvalue."""
    values, vectors = torch.linalg.eigh(cov)
    keep = values > rel * values.max().clamp_min(0)
    return values[keep], vectors[:, keep]


VAR_SCOPES = ("union", "per-class")


def flat_neurons(ref_ats: Tensor, var_threshold: float) -> Tensor:
    """Mask of the neurons whose population variance over ``ref_ats`` is below ``var_threshold``."""
    return ref_ats.var(dim=0, unbiased=False) < var_threshold


def union_of_flat_neurons(ref_ats: Tensor, ref_preds: Tensor, var_threshold: float) -> Tensor:
    """Mask of the neurons flat in at least one class of the reference (classes with >= 2 inputs)."""
    flat = torch.zeros(ref_ats.shape[1], dtype=torch.bool, device=ref_ats.device)
    for c in torch.unique(ref_preds).tolist():
        members = ref_ats[ref_preds == c]
        if len(members) >= 2:
            flat |= flat_neurons(members, var_threshold)
    return flat


def lsa_scores(ats: Tensor, preds: Tensor, ref_ats: Tensor, ref_preds: Tensor,
               var_threshold: float = 1e-5, on_degenerate: Callable[[str], None] = notice,
               var_scope: str = "union") -> Tensor:
    """-log KDE density of every row of ``ats`` under its predicted class's reference KDE."""
    if var_scope not in VAR_SCOPES:
        raise DltestError(f"var_scope must be one of {', '.join(VAR_SCOPES)}, not {var_scope!r}")
    out = torch.empty(len(ats), dtype=torch.float64)
    ats, ref_ats = ats.double(), ref_ats.double()
    union_flat = union_of_flat_neurons(ref_ats, ref_preds, var_threshold) if var_scope == "union" else None
    for c in torch.unique(preds).tolist():
        rows = torch.nonzero(preds == c).flatten()
        data = ref_ats[ref_preds == c]
        m = len(data)
        if m < 2:
            raise DltestError(f"lsa: the reference has {m} input(s) predicted as class {c}; a density estimate needs "
                              "at least 2 (raise reference_size)")
        live = ~(union_flat if union_flat is not None else flat_neurons(data, var_threshold))
        if not bool(live.any()):
            where = "some class" if union_flat is not None else f"class {c}"
            raise DltestError(f"lsa: every neuron of the layer varies by less than var_threshold={var_threshold} over "
                              f"the reference inputs of {where}: no density to estimate (use another layer, "
                              "lower var_threshold, or var_scope='per-class')")
        data, x = data[:, live], ats[rows][:, live]
        d = data.shape[1]
        data_cov = torch.cov(data.T).reshape(d, d)
        try:
            factor = m ** (-1.0 / (d + 4))  # Scott's rule, as scipy's gaussian_kde
            chol = torch.linalg.cholesky(data_cov * factor**2)
            project = torch.linalg.solve_triangular(chol, torch.eye(d, dtype=chol.dtype, device=chol.device), upper=False).T
            log_det = 2.0 * torch.log(torch.diagonal(chol)).sum()
            dims = d
        except RuntimeError:  # torch.linalg.LinAlgError: not positive definite
            values, vectors = _principal(data_cov)
            dims = len(values)
            if dims == 0:
                raise DltestError(f"lsa: the reference inputs of class {c} do not spread in any direction "
                                  "(all identical): no density to estimate") from None
            on_degenerate(f"lsa: the kernel density of class {c} is degenerate ({d} neurons, {m} reference inputs, "
                          f"rank {dims}); it is estimated in the {dims}-dimensional subspace the reference spans")
            values = values * (m ** (-1.0 / (dims + 4))) ** 2  # Scott's rule in that subspace
            project = vectors / values.sqrt()
            log_det = torch.log(values).sum()
        y_ref, y = data @ project, x @ project
        shift = y_ref.mean(dim=0)
        y_ref, y = y_ref - shift, y - shift
        log_norm = -math.log(m) - 0.5 * (dims * math.log(2 * math.pi) + float(log_det))
        scores = torch.empty(len(rows), dtype=torch.float64)
        for s in range(0, len(rows), BLOCK):
            log_kernels = -0.5 * _sq_distances(y[s : s + BLOCK], y_ref)
            scores[s : s + BLOCK] = -(torch.logsumexp(log_kernels, dim=1) + log_norm).cpu()
        out[rows] = scores
    return out


def mdsa_scores(ats: Tensor, preds: Tensor, ref_ats: Tensor, ref_preds: Tensor) -> Tensor:
    """Mahalanobis distance of every row of ``ats`` to its predicted class's reference mean."""
    out = torch.empty(len(ats), dtype=torch.float64)
    ats, ref_ats = ats.double(), ref_ats.double()
    for c in torch.unique(preds).tolist():
        rows = torch.nonzero(preds == c).flatten()
        data = ref_ats[ref_preds == c]
        if len(data) < 1:
            raise DltestError(f"mdsa: the reference has no input predicted as class {c} (raise reference_size)")
        mean = data.mean(dim=0)
        centred = data - mean
        cov = centred.T @ centred / len(data)  # maximum likelihood, as EmpiricalCovariance
        values, vectors = _principal(cov, rel=1e-12)  # pseudo-inverse of a singular covariance
        y = (ats[rows] - mean) @ (vectors / values.sqrt())
        out[rows] = y.pow(2).sum(dim=1).sqrt().cpu()
    return out


class _SurpriseAdequacy(ScoreSelector):
    needs_model = True
    needs_reference = True

    def __init__(self, layer: str = PENULTIMATE, reference_size: int = 10000, reference_seed: int = 0):
        if int(reference_size) != reference_size or reference_size < 2:
            raise DltestError(f"reference_size must be a whole number >= 2, not {reference_size}")
        self.layer = str(layer)
        self.reference_size = int(reference_size)
        self.reference_seed = int(reference_seed)
        self.used: dict[str, Any] = {}

    def options(self) -> dict[str, Any]:
        return {**super().options(), **self.used}

    def reference_activations(self, candidates: Candidates) -> tuple[Tensor, Tensor]:
        """ATs and predicted classes of the seeded reference subsample."""
        reference = candidates.reference
        if reference is None:
            raise DltestError(f"{self.name} needs reference inputs (the training data): pass reference= to select, "
                              "or --reference-split train / --reference FILE to dltest select")
        size = min(self.reference_size, len(reference))
        positions = torch.randperm(len(reference), generator=torch.Generator().manual_seed(self.reference_seed))[:size]
        subset = reference.subset(positions.sort().values) if size < len(reference) else reference
        self.used = {"reference": f"{reference.name}/{reference.split}", "reference_inputs": size}
        assert candidates.model is not None
        return layer_activations(candidates.model, subset, self.layer, candidates.device)

    def pool_activations(self, candidates: Candidates) -> tuple[Tensor, Tensor]:
        cached = candidates.outputs.embeddings
        if self.layer == PENULTIMATE and cached is not None and embedding_head(candidates.model) is not None:
            return cached, candidates.outputs.predictions
        if candidates.data is None:
            raise DltestError(f"{self.name} at layer {self.layer!r} needs the pool's images")
        return layer_activations(candidates.model, candidates.data, self.layer, candidates.device)

    def surprise(self, ats: Tensor, preds: Tensor, ref_ats: Tensor, ref_preds: Tensor) -> Tensor:
        raise NotImplementedError

    def score(self, candidates: Candidates) -> Tensor:
        if candidates.model is None:
            raise DltestError(f"{self.name} needs the model")
        ref_ats, ref_preds = self.reference_activations(candidates)
        ats, preds = self.pool_activations(candidates)
        device = candidates.device
        return self.surprise(ats.to(device), preds.to(device), ref_ats.to(device), ref_preds.to(device))


@register
class DSA(_SurpriseAdequacy):
    name = "dsa"
    summary = "DSA: distance-based surprise adequacy against reference (training) activations"
    score_name = "DSA"

    def surprise(self, ats: Tensor, preds: Tensor, ref_ats: Tensor, ref_preds: Tensor) -> Tensor:
        return dsa_scores(ats, preds, ref_ats, ref_preds)


@register
class LSA(_SurpriseAdequacy):
    name = "lsa"
    summary = "LSA: -log KDE density of the activations under the reference (training) activations"
    score_name = "LSA"

    def __init__(self, layer: str = PENULTIMATE, reference_size: int = 10000, reference_seed: int = 0,
                 var_threshold: float = 1e-5, var_scope: str = "union"):
        super().__init__(layer, reference_size, reference_seed)
        if not float(var_threshold) >= 0:
            raise DltestError(f"var_threshold must be >= 0, not {var_threshold}")
        if var_scope not in VAR_SCOPES:
            raise DltestError(f"var_scope must be one of {', '.join(VAR_SCOPES)}, not {var_scope!r}")
        self.var_threshold = float(var_threshold)
        self.var_scope = var_scope

    def surprise(self, ats: Tensor, preds: Tensor, ref_ats: Tensor, ref_preds: Tensor) -> Tensor:
        return lsa_scores(ats, preds, ref_ats, ref_preds, self.var_threshold, var_scope=self.var_scope)


@register
class MDSA(_SurpriseAdequacy):
    name = "mdsa"
    summary = "MDSA: Mahalanobis distance to the class mean of the reference (training) activations"
    score_name = "MDSA"

    def surprise(self, ats: Tensor, preds: Tensor, ref_ats: Tensor, ref_preds: Tensor) -> Tensor:
        return mdsa_scores(ats, preds, ref_ats, ref_preds)
