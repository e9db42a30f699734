"""Attack kernels dltest runs itself: a lean batched Linf PGD and a batched L2 DeepFool.

:func:`pgd_linf` gives torchattacks' ``PGD`` outputs (same arithmetic, same random start)
without its per-call overhead, and follows the trainer's mixed precision on CUDA.

:func:`deepfool_l2` is the original DeepFool (Moosavi-Dezfooli et al. 2016) in [0, 1], as SPEC §1
writes it: each step r_i goes to the nearest linearised boundary at the current iterate, the steps
add up to r_total, and every iterate is x_i = clip(x + (1 + overshoot) r_total, 0, 1): the
overshoot scales the accumulated perturbation, never a single step. Every step aims 1e-4 beyond
the linearised boundary, as in the original, so an input on an exact tie still moves, and with
clipping an input that creeps towards the boundary (part of each step is lost on pixels already
at 0 or 1) still crosses it. A label counts as flipped when another logit is strictly larger
than the label's, which no class index decides. The norm returned is that of the iterate whose
label flipped (after clipping), not one past it. On 2000 MNIST test candidates (seed 0, bundled
model) every one flips, in a median of 8 steps (at most 15).

Issue 17: an earlier version dropped the gradient components that would push a pixel out of
[0, 1] before taking a step. It crossed in a median of 2 steps instead of 8, but its norms were
0.7-16% larger than the formula's (median 3.7%, 60 MNIST test inputs, bundled model), so it was
not the DeepFool of SPEC. tests/test_selectors_model.py checks this kernel against a per-input
float64 loop of the formula.

It is batched: all inputs of a batch iterate together; the gradients of f_k - f_label for the
C - 1 other classes k come from C - 1 backward passes over the whole batch (the one forward pass
also decides which labels flipped); each input leaves the batch when its label flips.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dltest.runtime import eval_mode, native_cpu_backward, native_input_grad_pays


def pgd_linf(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    eps: float,
    alpha: float,
    steps: int,
    random_start: bool = True,
    start: Tensor | None = None,
    native_backward: bool = True,
) -> Tensor:
    """Linf PGD (Madry et al.) on a batch, the way torchattacks' ``PGD`` computes it.

    Random start uniform in [-eps, eps] (drawn from torch's global generator, as torchattacks
    does, so that a seeded run gives torchattacks' outputs), or ``start`` if given; then
    ``steps`` sign-gradient steps of size ``alpha``, each projected onto the eps-ball and
    [0, 1]. Gradients are taken with respect to the inputs only: parameters' ``requires_grad``
    and ``.grad`` are left untouched. The model's mode is the caller's (the trainer sets eval).
    Under CUDA autocast in float16, the loss is scaled so that small gradients keep their sign.
    On the CPU, for grey images, the input gradient is computed under
    :func:`~dltest.runtime.native_cpu_backward` unless ``native_backward=False`` (the kernels
    differ in rounding, so compare with torchattacks under the same setting).
    """
    x = images.detach()
    if start is not None:
        adv = start.detach().to(x.dtype)
    elif random_start:
        adv = torch.clamp(x + torch.empty_like(x).uniform_(-eps, eps), min=0, max=1).detach()
    else:
        adv = x.clone()
    scale = 1.0
    if x.is_cuda and torch.is_autocast_enabled("cuda") and torch.get_autocast_dtype("cuda") == torch.float16:
        scale = 1024.0
    for _ in range(steps):
        adv.requires_grad_(True)
        logits = model(adv)
        loss = F.cross_entropy(logits.float(), labels)
        if scale != 1.0:
            loss = loss * scale
        with native_cpu_backward(native_backward and native_input_grad_pays(x)):
            (grad,) = torch.autograd.grad(loss, adv)
        adv = adv.detach() + alpha * grad.sign()
        delta = torch.clamp(adv - x, min=-eps, max=eps)
        adv = torch.clamp(x + delta, min=0, max=1).detach()
    return adv


@dataclass(frozen=True)
class PGDAdversary:
    """dltest's PGD: the settings of :func:`pgd_linf`, called as the trainer's adversary
    ``pgd(model, images, labels)`` (the model's mode is the caller's), or bound to a model as a
    torchattacks-style attack, ``pgd.on(model)(images, labels)`` (eval mode, modes restored after).

    The ``pgd`` attack preset's training settings, the ``pgd`` adversarial-training method's inner
    attack and the trainer's per-epoch check (:func:`~dltest.attacks.pgd_check`, fewer and larger
    steps) are all this one PGD.
    """

    eps: float
    alpha: float
    steps: int
    random_start: bool = True

    def __call__(self, model: nn.Module, images: Tensor, labels: Tensor) -> Tensor:
        return pgd_linf(model, images, labels, self.eps, self.alpha, self.steps, self.random_start)

    def on(self, model: nn.Module) -> "Callable[[Tensor, Tensor], Tensor]":
        """This PGD on ``model``: ``attack(images, labels)``, run in eval mode."""

        def attack(images: Tensor, labels: Tensor) -> Tensor:
            with eval_mode(model):
                return self(model, images, labels)

        return attack


# --- batched L2 DeepFool (DFAL) ------------------------------------------------------------------

DEEPFOOL_BATCH = 256
FLIP_MARGIN = 1e-4  # added to |f_k - f_label| in every step, as in the original DeepFool


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


def deepfool_step(logits: Tensor, w: Tensor, labels: Tensor) -> Tensor:
    """One DeepFool step r_i of every row, (B, D): to the nearest linearised boundary, 1e-4 beyond it.

    ``w`` are the gradients of f_k - f_label from :func:`boundary_gradients`; the nearest
    boundary is the k with the smallest |f_k - f_label| / ||w_k||.
    """
    logits = logits.detach()
    rows = torch.arange(len(logits), device=logits.device)
    f = logits.gather(1, other_classes(labels, logits.shape[1])) - logits[rows, labels].unsqueeze(1)
    w_norm = w.norm(dim=2)
    value = torch.where(w_norm > 0, f.abs() / w_norm, torch.full_like(f, math.inf))
    nearest = value.argmin(dim=1)
    f_hat, w_hat, n_hat = f[rows, nearest], w[rows, nearest], w_norm[rows, nearest]
    push = f_hat.abs() + FLIP_MARGIN  # the original's 1e-4: an input on a tie moves on
    return (push / n_hat.pow(2).clamp_min(torch.finfo(w.dtype).tiny)).unsqueeze(1) * w_hat


def label_margin(logits: Tensor, labels: Tensor) -> Tensor:
    """The label's logit minus the largest other logit, per row (< 0: the label flipped)."""
    own = logits.gather(1, labels.unsqueeze(1)).squeeze(1)
    return own - logits.scatter(1, labels.unsqueeze(1), -math.inf).max(dim=1).values


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
    batch_size: int = DEEPFOOL_BATCH,
) -> DeepFoolResult:
    """Batched L2 DeepFool against the model's own predictions on ``images`` (in [0, 1], on the
    model's device), the overshoot on the accumulated perturbation; see :class:`DeepFoolResult`."""
    parts = []
    with eval_mode(model):
        for s in range(0, len(images), batch_size):
            parts.append(deepfool_batch(model, images[s : s + batch_size], overshoot, steps)[1])
    if not parts:
        empty = torch.zeros(0, dtype=torch.float64)
        return DeepFoolResult(empty, torch.zeros(0, dtype=torch.long), empty, empty)
    return DeepFoolResult(*(torch.cat(column) for column in zip(*parts)))


def deepfool_batch(model: nn.Module, images: Tensor, overshoot: float, steps: int) -> tuple[Tensor, DeepFoolResult]:
    """DeepFool on one batch, all inputs together, each leaving when its label flips: (the last
    iterates, the flipping one where the label flipped; the :class:`DeepFoolResult`). The model's
    mode is the caller's."""
    n = len(images)
    norms = torch.full((n,), math.inf, dtype=torch.float64)
    final_norms = torch.zeros(n, dtype=torch.float64)
    margins = torch.zeros(n, dtype=torch.float64)
    iterations = torch.full((n,), steps, dtype=torch.long)
    x0 = images.detach()
    x = x0.clone()
    r_total = torch.zeros_like(x0)
    active = torch.arange(n, device=x0.device)
    labels = torch.empty(0, dtype=torch.long)
    for step in range(steps + 1):
        xa = x[active].clone().requires_grad_(True)
        logits = model(xa)
        if step == 0:
            labels = logits.detach().argmax(dim=1)
        margin = label_margin(logits.detach().double(), labels[active])
        flipped = margin < 0
        done = flipped if step < steps else torch.ones_like(flipped)
        if done.any():
            at = active[done]
            dist = (x[at] - x0[at]).flatten(1).double().norm(dim=1).cpu()
            at = at.cpu()
            final_norms[at] = dist
            margins[at] = margin[done].cpu()
            hit = flipped[done].cpu()
            norms[at[hit]] = dist[hit]
            iterations[at[hit]] = step
        if done.all():
            break
        keep = ~flipped
        with native_cpu_backward(native_input_grad_pays(xa)):
            w = boundary_gradients(logits, xa, labels[active])[keep]
        active = active[keep]
        step_r = deepfool_step(logits[keep], w, labels[active]).view_as(x0[active])
        x[active] = torch.clamp(x0[active] + (1 + overshoot) * (r_total[active] + step_r), 0, 1)
        r_total[active] += step_r
    return x.detach(), DeepFoolResult(norms, iterations, final_norms, margins)


class DeepFoolL2:
    """The ``deepfool`` attack preset on :func:`deepfool_batch`: ``DeepFoolL2(model)(x, y)``.

    Inputs the model already misclassifies come back unchanged (as in torchattacks' DeepFool);
    the others come back at the iterate where their label flipped, or at the last iterate when
    it did not flip within ``steps``. Puts the model in eval mode and restores every module's mode.
    """

    def __init__(self, model: nn.Module, steps: int = 50, overshoot: float = 0.02,
                 batch_size: int = DEEPFOOL_BATCH):
        self.model, self.steps, self.overshoot, self.batch_size = model, steps, overshoot, batch_size

    def __call__(self, images: Tensor, labels: Tensor) -> Tensor:
        adv = images.detach().clone()
        with eval_mode(self.model):
            with torch.no_grad():
                correct = torch.nonzero(self.model(images).argmax(dim=1) == labels).flatten()
            for s in range(0, len(correct), self.batch_size):
                rows = correct[s : s + self.batch_size]
                adv[rows] = deepfool_batch(self.model, images[rows], self.overshoot, self.steps)[0]
        return adv
