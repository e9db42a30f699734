"""Adversarial training methods: how one batch becomes a training loss.

The trainer (:func:`dltest.training.train`) calls ``method.loss(model, images, labels, eps)``
once per batch, with ``eps`` ramped up from 0 over the first ``warmup_epochs`` epochs. Each
method builds its perturbation with the model in eval mode and computes the loss in train mode.

- ``pgd`` (Madry et al. 2018; the paper's protocol): k-step PGD from a random start; the
  perturbed inputs replace the clean ones (used even where the attack fails). k + 1 gradient
  evaluations per batch.
- ``fgsm-rs`` (Wong, Rice and Kolter 2020, "Fast is better than free"): one signed-gradient
  step of 1.25 eps from a uniform random start, projected onto the eps-ball. 2 evaluations.
- ``n-fgsm`` (de Jorge et al. 2022): noise uniform in [-2 eps, 2 eps], one step of eps, no
  projection: resists catastrophic overfitting at larger eps. 2 evaluations.
- ``trades`` (Zhang et al. 2019): cross-entropy on the clean inputs plus ``beta`` times the KL
  divergence between the predictions on the clean and on the perturbed inputs, the
  perturbation maximising that KL with k PGD steps. k + 2 evaluations.

Why a warm-up: at MNIST's eps 0.3 a freshly initialised LeNet-5 trained on full-strength
examples from the first step falls into the constant predictor (11% accuracy); ramping eps
linearly from 0 (Gowal et al. 2018's IBP schedule, common for MNIST at large eps) avoids it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dltest.attacks import pgd_linf
from dltest.errors import DltestError
from dltest.profiles import FAMILIES
from dltest.runtime import native_cpu_backward, native_input_grad_pays

AT_METHODS = ("pgd", "fgsm-rs", "n-fgsm", "trades")

# TRADES' inner maximisation by image family (its paper: 40 steps of 0.01 at eps 0.3 on MNIST,
# 10 steps of 2/255 on CIFAR-10); PGD's comes from the SPEC §2 training preset of the profile.
_TRADES_DEFAULTS = {"grey": (0.01, 40), "colour": (2 / 255, 10)}


@dataclass(frozen=True)
class AdversarialTraining:
    """One adversarial-training method with its settings; ``loss(...)`` gives a batch's loss.

    ``alpha`` is the step size (PGD/TRADES: per step; FGSM-RS and N-FGSM: as a multiple of eps,
    default 1.25 and 1.0), ``steps`` the inner PGD/TRADES steps, ``warmup_epochs`` the epochs over
    which eps grows linearly from 0 to ``eps``, ``beta`` TRADES' trade-off.
    """

    method: str = "pgd"
    eps: float = 0.3
    alpha: float | None = None
    steps: int | None = None
    warmup_epochs: float = 0.0
    beta: float = 6.0
    family: str = "grey"

    def __post_init__(self) -> None:
        if self.method not in AT_METHODS:
            raise DltestError(f"unknown adversarial training method {self.method!r}; choose one of {', '.join(AT_METHODS)}")
        if not (0 < self.eps <= 1) or math.isnan(self.eps):
            raise DltestError(f"eps must be in (0, 1], got {self.eps:g}")
        if self.steps is not None and self.steps < 1:
            raise DltestError(f"steps must be >= 1, got {self.steps}")
        if self.alpha is not None and not (self.alpha > 0 and math.isfinite(self.alpha)):
            raise DltestError(f"alpha must be a positive number, got {self.alpha:g}")
        if not (self.warmup_epochs >= 0 and math.isfinite(self.warmup_epochs)):
            raise DltestError(f"warmup_epochs must be >= 0, got {self.warmup_epochs:g}")
        if not self.beta > 0:
            raise DltestError(f"beta must be > 0, got {self.beta:g}")
        if self.family not in FAMILIES:
            raise DltestError(f"unknown image family {self.family!r}; choose one of {', '.join(FAMILIES)}")

    def _defaults(self) -> tuple[float, int]:
        """The method's (step size, steps) for the image family when not given."""
        if self.method == "pgd":
            preset = FAMILIES[self.family].pgd_train
            return preset.alpha, preset.steps
        if self.method == "trades":
            return _TRADES_DEFAULTS[self.family]
        return (1.25 if self.method == "fgsm-rs" else 1.0), 1

    @property
    def step_size(self) -> float:
        """PGD / TRADES: the absolute step; FGSM-RS / N-FGSM: the step as a multiple of eps."""
        return self.alpha if self.alpha is not None else self._defaults()[0]

    @property
    def num_steps(self) -> int:
        return self.steps if self.steps is not None else self._defaults()[1]

    @property
    def gradient_evaluations(self) -> int:
        """Forward-backward passes per batch, the training step included."""
        return {"pgd": self.num_steps + 1, "trades": self.num_steps + 2}.get(self.method, 2)

    def eps_at(self, epoch: float) -> float:
        """eps after ``epoch`` epochs of training (fractional), ramped linearly during the warm-up."""
        if self.warmup_epochs <= 0:
            return self.eps
        return self.eps * min(1.0, max(epoch, 0.0) / self.warmup_epochs)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(alpha=self.step_size, steps=self.num_steps)
        return data

    @property
    def label(self) -> str:
        step = f"alpha={self.step_size:g}" + ("" if self.method in ("pgd", "trades") else "*eps")
        parts = [self.method, f"eps={self.eps:g}", step]
        if self.method in ("pgd", "trades"):
            parts.append(f"steps={self.num_steps}")
        if self.method == "trades":
            parts.append(f"beta={self.beta:g}")
        if self.warmup_epochs:
            parts.append(f"warm-up {self.warmup_epochs:g} epochs")
        return " ".join(parts)

    def loss(self, model: nn.Module, images: Tensor, labels: Tensor, eps: float) -> tuple[Tensor, Tensor]:
        """The training loss of a batch at radius ``eps``, and the logits it was computed from.

        Leaves the model in train mode (the caller steps the optimiser).
        """
        if eps <= 0:
            model.train()
            logits = model(images)
            return F.cross_entropy(logits.float(), labels), logits
        model.eval()
        if self.method == "trades":
            return self._trades(model, images, labels, eps)
        if self.method == "pgd":
            adv = pgd_linf(model, images, labels, eps, min(self.step_size, eps), self.num_steps)
        else:
            adv = self._single_step(model, images, labels, eps)
        model.train()
        logits = model(adv.detach())
        return F.cross_entropy(logits.float(), labels), logits

    def _single_step(self, model: nn.Module, x: Tensor, y: Tensor, eps: float) -> Tensor:
        """FGSM-RS (projected) or N-FGSM (wider noise, not projected)."""
        noise = 2 * eps if self.method == "n-fgsm" else eps
        start = torch.clamp(x + torch.empty_like(x).uniform_(-noise, noise), 0, 1).requires_grad_(True)
        grad = _input_gradient(lambda z: F.cross_entropy(model(z).float(), y), start)
        adv = start.detach() + self.step_size * eps * grad.sign()
        if self.method == "fgsm-rs":
            adv = x + torch.clamp(adv - x, -eps, eps)
        return torch.clamp(adv, 0, 1)

    def _trades(self, model: nn.Module, x: Tensor, y: Tensor, eps: float) -> tuple[Tensor, Tensor]:
        with torch.no_grad():
            clean_probs = F.softmax(model(x).float(), dim=1)
        adv = torch.clamp(x + 0.001 * torch.randn_like(x), 0, 1)
        step = min(self.step_size, eps)
        for _ in range(self.num_steps):
            adv.requires_grad_(True)
            grad = _input_gradient(
                lambda z: F.kl_div(F.log_softmax(model(z).float(), dim=1), clean_probs, reduction="sum"), adv
            )
            adv = x + torch.clamp(adv.detach() + step * grad.sign() - x, -eps, eps)
            adv = torch.clamp(adv, 0, 1)
        model.train()
        logits = model(x)
        adv_logits = model(adv.detach())
        robust = F.kl_div(F.log_softmax(adv_logits.float(), dim=1), F.softmax(logits.float(), dim=1),
                          reduction="batchmean")
        return F.cross_entropy(logits.float(), y) + self.beta * robust, logits


def _input_gradient(loss_of: Callable[[Tensor], Tensor], inputs: Tensor) -> Tensor:
    loss = loss_of(inputs)
    with native_cpu_backward(native_input_grad_pays(inputs)):
        (grad,) = torch.autograd.grad(loss, inputs)
    return grad


def adversarial_training(
    method: str,
    family: str = "grey",
    *,
    eps: float | None = None,
    alpha: float | None = None,
    steps: int | None = None,
    warmup_epochs: float | None = None,
    beta: float | None = None,
) -> AdversarialTraining:
    """``method`` at the SPEC §2 training preset of an image ``family`` (a profile's ``attack.name``:
    grey, eps 0.3; colour, eps 8/255).

    The default warm-up is 3 epochs for grey images at eps 0.3 (without it LeNet-5 collapses,
    see the module docstring) and none for colour images, whose eps is small.
    """
    if method not in AT_METHODS:
        raise DltestError(f"unknown adversarial training method {method!r}; choose one of {', '.join(AT_METHODS)}")
    if method in ("fgsm-rs", "n-fgsm") and steps is not None:
        raise DltestError(f"{method} is a single-step method and takes no steps")
    if method != "trades" and beta is not None:
        raise DltestError("beta applies to trades only")
    if family not in FAMILIES:
        raise DltestError(f"unknown image family {family!r}; choose one of {', '.join(FAMILIES)}")
    return AdversarialTraining(
        method=method,
        eps=eps if eps is not None else FAMILIES[family].eps,
        alpha=alpha,
        steps=steps,
        warmup_epochs=warmup_epochs if warmup_epochs is not None else (3.0 if family == "grey" else 0.0),
        beta=beta if beta is not None else 6.0,
        family=family,
    )
