"""Attack kernels dltest runs itself: a lean batched Linf PGD.

:func:`pgd_linf` gives torchattacks' ``PGD`` outputs (same arithmetic, same random start)
without its per-call overhead, and follows the trainer's mixed precision on CUDA. (The batched
DeepFool that DFAL uses lives in :mod:`dltest.selectors.dfal` for now.)
"""

from __future__ import annotations

from dataclasses import dataclass

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


class LinfPGD:
    """torchattacks-style PGD on :func:`pgd_linf`: ``LinfPGD(model, eps, alpha, steps)(x, y)``.

    Puts the model in eval mode for the attack and restores every module's mode after.
    """

    def __init__(self, model: nn.Module, eps: float = 0.3, alpha: float = 0.01, steps: int = 40,
                 random_start: bool = True):
        self.model, self.eps, self.alpha, self.steps, self.random_start = model, eps, alpha, steps, random_start

    def __call__(self, images: Tensor, labels: Tensor) -> Tensor:
        with eval_mode(self.model):
            return pgd_linf(self.model, images, labels, self.eps, self.alpha, self.steps, self.random_start)


@dataclass(frozen=True)
class PGDAdversary:
    """The trainer's adversary: ``adversary(model, images, labels)`` runs :func:`pgd_linf`."""

    eps: float
    alpha: float
    steps: int
    random_start: bool = True

    def __call__(self, model: nn.Module, images: Tensor, labels: Tensor) -> Tensor:
        return pgd_linf(model, images, labels, self.eps, self.alpha, self.steps, self.random_start)
