"""Adversarial-training methods, registered by name: how one batch becomes a training loss.

The trainer (:func:`dltest.training.train`) calls ``method.loss(model, images, labels, eps)``
once per batch, with ``eps`` ramped up from 0 over the first ``warmup_epochs`` epochs. Each
method builds its perturbation with the model in eval mode and computes the loss in train mode.

- ``pgd`` (Madry et al. 2018; the paper's protocol): k-step PGD from a random start (the ``pgd``
  attack preset's training settings, run by :class:`~dltest.attacks.PGDAdversary`); the perturbed
  inputs replace the clean ones (used even where the attack fails). k + 1 gradient evaluations
  per batch.
- ``fgsm-rs`` (Wong, Rice and Kolter 2020, "Fast is better than free"): one signed-gradient
  step of 1.25 eps from a uniform random start, projected onto the eps-ball. 2 evaluations.
- ``n-fgsm`` (de Jorge et al. 2022): noise uniform in [-2 eps, 2 eps], one step of eps, no
  projection: resists catastrophic overfitting at larger eps. 2 evaluations.
- ``trades`` (Zhang et al. 2019): cross-entropy on the clean inputs plus ``beta`` times the KL
  divergence between the predictions on the clean and on the perturbed inputs, the
  perturbation maximising that KL with k PGD steps. k + 2 evaluations.

Each method is a frozen dataclass registered with ``@register`` in :data:`TRAINING_METHODS`; its
settings are its constructor's fields (``PGDTraining(eps=0.3, alpha=0.01, steps=40)``). A setting
left ``None`` takes the dataset family's default from :mod:`dltest.profiles` (eps and PGD steps:
the SPEC §2 training preset; warm-up, TRADES' steps and beta: ``AttackFamily.training``), so
:func:`adversarial_training` (``"pgd"``, ``"mnist"``) is all a caller needs. A new method is one
class here: fields for its settings, ``perturb`` (or ``adversarial_loss``) and
``gradient_evaluations``.

Why a warm-up: at MNIST's eps 0.3 a freshly initialised LeNet-5 trained on full-strength
examples from the first step falls into the constant predictor (11% accuracy); ramping eps
linearly from 0 (Gowal et al. 2018's IBP schedule, common for MNIST at large eps) avoids it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Callable, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dltest.attacks import PGDAdversary
from dltest.errors import DltestError
from dltest.profiles import FAMILIES, PROFILES, AttackFamily, dataset_profile
from dltest.runtime import native_cpu_backward, native_input_grad_pays

TRAINING_METHODS: dict[str, type["AdversarialTraining"]] = {}
_COMMON = ("eps", "warmup_epochs", "family")  # the fields every method has; the others are its options


def register(cls: type["AdversarialTraining"]) -> type["AdversarialTraining"]:
    """Class decorator: make an adversarial-training method available by its ``name``."""
    TRAINING_METHODS[cls.name] = cls
    return cls


@dataclass(frozen=True)
class AdversarialTraining:
    """Base class of the methods: ``eps``, the eps ``warmup_epochs``, the image ``family`` whose
    profile defaults fill the settings left ``None``; ``loss(...)`` gives a batch's loss.

    Subclasses set ``name`` and ``summary``, add their settings as fields, and implement
    ``perturb`` (the adversarial inputs the cross-entropy is taken on) or ``adversarial_loss``.
    """

    name: ClassVar[str]
    summary: ClassVar[str]
    relative_alpha: ClassVar[bool] = False  # alpha is a multiple of eps (single-step methods)

    eps: float = 0.3
    warmup_epochs: float = 0.0
    family: str = "grey"

    def __post_init__(self) -> None:
        if not (0 < self.eps <= 1) or math.isnan(self.eps):
            raise DltestError(f"eps must be in (0, 1], got {self.eps:g}")
        if not (self.warmup_epochs >= 0 and math.isfinite(self.warmup_epochs)):
            raise DltestError(f"warmup_epochs must be >= 0, got {self.warmup_epochs:g}")
        if self.family not in FAMILIES:
            raise DltestError(f"unknown image family {self.family!r}; choose one of {', '.join(FAMILIES)}")
        for option, value in self.defaults(FAMILIES[self.family]).items():
            if getattr(self, option) is None:
                object.__setattr__(self, option, value)
        _check_settings(self)

    @classmethod
    def options(cls) -> tuple[str, ...]:
        """The settings this method takes beyond eps and the warm-up, e.g. ``("alpha", "steps")``."""
        return tuple(f.name for f in fields(cls) if f.name not in _COMMON)

    @classmethod
    def defaults(cls, family: AttackFamily) -> dict[str, Any]:
        """The settings of ``family`` (from its dataset profile) for the options left ``None``."""
        return {}

    @property
    def method(self) -> str:
        return self.name

    @property
    def step_size(self) -> float:
        """PGD / TRADES: the absolute step; FGSM-RS / N-FGSM: the step as a multiple of eps."""
        return getattr(self, "alpha")

    @property
    def num_steps(self) -> int:
        return getattr(self, "steps", 1)

    @property
    def gradient_evaluations(self) -> int:
        """Forward-backward passes per batch, the training step included."""
        raise NotImplementedError

    def eps_at(self, epoch: float) -> float:
        """eps after ``epoch`` epochs of training (fractional), ramped linearly during the warm-up."""
        if self.warmup_epochs <= 0:
            return self.eps
        return self.eps * min(1.0, max(epoch, 0.0) / self.warmup_epochs)

    def to_dict(self) -> dict[str, Any]:
        """The settings as written into checkpoints and resumable states: every method writes
        alpha, steps and beta (TRADES' trade-off, unused by the others) as it always did, so that
        states written before the registry still compare equal."""
        beta = getattr(self, "beta", FAMILIES[self.family].training.trades_beta)
        return {"method": self.name, "eps": self.eps, "alpha": self.step_size, "steps": self.num_steps,
                "warmup_epochs": self.warmup_epochs, "beta": beta, "family": self.family}

    @property
    def label(self) -> str:
        step = f"alpha={self.step_size:g}" + ("*eps" if self.relative_alpha else "")
        parts = [self.name, f"eps={self.eps:g}", step]
        if "steps" in self.options():
            parts.append(f"steps={self.num_steps}")
        if "beta" in self.options():
            parts.append(f"beta={getattr(self, 'beta'):g}")
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
        return self.adversarial_loss(model, images, labels, eps)

    def adversarial_loss(self, model: nn.Module, images: Tensor, labels: Tensor, eps: float) -> tuple[Tensor, Tensor]:
        """Cross-entropy on :meth:`perturb`'s inputs (model in eval mode on entry, train mode on exit)."""
        adv = self.perturb(model, images, labels, eps)
        model.train()
        logits = model(adv.detach())
        return F.cross_entropy(logits.float(), labels), logits

    def perturb(self, model: nn.Module, images: Tensor, labels: Tensor, eps: float) -> Tensor:
        raise NotImplementedError


def _check_settings(method: AdversarialTraining) -> None:
    steps, alpha, beta = (getattr(method, k, None) for k in ("steps", "alpha", "beta"))
    if steps is not None and (int(steps) != steps or steps < 1):
        raise DltestError(f"steps must be >= 1, got {steps}")
    if alpha is not None and not (alpha > 0 and math.isfinite(alpha)):
        raise DltestError(f"alpha must be a positive number, got {alpha:g}")
    if beta is not None and not beta > 0:
        raise DltestError(f"beta must be > 0, got {beta:g}")


@register
@dataclass(frozen=True)
class PGDTraining(AdversarialTraining):
    """Madry et al.'s PGD training: ``steps`` steps of ``alpha`` (capped at eps) from a random start."""

    name: ClassVar[str] = "pgd"
    summary: ClassVar[str] = "k-step PGD examples replace the clean batch (Madry et al. 2018; the paper's protocol)"

    alpha: float | None = None
    steps: int | None = None

    @classmethod
    def defaults(cls, family: AttackFamily) -> dict[str, Any]:
        return {"alpha": family.pgd_train.alpha, "steps": family.pgd_train.steps}

    @property
    def gradient_evaluations(self) -> int:
        return self.num_steps + 1

    def perturb(self, model: nn.Module, images: Tensor, labels: Tensor, eps: float) -> Tensor:
        return PGDAdversary(eps, min(self.step_size, eps), self.num_steps)(model, images, labels)


@dataclass(frozen=True)
class _SingleStep(AdversarialTraining):
    """One signed-gradient step of ``alpha`` x eps from uniform noise of ``noise`` x eps."""

    relative_alpha: ClassVar[bool] = True
    noise: ClassVar[float] = 1.0
    project: ClassVar[bool] = True

    @classmethod
    def defaults(cls, family: AttackFamily) -> dict[str, Any]:
        """alpha=None: the method's own multiple of eps (the same for every dataset)."""
        return {"alpha": next(f.default for f in fields(cls) if f.name == "alpha")}

    @property
    def gradient_evaluations(self) -> int:
        return 2

    def perturb(self, model: nn.Module, x: Tensor, y: Tensor, eps: float) -> Tensor:
        noise = self.noise * eps
        start = torch.clamp(x + torch.empty_like(x).uniform_(-noise, noise), 0, 1).requires_grad_(True)
        grad = _input_gradient(lambda z: F.cross_entropy(model(z).float(), y), start)
        adv = start.detach() + self.step_size * eps * grad.sign()
        if self.project:
            adv = x + torch.clamp(adv - x, -eps, eps)
        return torch.clamp(adv, 0, 1)


@register
@dataclass(frozen=True)
class FGSMRSTraining(_SingleStep):
    """FGSM with a random start (Wong et al. 2020): a step of 1.25 eps, projected onto the eps-ball."""

    name: ClassVar[str] = "fgsm-rs"
    summary: ClassVar[str] = "one FGSM step of 1.25 eps from a random start, projected (Wong et al. 2020)"

    alpha: float = 1.25


@register
@dataclass(frozen=True)
class NFGSMTraining(_SingleStep):
    """N-FGSM (de Jorge et al. 2022): noise in [-2 eps, 2 eps], a step of eps, no projection."""

    name: ClassVar[str] = "n-fgsm"
    summary: ClassVar[str] = "one FGSM step of eps from 2-eps noise, not projected (de Jorge et al. 2022)"
    noise: ClassVar[float] = 2.0
    project: ClassVar[bool] = False

    alpha: float = 1.0


@register
@dataclass(frozen=True)
class TRADESTraining(AdversarialTraining):
    """TRADES (Zhang et al. 2019): clean cross-entropy + ``beta`` x KL(clean || perturbed)."""

    name: ClassVar[str] = "trades"
    summary: ClassVar[str] = "clean cross-entropy plus beta x the KL to k-step KL-maximising inputs (Zhang et al. 2019)"

    alpha: float | None = None
    steps: int | None = None
    beta: float | None = None

    @classmethod
    def defaults(cls, family: AttackFamily) -> dict[str, Any]:
        inner = family.training.trades
        return {"alpha": inner.alpha, "steps": inner.steps, "beta": family.training.trades_beta}

    @property
    def gradient_evaluations(self) -> int:
        return self.num_steps + 2

    def adversarial_loss(self, model: nn.Module, x: Tensor, y: Tensor, eps: float) -> tuple[Tensor, Tensor]:
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
        return F.cross_entropy(logits.float(), y) + self.beta * robust, logits  # type: ignore[operator]


AT_METHODS = tuple(TRAINING_METHODS)


def _input_gradient(loss_of: Callable[[Tensor], Tensor], inputs: Tensor) -> Tensor:
    loss = loss_of(inputs)
    with native_cpu_backward(native_input_grad_pays(inputs)):
        (grad,) = torch.autograd.grad(loss, inputs)
    return grad


def training_method(name: str) -> type[AdversarialTraining]:
    """The registered method called ``name`` (a one-line error naming the choices otherwise)."""
    if name not in TRAINING_METHODS:
        raise DltestError(f"unknown adversarial training method {name!r}; choose one of {', '.join(TRAINING_METHODS)}")
    return TRAINING_METHODS[name]


def _attack_family(name: str) -> AttackFamily:
    """An image family by its name (grey, colour) or by a built-in dataset's name (its profile's)."""
    if name in FAMILIES:
        return FAMILIES[name]
    if name.lower() in PROFILES:
        return dataset_profile(name).attack
    raise DltestError(f"unknown image family {name!r}; choose one of {', '.join(FAMILIES)} or a dataset "
                      f"({', '.join(PROFILES)})")


def _refusal(cls: type[AdversarialTraining], option: str) -> DltestError:
    if option == "steps":
        return DltestError(f"{cls.name} is a single-step method and takes no steps")
    takers = [name for name, other in TRAINING_METHODS.items() if option in other.options()]
    return DltestError(f"{option} applies to {', '.join(takers)} only")


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
    """``method`` with the defaults of ``family``: an image family (grey: eps 0.3, colour: eps 8/255)
    or a built-in dataset whose profile gives it; settings given here override them.

    The defaults come from :mod:`dltest.profiles`: eps and PGD's steps from SPEC §2's training
    preset, the warm-up (3 epochs on grey images at eps 0.3, without which LeNet-5 collapses; none
    on colour images), TRADES' steps and beta from ``AttackFamily.training``. A setting the method
    does not take (steps of a single-step method, beta outside TRADES) is refused.
    """
    cls = training_method(method)
    attack = _attack_family(family)
    given = {k: v for k, v in {"alpha": alpha, "steps": steps, "beta": beta}.items() if v is not None}
    for option in given:
        if option not in cls.options():
            raise _refusal(cls, option)
    return cls(eps=eps if eps is not None else attack.eps,
               warmup_epochs=warmup_epochs if warmup_epochs is not None else attack.training.warmup_epochs,
               family=attack.name, **given)
