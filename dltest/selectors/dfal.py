"""DFAL: DeepFool active learning (Ducoffe & Precioso 2018; SPEC §1, "DFAL").

Inputs whose predicted label flips under the smallest L2 perturbation lie nearest the decision
boundary. DFAL draws a seeded random candidate subset of size min(candidate_factor * b, n), runs
DeepFool (L2, overshoot 0.02, at most 50 iterations) on it, and selects the b candidates with the
smallest perturbation norms (ties to the lower pool position). Candidates that never flip rank
last (norm +inf). The adversarial examples are discarded.

:func:`deepfool_l2` is batched: all inputs of a batch iterate together; the gradients of
f_k - f_label for the C - 1 other classes k come from C - 1 backward passes over the whole batch
(the one forward pass also decides which labels flipped); each input leaves the batch when its
label flips. The iteration is
torchattacks' ``DeepFool`` (the step toward the nearest linearised boundary, times 1 + overshoot,
clipped to [0, 1] after every step), so the norms agree with it; the norm returned is that of
the iterate at which the label flipped, not one past it.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor, nn

from dltest.errors import DltestError
from dltest.progress import progress_bar
from dltest.runtime import eval_mode, native_cpu_backward, native_input_grad_pays
from dltest.selectors.base import Candidates, Selection, Selector, rank, register

BATCH_SIZE = 256


def boundary_gradients(logits: Tensor, x: Tensor, labels: Tensor) -> Tensor:
    """Gradients of f_k - f_label for every other class k, (B, C - 1, D): C - 1 batched backward passes.

    Column r holds class r if r < label, else r + 1 (the classes other than the label, in order).
    """
    b, c = logits.shape
    rows = torch.arange(b, device=logits.device)
    grads = []
    for r in range(c - 1):
        other = r + (r >= labels).long()
        cotangent = torch.zeros_like(logits)
        cotangent[rows, other] = 1.0
        cotangent[rows, labels] = -1.0
        (g,) = torch.autograd.grad(logits, x, grad_outputs=cotangent, retain_graph=r + 2 < c)
        grads.append(g.flatten(1))
    return torch.stack(grads, dim=1)


def other_classes(labels: Tensor, c: int) -> Tensor:
    """(B, C - 1): the classes other than each label, in increasing order."""
    r = torch.arange(c - 1, device=labels.device).unsqueeze(0)
    return r + (r >= labels.unsqueeze(1)).long()


def deepfool_step(x: Tensor, logits: Tensor, w: Tensor, labels: Tensor, overshoot: float) -> Tensor:
    """One DeepFool step of every row: toward the nearest linearised boundary, clipped to [0, 1].

    ``w`` are the gradients of f_k - f_label from :func:`boundary_gradients`.
    """
    logits = logits.detach()
    rows = torch.arange(len(x), device=x.device)
    f = logits.gather(1, other_classes(labels, logits.shape[1])) - logits[rows, labels].unsqueeze(1)
    w_norm = w.norm(dim=2)
    value = torch.where(w_norm > 0, f.abs() / w_norm, torch.full_like(f, math.inf))
    nearest = value.argmin(dim=1)
    f_hat, w_hat, n_hat = f[rows, nearest], w[rows, nearest], w_norm[rows, nearest]
    delta = (f_hat.abs() / n_hat.pow(2).clamp_min(torch.finfo(w.dtype).tiny)).unsqueeze(1) * w_hat
    return torch.clamp(x + (1 + overshoot) * delta.view_as(x), 0, 1)


class DeepFoolResult(NamedTuple):
    """Per input: ``norms`` of the flipping perturbation (+inf: no flip within the steps),
    ``iterations`` taken, ``final_norms`` of the last iterate's perturbation (flipped or not) and
    ``margins``, the label's logit minus the largest other logit at that iterate (< 0: flipped)."""

    norms: Tensor
    iterations: Tensor
    final_norms: Tensor
    margins: Tensor


def deepfool_l2(
    model: nn.Module,
    images: Tensor,
    *,
    overshoot: float = 0.02,
    steps: int = 50,
    batch_size: int = BATCH_SIZE,
) -> DeepFoolResult:
    """Batched L2 DeepFool against the model's own predictions on ``images`` (in [0, 1], on the
    model's device); see :class:`DeepFoolResult`.

    With clipping to [0, 1], some inputs converge onto the decision boundary from the label's side
    without crossing it; whether their last iterate counts as flipped is then decided by float
    rounding (a margin near 0), so it can differ from a per-image run.
    """
    n = len(images)
    norms = torch.full((n,), math.inf, dtype=torch.float64)
    final_norms = torch.zeros(n, dtype=torch.float64)
    margins = torch.zeros(n, dtype=torch.float64)
    iterations = torch.full((n,), steps, dtype=torch.long)
    with eval_mode(model):
        for s in range(0, n, batch_size):
            x0 = images[s : s + batch_size].detach()
            x = x0.clone()
            active = torch.arange(len(x0), device=x0.device)
            labels = None
            for step in range(steps + 1):
                xa = x[active].clone().requires_grad_(True)
                logits = model(xa)
                pred = logits.argmax(dim=1)
                if labels is None:
                    labels = pred.detach()
                flipped = pred != labels[active]
                done = flipped if step < steps else torch.ones_like(flipped)
                if done.any():
                    rows = active[done]
                    dist = (x[rows] - x0[rows]).flatten(1).double().norm(dim=1).cpu()
                    final_norms[s + rows.cpu()] = dist
                    lg = logits.detach()[done].double()
                    own = lg.gather(1, labels[rows].unsqueeze(1)).squeeze(1)
                    margins[s + rows.cpu()] = (own - lg.scatter(1, labels[rows].unsqueeze(1), -math.inf).max(dim=1).values).cpu()
                    hit = flipped[done].cpu()
                    norms[s + rows.cpu()[hit]] = dist[hit]
                    iterations[s + rows.cpu()[hit]] = step
                if done.all():
                    break
                keep = ~flipped
                with native_cpu_backward(native_input_grad_pays(xa)):
                    w = boundary_gradients(logits, xa, labels[active])[keep]
                active = active[keep]
                x[active] = deepfool_step(xa.detach()[keep], logits[keep], w, labels[active], overshoot)
    return DeepFoolResult(norms, iterations, final_norms, margins)


@register
class DFAL(Selector):
    name = "dfal"
    summary = "DFAL: smallest DeepFool (L2) perturbation first, on a seeded random candidate subset"
    score_name = "DeepFool L2 norm"
    needs_model = True

    def __init__(self, candidate_factor: float = 10, overshoot: float = 0.02, steps: int = 50):
        if not float(candidate_factor) >= 1:
            raise DltestError(f"candidate_factor must be >= 1, not {candidate_factor}")
        if not float(overshoot) >= 0:
            raise DltestError(f"overshoot must be >= 0, not {overshoot}")
        if int(steps) != steps or steps < 1:
            raise DltestError(f"steps must be a whole number >= 1, not {steps}")
        self.candidate_factor = candidate_factor
        self.overshoot = float(overshoot)
        self.steps = int(steps)

    def candidates(self, n: int, budget: int, generator: torch.Generator) -> Tensor:
        """The seeded random candidate subset, min(candidate_factor * budget, n) positions, sorted."""
        m = min(max(budget, math.ceil(self.candidate_factor * budget)), n)
        return torch.randperm(n, generator=generator)[:m].sort().values

    def __call__(self, candidates: Candidates, budget: int, generator: torch.Generator) -> Selection:
        if candidates.model is None or candidates.data is None:
            raise DltestError("dfal needs the model and the pool's images")
        drawn = self.candidates(len(candidates), budget, generator)
        model = candidates.model.to(candidates.device)
        parts = []
        with progress_bar("dfal (DeepFool)", total=len(drawn), enabled=candidates.progress) as advance:
            for s in range(0, len(drawn), BATCH_SIZE):
                images = candidates.data.images(drawn[s : s + BATCH_SIZE], candidates.device)
                parts.append(deepfool_l2(model, images, overshoot=self.overshoot, steps=self.steps).norms)
                advance(len(images))
        norms = torch.cat(parts)
        order = rank(norms, budget, highest=False)
        return Selection(drawn[order], norms[order])
