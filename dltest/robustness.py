"""Robustness evaluation: clean accuracy and robust accuracy per attack, RobustBench's rules.

Robust accuracy is the share of **all** evaluated inputs that are classified correctly and stay
so under the attack: inputs already misclassified count as not robust, and only the correctly
classified ones are attacked (as AutoAttack does). The model is evaluated in eval mode; a
model that was in train mode, or whose outputs change between two calls on the same inputs,
gets a warning (as AutoAttack's checks give), because attacks overestimate the robustness of
randomised models.

Each attack runs with torch's global generator seeded with ``seed`` at its start and restored
after, so an evaluation is reproducible and leaves the caller's random stream alone.

With two attacks or more the report has a worst-case row: an input counts as robust only if it
survives every attack (AutoAttack's rule). The report keeps, per input, whether it was correct
and whether it survived each attack, so that a later evaluation of another model on the same
inputs can be compared input by input (a paired test, see :mod:`dltest.analysis.intervals`).
A white-box attack that leaves clearly more inputs robust than Square, a black-box attack,
is a sign of gradient masking and gets a warning.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from dltest._version import __version__
from dltest.attacks import AttackSpec, attack_preset, check_attack_name, parse_eps, takes
from dltest.data import ImageDataset
from dltest.analysis.intervals import mcnemar_exact
from dltest.errors import DltestError
from dltest.adapter import prepared
from dltest.progress import progress_bar
from dltest.runtime import MAX_TORCH_SEED, check_seed, eval_mode, resolve_device, seeded


WORST_CASE = "worst-case"
# Attacks that need nothing but the model's outputs (they run on ONNX models too).
GRADIENT_FREE_ATTACKS = ("square",)
# Gradient masking: warn when Square leaves at least this much less robust than a white-box attack
# (and the difference is significant in the exact McNemar test at MASKING_P).
MASKING_GAP, MASKING_P = 0.02, 0.05
_WHITE_BOX_WITH_EPS = ("pgd", "fgsm")


class RobustnessWarning(UserWarning):
    """A reason to distrust a robustness number (randomised model, train mode, gradient masking)."""


@dataclass
class AttackOutcome:
    """Robust accuracy under one attack."""

    attack: str
    settings: dict[str, Any]
    robust_accuracy: float
    robust_correct: int
    n: int
    seconds: float
    robust_inputs: str = ""  # "1" where evaluated input i stays correct under the attack, else "0"

    @property
    def label(self) -> str:
        if self.attack == WORST_CASE:
            return f"{WORST_CASE} of {', '.join(self.settings.get('attacks', []))}"
        return AttackSpec(**{k: v for k, v in self.settings.items()}).label

    @property
    def flags(self) -> Tensor:
        """Per evaluated input: robust (True) or not, in evaluation order."""
        return flags_from_string(self.robust_inputs)


@dataclass
class RobustnessReport:
    """Clean accuracy and robust accuracy per attack on ``n`` inputs of ``dataset``/``split``."""

    dataset: str
    split: str
    n: int
    pool_size: int
    seed: int
    clean_accuracy: float
    clean_correct: int
    attacks: list[AttackOutcome] = field(default_factory=list)
    indices: list[int] | None = None  # pool positions evaluated, when a subset
    clean_inputs: str = ""  # "1" where evaluated input i is classified correctly, else "0"
    worst_case: AttackOutcome | None = None  # robust only if it survives every attack (2+ attacks)
    batch_size: int = 256
    device: str = "cpu"
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0
    versions: dict[str, str] = field(default_factory=dict)

    def robust_accuracy(self, attack: str) -> float:
        return self.outcome(attack).robust_accuracy

    def outcome(self, attack: str) -> AttackOutcome:
        """The outcome of ``attack``, or the worst-case row for ``"worst-case"``."""
        for outcome in self.attacks + ([self.worst_case] if self.worst_case else []):
            if outcome.attack == attack:
                return outcome
        raise KeyError(attack)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


RANDOMISED = (
    "the model's outputs change between two calls on the same inputs in eval mode (a randomised "
    "model?): gradient attacks overestimate its robustness; consider an EOT attack"
)


def flags_to_string(flags: Tensor) -> str:
    """Boolean flags -> a compact ``"0110..."`` string (one character per input, for JSON)."""
    return "".join("1" if f else "0" for f in flags.tolist())


def flags_from_string(text: str) -> Tensor:
    return torch.tensor([c == "1" for c in text], dtype=torch.bool)


def outputs_vary(model: nn.Module, probe: Tensor) -> bool:
    """True when two eval-mode calls on the same inputs give different outputs (a randomised model)."""
    with torch.no_grad():
        first, second = model(probe), model(probe)
    return not torch.allclose(first, second, rtol=1e-4, atol=1e-5)


def check_model(model: nn.Module, probe: Tensor, training: bool | None = None) -> list[str]:
    """Warnings about ``model``: it is (``training``: it was, before it was prepared) in train mode,
    it is randomised (its mode is left as it is)."""
    found = []
    if model.training if training is None else training:
        found.append("the model was in train mode; it is evaluated in eval mode (RobustBench's rule)")
    with eval_mode(model):
        varies = outputs_vary(model, probe)
    if varies:
        found.append(RANDOMISED)
    return found


def check_attacks_fit(model: nn.Module, names: Sequence[str]) -> None:
    """A model without gradients (an ONNX model) takes only the gradient-free attacks."""
    if getattr(model, "has_gradients", True):
        return
    bad = [name for name in names if name not in GRADIENT_FREE_ATTACKS]
    if bad:
        raise DltestError(
            f"{', '.join(bad)} needs the model's gradients, which an ONNX model does not give; "
            f"attacks that run on ONNX models: {', '.join(GRADIENT_FREE_ATTACKS)}"
        )


def worst_case(outcomes: Sequence[AttackOutcome]) -> AttackOutcome | None:
    """The row of inputs robust to every attack (None with fewer than two attacks)."""
    if len(outcomes) < 2:
        return None
    robust = torch.stack([o.flags for o in outcomes]).all(0)
    n = len(robust)
    return AttackOutcome(
        attack=WORST_CASE, settings={"attacks": [o.label for o in outcomes]},
        robust_accuracy=int(robust.sum()) / n, robust_correct=int(robust.sum()), n=n,
        seconds=round(sum(o.seconds for o in outcomes), 3), robust_inputs=flags_to_string(robust),
    )


def masking_warnings(outcomes: Sequence[AttackOutcome]) -> list[str]:
    """Warnings where a white-box attack (PGD, FGSM) leaves clearly more inputs robust than Square
    at the same eps: Square only queries outputs, so a gradient attack weaker than it suggests the
    gradients are masked and the white-box figure overstates robustness."""
    found = []
    squares = [o for o in outcomes if o.attack == "square"]
    for white in (o for o in outcomes if o.attack in _WHITE_BOX_WITH_EPS):
        for square in squares:
            if square.settings.get("eps") != white.settings.get("eps"):
                continue
            w, s = white.flags, square.flags
            only_square_breaks, only_white_breaks = int((w & ~s).sum()), int((s & ~w).sum())
            test = mcnemar_exact(only_square_breaks, only_white_breaks, len(w))
            if test.drop >= MASKING_GAP and test.p_value < MASKING_P:
                found.append(
                    f"{white.attack} (white-box) leaves {100 * white.robust_accuracy:.1f}% robust but square "
                    f"(black-box) only {100 * square.robust_accuracy:.1f}%: square breaks {only_square_breaks} "
                    f"inputs that {white.attack} leaves robust (exact McNemar p={test.p_value:.2g}); the "
                    f"gradients may be masked, so {white.attack}'s figure overstates robustness"
                )
    return found


def evaluate_robustness(
    model: nn.Module,
    data: ImageDataset,
    attacks: Sequence[str | AttackSpec] = ("pgd",),
    *,
    n: int | None = None,
    seed: int = 0,
    batch_size: int = 256,
    device: str | torch.device | None = None,
    progress: bool = False,
    dataset: str | None = None,
    eps: float | str | None = None,
    steps: int | None = None,
    alpha: float | None = None,
    queries: int | None = None,
    indices: Sequence[int] | None = None,
    refuse_randomised: bool = False,
) -> RobustnessReport:
    """Clean and robust accuracy of ``model`` on ``data`` (or a seeded subset of ``n`` inputs).

    ``attacks`` are names (presets for ``dataset``, default ``data.name``, purpose ``eval``, with
    the overrides ``eps``, ``steps``, ``alpha``, ``queries``) or ready :class:`AttackSpec`\\ s.
    ``indices`` evaluates exactly those pool positions instead (e.g. a baseline report's, so that
    two models are compared on the same inputs). ``refuse_randomised`` turns the warning about a
    model whose outputs change between calls into an error.
    """
    started = time.perf_counter()
    check_evaluation(attacks, n=n, seed=seed, device=device, eps=eps, steps=steps, alpha=alpha, queries=queries)
    device = resolve_device(device)
    data.require_labels("evaluate_robustness (clean and robust accuracy)")
    specs = attack_specs(attacks, dataset or data.name, data.input_shape[0], eps=eps, steps=steps, alpha=alpha,
                         queries=queries, seed=seed)
    check_attacks_fit(model, [spec.name for spec in specs])
    if indices is not None:
        subset, indices = given_subset(data, indices), [int(i) for i in indices]
    else:
        positions = data.sample_positions(n, seed)
        subset = data if positions is None else data.subset(positions)
        indices = None if positions is None else positions.tolist()
    if len(subset) == 0:
        raise DltestError(f"{data.name}/{data.split} is empty: nothing to evaluate")
    num_classes = data.num_classes
    was_training = model.training
    with prepared(model, subset, device) as model:  # outside models: logits for every attack
        notes = check_model(model, subset.images(slice(0, min(len(subset), 16)), device), training=was_training)
        if refuse_randomised and RANDOMISED in notes:
            raise DltestError(
                "the model's outputs change between two calls on the same inputs in eval mode (randomised at "
                "eval time): attacks overestimate its robustness; pass --allow-randomised to evaluate it anyway"
            )
        for note in notes:
            warnings.warn(note, RobustnessWarning, stacklevel=2)
        correct_mask = _clean_correct(model, subset, batch_size, device)
        outcomes = [_robust(model, subset, correct_mask, spec, num_classes, batch_size, device, seed, progress)
                    for spec in specs]
    masking = masking_warnings(outcomes)
    for note in masking:
        warnings.warn(note, RobustnessWarning, stacklevel=2)
    return RobustnessReport(
        dataset=data.name, split=data.split, n=len(subset), pool_size=len(data), seed=seed,
        clean_accuracy=int(correct_mask.sum()) / len(subset), clean_correct=int(correct_mask.sum()),
        attacks=outcomes, indices=indices, clean_inputs=flags_to_string(correct_mask),
        worst_case=worst_case(outcomes), batch_size=batch_size, device=str(device), warnings=notes + masking,
        seconds=round(time.perf_counter() - started, 3), versions=versions(),
    )


def attack_specs(
    attacks: Sequence[str | AttackSpec], dataset: str | None, channels: int | None = None, *,
    eps: float | str | None = None, steps: int | None = None, alpha: float | None = None,
    queries: int | None = None, seed: int = 0,
) -> list[AttackSpec]:
    """The evaluation presets of the named attacks for ``dataset`` with the overrides that apply
    to each (ready :class:`AttackSpec` s pass unchanged); an override that applies to none fails."""
    check_overrides(attacks, steps=steps, alpha=alpha, queries=queries)
    specs = [
        a if isinstance(a, AttackSpec) else attack_preset(
            a, dataset, "eval", channels=channels, eps=eps,
            steps=steps if takes(a, "steps") else None,
            alpha=alpha if takes(a, "alpha") else None,
            queries=queries if takes(a, "queries") else None, seed=seed,
        )
        for a in attacks
    ]
    return specs


def check_overrides(attacks: Sequence[str | AttackSpec], *, steps: int | None = None, alpha: float | None = None,
                    queries: int | None = None) -> None:
    """Every attack name known, and every override taken by at least one of the named attacks."""
    for a in attacks:
        if isinstance(a, str):
            check_attack_name(a)
    for option, value in (("steps", steps), ("alpha", alpha), ("queries", queries)):
        if value is not None and not any(isinstance(a, str) and takes(a, option) for a in attacks):
            names = ", ".join(a if isinstance(a, str) else a.name for a in attacks) or "(no attack named)"
            raise DltestError(f"{option} applies to none of the attacks {names}", param=option)


def check_evaluation(attacks: Sequence[str | AttackSpec], *, n: int | None = None, seed: int = 0,
                     device: str | torch.device | None = None, eps: float | str | None = None,
                     steps: int | None = None, alpha: float | None = None, queries: int | None = None) -> None:
    """The arguments of :func:`evaluate_robustness` that need no data, checked before anything is
    loaded or run (``dltest evaluate`` calls it first): attack names and overrides, eps, the
    count, the seed and the device."""
    check_seed(seed, maximum=MAX_TORCH_SEED)
    resolve_device(device)
    check_overrides(attacks, steps=steps, alpha=alpha, queries=queries)
    parse_eps(eps)
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise DltestError(f"n must be an integer >= 1, got {n!r}", param="n")


def given_subset(data: ImageDataset, indices: Sequence[int]) -> ImageDataset:
    """The pool positions ``indices`` of ``data``, checked to be distinct and in range."""
    positions = torch.as_tensor(list(indices), dtype=torch.long)
    if len(positions) == 0:
        raise DltestError("no inputs to evaluate: the list of positions is empty")
    if int(positions.min()) < 0 or int(positions.max()) >= len(data):
        raise DltestError(f"input positions must lie in [0, {len(data)}) for {data.name}/{data.split}")
    if len(torch.unique(positions)) != len(positions):
        raise DltestError("input positions must be distinct")
    return data.subset(positions)


def versions() -> dict[str, str]:
    import torchattacks

    return {"dltest": __version__, "torch": str(torch.__version__), "torchattacks": str(torchattacks.__version__)}


@torch.no_grad()
def _clean_correct(model: nn.Module, data: ImageDataset, batch_size: int, device: torch.device) -> Tensor:
    flags = []
    for x, y in data.batches(batch_size, device):
        flags.append((model(x).argmax(1) == y).cpu())
    return torch.cat(flags)


def _robust(
    model: nn.Module, data: ImageDataset, correct: Tensor, spec: AttackSpec, num_classes: int,
    batch_size: int, device: torch.device, seed: int, progress: bool,
) -> AttackOutcome:
    """Attack the correctly classified inputs batch by batch; count those still correct."""
    started = time.perf_counter()
    attack = spec.build(model, num_classes)
    flags = torch.zeros(len(data), dtype=torch.bool)
    with seeded(seed, device), progress_bar(spec.label, total=len(data), enabled=progress) as advance:
        for start in range(0, len(data), batch_size):
            stop = min(start + batch_size, len(data))
            keep = torch.nonzero(correct[start:stop]).flatten() + start
            if len(keep):
                x = data.images(keep, device)
                y = data.y[keep].to(device)
                adv = attack(x, y)
                with torch.no_grad():
                    flags[keep] = (model(adv).argmax(1) == y).cpu()
            advance(stop - start)
    robust = int(flags.sum())
    return AttackOutcome(
        attack=spec.name, settings=spec.to_dict(), robust_accuracy=robust / len(data), robust_correct=robust,
        n=len(data), seconds=round(time.perf_counter() - started, 3), robust_inputs=flags_to_string(flags),
    )
