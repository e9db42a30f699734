"""SPEC §2's attack presets, one registered :class:`Preset` per attack.

An attack is configured like torchattacks' classes: an :class:`AttackSpec` holds the settings
(``attack_preset("pgd", dataset="mnist", purpose="eval", steps=20)``), ``spec.build(model)``
gives an object called as ``atk(images, labels)`` (images in [0, 1], normalisation inside the
model), and ``spec.adversary()`` gives the ``(model, images, labels)`` callable that the trainer
takes.

Each preset is registered with ``@register`` and says, once, which options it takes beyond
``eps``; :func:`attack_preset`, the robustness evaluation and the CLI all ask the registry
(:func:`takes`). The eps and PGD numbers per dataset family live in :mod:`dltest.profiles`.

Attacks (Linf unless said otherwise):

- ``pgd``: Madry et al.'s PGD with a random start. Evaluation (``build``) runs torchattacks'
  ``PGD``, the independent reference the reported figures come from; training (``adversary()``)
  runs dltest's PGD, :class:`~dltest.attacks.kernels.PGDAdversary` on the lean batched
  :func:`~dltest.attacks.kernels.pgd_linf`, the same steps without torchattacks' per-call
  overhead (tests/test_attacks.py compares the two). The trainer's per-epoch check,
  :func:`pgd_check`, is the same PGD with fewer, larger steps.
- ``fgsm``: torchattacks' ``FGSM``.
- ``square``: torchattacks' ``Square`` (5000 queries, p_init 0.8, margin loss: the original's).
- ``autoattack``: the original *standard* AutoAttack: APGD-CE and APGD-T (9 target classes)
  with **100** steps, FAB-T (9 targets, 100 steps), Square (5000 queries), assembled from
  torchattacks' components. torchattacks' own ``AutoAttack`` runs **10** steps; that cheaper
  version is available by name as ``autoattack-fast`` (steps configurable), never silently.
- ``apgd-square``: APGD-CE (100 steps), then Square (1000 queries) on the inputs still robust,
  from torchattacks: robust active learning's per-stage attack where PGD-50 overstates
  robustness (the dataset profile's ``stage_attack``; docs/adversarial-training.md).
- ``deepfool``: DeepFool (L2, 50 steps, overshoot 0.02; minimal perturbation, so it has no eps),
  dltest's batched :class:`~dltest.attacks.kernels.DeepFoolL2`, the DeepFool that DFAL runs.
  torchattacks' ``DeepFool`` (overshoot per step) leaves about half of MNIST's inputs on a tied
  boundary, where they count as robust.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from fractions import Fraction
from typing import Any, Callable, ClassVar

from torch import Tensor, nn

from dltest.attacks.kernels import DeepFoolL2, PGDAdversary
from dltest.errors import DltestError
from dltest.profiles import AttackFamily, dataset_profile

PURPOSES = ("train", "eval")
OPTIONS = ("alpha", "steps", "queries")  # the overrides beyond eps that some attacks take
SQUARE_QUERIES = 5000  # the original's (and torchattacks') default
AUTOATTACK_STEPS = 100  # the original standard AutoAttack's APGD / FAB iterations
AUTOATTACK_FAST_STEPS = 10  # torchattacks' AutoAttack default
APGD_STEPS = 100  # as in standard AutoAttack
STAGE_SQUARE_QUERIES = 1000  # apgd-square: measured enough on the robust Fashion-MNIST LeNet (docs)
DEEPFOOL_STEPS, DEEPFOOL_OVERSHOOT = 50, 0.02

# Attack = images in [0, 1] and labels -> adversarial images; Adversary also takes the model.
Attack = Callable[[Tensor, Tensor], Tensor]
Adversary = Callable[[nn.Module, Tensor, Tensor], Tensor]


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
        return PRESETS[self.name].build(self, model, num_classes)

    def adversary(self, num_classes: int = 10) -> Adversary:
        """A ``(model, images, labels) -> adversarial images`` callable for the trainer."""
        if self.name == "pgd":
            return PGDAdversary(self.eps, self.alpha, self.steps, bool(self.random_start))  # type: ignore[arg-type]
        return lambda model, x, y: self.build(model, num_classes)(x, y)


# --- the registry ------------------------------------------------------------------------------


class Preset:
    """One attack: its ``name``, the ``options`` it takes beyond eps, its settings and builder.

    ``spec`` turns a dataset family, a purpose, an eps and the given options into an
    :class:`AttackSpec`; ``build`` turns that spec into the callable attack on a model.
    """

    name: ClassVar[str]
    options: ClassVar[tuple[str, ...]] = ()
    takes_eps: ClassVar[bool] = True
    seeded: ClassVar[bool] = True  # its outcome depends on the seed (a random start or a random search)
    hint: ClassVar[str] = ""  # appended when a refused option has a way through

    def spec(self, family: AttackFamily, purpose: str, eps: float, base: dict[str, Any], given_eps: bool = False,
             **options: Any) -> AttackSpec:
        """The :class:`AttackSpec` for ``family``/``purpose`` at ``eps`` with the given ``options``;
        ``base`` holds the fields every spec carries (purpose, family, seed)."""
        raise NotImplementedError

    def build(self, spec: AttackSpec, model: nn.Module, num_classes: int) -> Attack:
        raise NotImplementedError


PRESETS: dict[str, Preset] = {}


def register(cls: type[Preset]) -> type[Preset]:
    """Class decorator: make an attack preset available by its ``name``."""
    PRESETS[cls.name] = cls()
    return cls


def takes(name: str, option: str) -> bool:
    """Whether attack ``name`` takes ``option`` (``eps``, ``alpha``, ``steps`` or ``queries``)."""
    preset = PRESETS[check_attack_name(name)]
    return preset.takes_eps if option == "eps" else option in preset.options


def is_seeded(name: str) -> bool:
    """Whether attack ``name`` can give another outcome with another seed (FGSM and DeepFool cannot)."""
    return PRESETS[check_attack_name(name)].seeded


def _torchattacks():
    import torchattacks

    return torchattacks


@register
class PGD(Preset):
    name = "pgd"
    options = ("alpha", "steps")

    def spec(self, family, purpose, eps, base, given_eps=False, alpha=None, steps=None):
        preset = family.pgd(purpose)
        note = f"SPEC §2 PGD preset for {purpose} ({family.name} images)"
        if given_eps and alpha is None:
            note += "; step size kept at the preset's"
        return AttackSpec("pgd", eps, alpha if alpha is not None else preset.alpha,
                          steps if steps is not None else preset.steps, random_start=True, note=note, **base)

    def build(self, spec, model, num_classes):
        return _torchattacks().PGD(model, eps=spec.eps, alpha=spec.alpha, steps=spec.steps,
                                   random_start=bool(spec.random_start))


@register
class FGSM(Preset):
    name = "fgsm"
    seeded = False

    def spec(self, family, purpose, eps, base, given_eps=False):
        return AttackSpec("fgsm", eps, note="single step of size eps", **base)

    def build(self, spec, model, num_classes):
        return _torchattacks().FGSM(model, eps=spec.eps)


@register
class Square(Preset):
    name = "square"
    options = ("queries",)

    def spec(self, family, purpose, eps, base, given_eps=False, queries=None):
        return AttackSpec("square", eps, queries=queries if queries is not None else SQUARE_QUERIES,
                          note="p_init 0.8, margin loss, 1 restart (the original's settings)", **base)

    def build(self, spec, model, num_classes):
        return _torchattacks().Square(model, norm="Linf", eps=spec.eps, n_queries=spec.queries, n_restarts=1,
                                      p_init=0.8, loss="margin", resc_schedule=True, seed=spec.seed)


def _autoattack(spec: AttackSpec, model: nn.Module, num_classes: int) -> Attack:
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


@register
class AutoAttack(Preset):
    name = "autoattack"
    hint = "; use autoattack-fast for a configurable AutoAttack"

    def spec(self, family, purpose, eps, base, given_eps=False):
        return AttackSpec(
            "autoattack", eps, steps=AUTOATTACK_STEPS, queries=SQUARE_QUERIES,
            note="standard AutoAttack as in the original: APGD-CE, APGD-T (9 targets), FAB-T (9 targets) "
                 "with 100 steps, Square 5000 queries (torchattacks' AutoAttack defaults to 10 steps)",
            **base,
        )

    def build(self, spec, model, num_classes):
        return _autoattack(spec, model, num_classes)


@register
class AutoAttackFast(Preset):
    name = "autoattack-fast"
    options = ("steps", "queries")

    def spec(self, family, purpose, eps, base, given_eps=False, steps=None, queries=None):
        return AttackSpec(
            "autoattack-fast", eps, steps=steps if steps is not None else AUTOATTACK_FAST_STEPS,
            queries=queries if queries is not None else SQUARE_QUERIES,
            note="cheaper AutoAttack (torchattacks' default: 10 APGD/FAB steps); NOT the standard version",
            **base,
        )

    def build(self, spec, model, num_classes):
        return _autoattack(spec, model, num_classes)


@register
class DeepFool(Preset):
    name = "deepfool"
    options = ("steps",)
    takes_eps = False
    seeded = False

    def spec(self, family, purpose, eps, base, given_eps=False, steps=None):
        return AttackSpec("deepfool", None, steps=steps if steps is not None else DEEPFOOL_STEPS,
                          overshoot=DEEPFOOL_OVERSHOOT, norm="L2",
                          note="minimal-perturbation attack: robust accuracy is near 0 by design; dltest's "
                               "batched DeepFool, overshoot on the accumulated perturbation (SPEC §1)", **base)

    def build(self, spec, model, num_classes):
        return DeepFoolL2(model, steps=spec.steps, overshoot=spec.overshoot)


@register
class APGDSquare(Preset):
    name = "apgd-square"
    options = ("steps", "queries")

    def spec(self, family, purpose, eps, base, given_eps=False, steps=None, queries=None):
        return AttackSpec("apgd-square", eps, steps=steps if steps is not None else APGD_STEPS,
                          queries=queries if queries is not None else STAGE_SQUARE_QUERIES,
                          note="APGD-CE, then Square (margin loss) on the inputs still robust: AutoAttack's first "
                               "gradient attack and its black-box search, which finds what masked gradients hide; "
                               "NOT standard AutoAttack", **base)

    def build(self, spec, model, num_classes):
        ta = _torchattacks()
        return ta.MultiAttack([
            ta.APGD(model, norm="Linf", eps=spec.eps, steps=spec.steps, n_restarts=1, seed=spec.seed, loss="ce"),
            ta.Square(model, norm="Linf", eps=spec.eps, n_queries=spec.queries, n_restarts=1, seed=spec.seed),
        ])


ATTACKS = tuple(PRESETS)


# --- presets by name ---------------------------------------------------------------------------


def check_attack_name(name: str) -> str:
    if name not in PRESETS:
        raise DltestError(f"unknown attack {name!r}; choose one of {', '.join(PRESETS)}")
    return name


def check_attack_request(name: str, purpose: str = "eval", *, eps: float | str | None = None,
                         alpha: float | None = None, steps: int | None = None, queries: int | None = None) -> str:
    """What :func:`attack_preset` checks without a dataset, before anything is loaded (``dltest
    attack`` calls it first): the name, the purpose, eps, and overrides the attack takes."""
    preset = PRESETS[check_attack_name(name)]
    if purpose not in PURPOSES:
        raise DltestError(f"unknown attack purpose {purpose!r}; choose train or eval")
    if eps is not None:
        parse_eps(eps)
    given = {k for k, v in {"alpha": alpha, "steps": steps, "queries": queries}.items() if v is not None}
    extra = given - set(preset.options)
    if extra:
        raise DltestError(f"attack {name} does not take {', '.join(sorted(extra))}{preset.hint}")
    if eps is not None and not preset.takes_eps:
        raise DltestError(f"attack {name} finds a minimal L2 perturbation and takes no eps")
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
    evaluation); it only changes PGD's steps. A dataset that is not built in goes by its
    ``channels`` (1: the grey presets, else the colour ones). Overrides that an attack does not
    take raise an error, so a setting is never silently ignored. The standard ``autoattack``
    takes only ``eps`` (its other settings are the original's); ``autoattack-fast`` also takes
    ``steps`` and ``queries``.
    """
    preset = PRESETS[check_attack_request(name, purpose, eps=eps, alpha=alpha, steps=steps, queries=queries)]
    family = dataset_profile(dataset, channels).attack
    eps_value = parse_eps(eps) if eps is not None else family.eps
    given = {k: v for k, v in {"alpha": alpha, "steps": steps, "queries": queries}.items() if v is not None}
    base = {"purpose": purpose, "family": family.name, "seed": seed}
    return preset.spec(family, purpose, eps_value, base, given_eps=eps is not None, **given)


def parse_attack_list(text: str) -> list[str]:
    """``"pgd,square"`` -> ``["pgd", "square"]``, each name checked, duplicates refused."""
    names = [part.strip().lower() for part in text.split(",") if part.strip()]
    if not names:
        raise DltestError("no attack given; choose from " + ", ".join(PRESETS))
    for name in names:
        check_attack_name(name)
    if len(set(names)) != len(names):
        raise DltestError(f"attack list {text!r} names an attack twice")
    return names


def build_attack(name: str, model: nn.Module, dataset: str | None = "mnist", purpose: str = "eval",
                 num_classes: int = 10, **overrides: Any) -> Attack:
    """Shortcut: ``attack_preset(name, dataset, purpose, **overrides).build(model, num_classes)``."""
    return attack_preset(name, dataset, purpose, **overrides).build(model, num_classes)


def pgd_adversary(dataset: str = "mnist", purpose: str = "train", **overrides: Any) -> PGDAdversary:
    """The ``pgd`` preset's settings for ``dataset`` as dltest's PGD (training preset unless
    ``purpose='eval'``): ``attack_preset("pgd", dataset, purpose, **overrides).adversary()``."""
    spec = attack_preset("pgd", dataset, purpose, **overrides)
    return spec.adversary()  # type: ignore[return-value]


PGD_CHECK_STEPS = 10  # the trainer's default; robust-al's ``check_steps`` is 5
PGD_CHECK_STEP_RULE = 2.5  # Madry et al.'s step size: 2.5 eps / steps


def pgd_check(eps: float | None, steps: int = PGD_CHECK_STEPS) -> PGDAdversary | None:
    """The trainer's per-epoch robustness check: dltest's PGD with ``steps`` steps of 2.5 eps /
    steps (Madry et al.'s rule) from a random start; cheaper than the SPEC §2 presets (40 or 50
    steps of 0.01 at eps 0.3) because it runs after every epoch. None without an eps."""
    if eps is None:
        return None
    return PGDAdversary(eps=eps, alpha=PGD_CHECK_STEP_RULE * eps / steps, steps=steps)


def _fmt(value: float) -> str:
    frac = Fraction(value).limit_denominator(1000)
    if frac.denominator in (255, 1020) and abs(float(frac) - value) < 1e-9:
        return f"{frac.numerator}/{frac.denominator}"
    return f"{value:g}"
