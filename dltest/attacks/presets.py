"""Adversarial attacks: SPEC §2's presets by dataset, built on torchattacks, and a lean PGD.

An attack is configured like torchattacks' classes: an :class:`AttackSpec` holds the settings
(``attack_preset("pgd", dataset="mnist", purpose="eval", steps=20)``), ``spec.build(model)``
gives an object called as ``atk(images, labels)`` (images in [0, 1], normalisation inside the
model), and ``spec.adversary()`` gives the ``(model, images, labels)`` callable that the trainer
takes.

Attacks (Linf unless said otherwise):

- ``pgd``: Madry et al.'s PGD with a random start. Evaluation runs torchattacks' ``PGD``;
  training runs :func:`pgd_linf`, a lean batched version that gives torchattacks' outputs
  (same arithmetic, same random start) without its per-call overhead, and that follows the
  trainer's mixed precision on CUDA.
- ``fgsm``: torchattacks' ``FGSM``.
- ``square``: torchattacks' ``Square`` (5000 queries, p_init 0.8, margin loss: the original's).
- ``autoattack``: the original *standard* AutoAttack: APGD-CE and APGD-T (9 target classes)
  with **100** steps, FAB-T (9 targets, 100 steps), Square (5000 queries), assembled from
  torchattacks' components. torchattacks' own ``AutoAttack`` runs **10** steps; that cheaper
  version is available by name as ``autoattack-fast`` (steps configurable), never silently.
- ``deepfool``: torchattacks' ``DeepFool`` (L2, 50 steps, overshoot 0.02; minimal perturbation,
  so it has no eps).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass, replace
from fractions import Fraction
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dltest.errors import DltestError

ATTACKS = ("pgd", "fgsm", "square", "autoattack", "autoattack-fast", "deepfool")
PURPOSES = ("train", "eval")
GREY_DATASETS = ("mnist", "fashion-mnist")
COLOUR_DATASETS = ("svhn", "cifar10")

# SPEC §2 / the paper's Table 4, keyed by (purpose, family). "grey": MNIST, Fashion-MNIST;
# "colour": SVHN, CIFAR-10 (the paper prints eps 0.3 for their training too, which cannot be
# meant for [0, 1] colour images; the authors' code used 8/255, 2/255, 7 steps).
EPS = {"grey": 0.3, "colour": 8 / 255}
PGD_PRESETS = {
    ("train", "grey"): {"eps": 0.3, "alpha": 0.01, "steps": 40},
    ("eval", "grey"): {"eps": 0.3, "alpha": 0.01, "steps": 50},
    ("train", "colour"): {"eps": 8 / 255, "alpha": 2 / 255, "steps": 7},
    ("eval", "colour"): {"eps": 8 / 255, "alpha": 2 / 255, "steps": 50},
}
SQUARE_QUERIES = 5000  # the original's (and torchattacks') default
AUTOATTACK_STEPS = 100  # the original standard AutoAttack's APGD / FAB iterations
AUTOATTACK_FAST_STEPS = 10  # torchattacks' AutoAttack default
DEEPFOOL_STEPS, DEEPFOOL_OVERSHOOT = 50, 0.02

# Attack = images in [0, 1] and labels -> adversarial images; Adversary also takes the model.
Attack = Callable[[Tensor, Tensor], Tensor]
Adversary = Callable[[nn.Module, Tensor, Tensor], Tensor]


def dataset_family(dataset: str | None, channels: int | None = None) -> str:
    """``grey`` (MNIST-like, eps 0.3) or ``colour`` (SVHN/CIFAR-like, eps 8/255).

    A dataset that is not built in goes by its channel count: 1 -> grey, else colour.
    """
    key = (dataset or "").lower()
    if key in GREY_DATASETS:
        return "grey"
    if key in COLOUR_DATASETS:
        return "colour"
    if channels is not None:
        return "grey" if channels == 1 else "colour"
    raise DltestError(
        f"no attack preset for dataset {dataset!r}; use one of {', '.join(GREY_DATASETS + COLOUR_DATASETS)} "
        "or give the input channels"
    )


def parse_eps(value: str | float | None) -> float | None:
    """``0.3``, ``"0.3"`` or ``"8/255"`` -> float, checked to lie in (0, 1]; None stays None."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = float(Fraction(value.strip()))
        except (ValueError, ZeroDivisionError):
            raise DltestError(f"eps must be a number or a fraction like 8/255, got {value!r}") from None
    eps = float(value)
    if not (0 < eps <= 1) or math.isnan(eps):
        raise DltestError(f"eps must be in (0, 1] (inputs are in [0, 1]), got {eps:g}")
    return eps


@dataclass(frozen=True)
class AttackSpec:
    """The settings of one attack; ``build(model)`` makes the callable attack.

    ``steps`` is PGD's / APGD's / FAB's / DeepFool's iteration count, ``alpha`` PGD's step size,
    ``queries`` Square's query budget, ``seed`` the seed of the attacks that take one (Square,
    APGD, FAB). ``note`` says how a preset relates to the paper or to the original attack.
    """

    name: str
    eps: float | None
    alpha: float | None = None
    steps: int | None = None
    random_start: bool | None = None
    queries: int | None = None
    overshoot: float | None = None
    norm: str = "Linf"
    purpose: str = "eval"
    family: str = "grey"
    seed: int = 0
    note: str = ""

    def __post_init__(self) -> None:
        check_attack_name(self.name)
        if self.eps is not None:
            parse_eps(self.eps)
        if self.steps is not None and (int(self.steps) != self.steps or self.steps < 1):
            raise DltestError(f"steps must be an integer >= 1, got {self.steps}")
        if self.alpha is not None and not self.alpha > 0:
            raise DltestError(f"alpha (step size) must be > 0, got {self.alpha:g}")
        if self.queries is not None and self.queries < 1:
            raise DltestError(f"queries must be >= 1, got {self.queries}")

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @property
    def label(self) -> str:
        """A short human description, e.g. ``pgd eps=0.3 alpha=0.01 steps=50``."""
        parts = [self.name]
        if self.eps is not None:
            parts.append(f"eps={_fmt(self.eps)}")
        if self.alpha is not None:
            parts.append(f"alpha={_fmt(self.alpha)}")
        if self.steps is not None:
            parts.append(f"steps={self.steps}")
        if self.queries is not None:
            parts.append(f"queries={self.queries}")
        return " ".join(parts)

    def build(self, model: nn.Module, num_classes: int = 10) -> Attack:
        """The attack on ``model``, called as ``atk(images, labels)``."""
        return _BUILDERS[self.name](self, model, num_classes)

    def adversary(self, num_classes: int = 10) -> Adversary:
        """A ``(model, images, labels) -> adversarial images`` callable for the trainer."""
        if self.name == "pgd":
            return PGDAdversary(self.eps, self.alpha, self.steps, bool(self.random_start))  # type: ignore[arg-type]
        return lambda model, x, y: self.build(model, num_classes)(x, y)


def check_attack_name(name: str) -> str:
    if name not in ATTACKS:
        raise DltestError(f"unknown attack {name!r}; choose one of {', '.join(ATTACKS)}")
    return name


def attack_preset(
    name: str,
    dataset: str | None = "mnist",
    purpose: str = "eval",
    *,
    channels: int | None = None,
    eps: float | str | None = None,
    alpha: float | None = None,
    steps: int | None = None,
    queries: int | None = None,
    seed: int = 0,
) -> AttackSpec:
    """SPEC §2's settings of attack ``name`` for ``dataset`` and ``purpose``, with overrides.

    ``purpose`` is ``train`` (PGD for adversarial training) or ``eval`` (robustness
    evaluation); it only changes PGD's steps. Overrides that an attack does not take raise an
    error, so a setting is never silently ignored. The standard ``autoattack`` takes only
    ``eps`` (its other settings are the original's); ``autoattack-fast`` also takes ``steps``
    and ``queries``.
    """
    check_attack_name(name)
    if purpose not in PURPOSES:
        raise DltestError(f"unknown attack purpose {purpose!r}; choose train or eval")
    family = dataset_family(dataset, channels)
    eps_value = parse_eps(eps) if eps is not None else EPS[family]
    given = {k for k, v in {"alpha": alpha, "steps": steps, "queries": queries}.items() if v is not None}
    takes = {
        "pgd": {"alpha", "steps"},
        "fgsm": set(),
        "square": {"queries"},
        "autoattack": set(),
        "autoattack-fast": {"steps", "queries"},
        "deepfool": {"steps"},
    }[name]
    extra = given - takes
    if extra:
        hint = "; use autoattack-fast for a configurable AutoAttack" if name == "autoattack" else ""
        raise DltestError(f"attack {name} does not take {', '.join(sorted(extra))}{hint}")
    if name == "deepfool" and eps is not None:
        raise DltestError("attack deepfool finds a minimal L2 perturbation and takes no eps")
    base = dict(purpose=purpose, family=family, seed=seed)
    if name == "pgd":
        preset = PGD_PRESETS[(purpose, family)]
        note = f"SPEC §2 PGD preset for {purpose} ({family} images)"
        if eps is not None and alpha is None:
            note += "; step size kept at the preset's"
        return AttackSpec("pgd", eps_value, alpha if alpha is not None else preset["alpha"],
                          steps if steps is not None else preset["steps"], random_start=True, note=note, **base)
    if name == "fgsm":
        return AttackSpec("fgsm", eps_value, note="single step of size eps", **base)
    if name == "square":
        return AttackSpec("square", eps_value, queries=queries if queries is not None else SQUARE_QUERIES,
                          note="p_init 0.8, margin loss, 1 restart (the original's settings)", **base)
    if name == "autoattack":
        return AttackSpec(
            "autoattack", eps_value, steps=AUTOATTACK_STEPS, queries=SQUARE_QUERIES,
            note="standard AutoAttack as in the original: APGD-CE, APGD-T (9 targets), FAB-T (9 targets) "
                 "with 100 steps, Square 5000 queries (torchattacks' AutoAttack defaults to 10 steps)",
            **base,
        )
    if name == "autoattack-fast":
        return AttackSpec(
            "autoattack-fast", eps_value, steps=steps if steps is not None else AUTOATTACK_FAST_STEPS, queries=queries if queries is not None else SQUARE_QUERIES,
            note="cheaper AutoAttack (torchattacks' default: 10 APGD/FAB steps); NOT the standard version",
            **base,
        )
    return AttackSpec("deepfool", None, steps=steps if steps is not None else DEEPFOOL_STEPS, overshoot=DEEPFOOL_OVERSHOOT, norm="L2",
                      note="minimal-perturbation attack: robust accuracy is near 0 by design", **base)


def parse_attack_list(text: str) -> list[str]:
    """``"pgd,square"`` -> ``["pgd", "square"]``, each name checked, duplicates refused."""
    names = [part.strip().lower() for part in text.split(",") if part.strip()]
    if not names:
        raise DltestError("no attack given; choose from " + ", ".join(ATTACKS))
    for name in names:
        check_attack_name(name)
    if len(set(names)) != len(names):
        raise DltestError(f"attack list {text!r} names an attack twice")
    return names


# --- the lean PGD ------------------------------------------------------------------------------


@contextlib.contextmanager
def native_cpu_backward(enabled: bool = True) -> Iterator[None]:
    """Within the block, CPU convolutions run PyTorch's native kernels instead of oneDNN's.

    oneDNN's backward-data kernel is slow for convolutions with few input channels (LeNet-5's
    first layer on grey images: 12 ms against 3.5 ms natively for a batch of 128, measured on
    the benchmark machine), and a PGD step needs exactly that gradient, which training never
    computes. Switching oneDNN off for the backward pass made a PGD step 1.6x faster there. For
    colour models it is the other way round (VGG8 and ResNet18 input gradients took 1.5-1.8x
    longer natively), hence :func:`native_input_grad_pays`.
    """
    getter = getattr(torch._C, "_get_mkldnn_enabled", None)
    setter = getattr(torch._C, "_set_mkldnn_enabled", None)
    if not enabled or getter is None or setter is None:
        yield
        return
    previous = getter()
    setter(False)
    try:
        yield
    finally:
        setter(previous)


def native_input_grad_pays(images: Tensor) -> bool:
    """Whether :func:`native_cpu_backward` speeds up input gradients: CPU tensors of 1-channel images."""
    return images.device.type == "cpu" and images.ndim == 4 and images.shape[1] == 1


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
    On the CPU, for grey images, the input gradient is computed under :func:`native_cpu_backward` unless
    ``native_backward=False`` (the kernels differ in rounding, so compare with torchattacks under
    the same setting).
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

    Puts the model in eval mode for the attack and restores its mode after.
    """

    def __init__(self, model: nn.Module, eps: float = 0.3, alpha: float = 0.01, steps: int = 40,
                 random_start: bool = True):
        self.model, self.eps, self.alpha, self.steps, self.random_start = model, eps, alpha, steps, random_start

    def __call__(self, images: Tensor, labels: Tensor) -> Tensor:
        training = self.model.training
        self.model.eval()
        try:
            return pgd_linf(self.model, images, labels, self.eps, self.alpha, self.steps, self.random_start)
        finally:
            if training:
                self.model.train()


@dataclass(frozen=True)
class PGDAdversary:
    """The trainer's adversary: ``adversary(model, images, labels)`` runs :func:`pgd_linf`."""

    eps: float
    alpha: float
    steps: int
    random_start: bool = True

    def __call__(self, model: nn.Module, images: Tensor, labels: Tensor) -> Tensor:
        return pgd_linf(model, images, labels, self.eps, self.alpha, self.steps, self.random_start)


def pgd_adversary(dataset: str = "mnist", purpose: str = "train", **overrides: Any) -> PGDAdversary:
    """The SPEC §2 PGD adversary for ``dataset`` (training preset unless ``purpose='eval'``)."""
    spec = attack_preset("pgd", dataset, purpose, **overrides)
    return spec.adversary()  # type: ignore[return-value]


# --- torchattacks builders ---------------------------------------------------------------------


def _torchattacks():
    import torchattacks

    return torchattacks


def _build_pgd(spec: AttackSpec, model: nn.Module, num_classes: int) -> Attack:
    return _torchattacks().PGD(model, eps=spec.eps, alpha=spec.alpha, steps=spec.steps,
                               random_start=bool(spec.random_start))


def _build_fgsm(spec: AttackSpec, model: nn.Module, num_classes: int) -> Attack:
    return _torchattacks().FGSM(model, eps=spec.eps)


def _build_square(spec: AttackSpec, model: nn.Module, num_classes: int) -> Attack:
    return _torchattacks().Square(model, norm="Linf", eps=spec.eps, n_queries=spec.queries, n_restarts=1,
                                  p_init=0.8, loss="margin", resc_schedule=True, seed=spec.seed)


def _build_autoattack(spec: AttackSpec, model: nn.Module, num_classes: int) -> Attack:
    """APGD-CE, APGD-T, FAB-T, Square in sequence, each on the inputs still robust."""
    ta = _torchattacks()
    if num_classes < 2:
        raise DltestError("AutoAttack needs a model with at least 2 classes")
    parts = [
        ta.APGD(model, norm="Linf", eps=spec.eps, steps=spec.steps, n_restarts=1, seed=spec.seed, loss="ce"),
        ta.APGDT(model, norm="Linf", eps=spec.eps, steps=spec.steps, n_restarts=1, seed=spec.seed,
                 n_classes=num_classes),
        ta.FAB(model, norm="Linf", eps=spec.eps, steps=spec.steps, n_restarts=1, seed=spec.seed,
               multi_targeted=True, n_classes=num_classes),
        ta.Square(model, norm="Linf", eps=spec.eps, n_queries=spec.queries, n_restarts=1, seed=spec.seed),
    ]
    return ta.MultiAttack(parts)


def _build_deepfool(spec: AttackSpec, model: nn.Module, num_classes: int) -> Attack:
    return _torchattacks().DeepFool(model, steps=spec.steps, overshoot=spec.overshoot)


_BUILDERS: dict[str, Callable[[AttackSpec, nn.Module, int], Attack]] = {
    "pgd": _build_pgd,
    "fgsm": _build_fgsm,
    "square": _build_square,
    "autoattack": _build_autoattack,
    "autoattack-fast": _build_autoattack,
    "deepfool": _build_deepfool,
}


def build_attack(name: str, model: nn.Module, dataset: str | None = "mnist", purpose: str = "eval",
                 num_classes: int = 10, **overrides: Any) -> Attack:
    """Shortcut: ``attack_preset(name, dataset, purpose, **overrides).build(model, num_classes)``."""
    return attack_preset(name, dataset, purpose, **overrides).build(model, num_classes)


def with_seed(spec: AttackSpec, seed: int) -> AttackSpec:
    return replace(spec, seed=seed)


def _fmt(value: float) -> str:
    frac = Fraction(value).limit_denominator(1000)
    if frac.denominator in (255, 1020) and abs(float(frac) - value) < 1e-9:
        return f"{frac.numerator}/{frac.denominator}"
    return f"{value:g}"
