"""Robustness evaluation: clean accuracy and robust accuracy per attack, RobustBench's rules.

Robust accuracy is the share of **all** evaluated inputs that are classified correctly and stay
so under the attack: inputs already misclassified count as not robust, and only the correctly
classified ones are attacked (as AutoAttack does). The model is evaluated in eval mode; a
model that was in train mode, or whose outputs change between two calls on the same inputs,
gets a warning (as AutoAttack's checks give), because attacks overestimate the robustness of
randomised models.

Each attack runs with torch's global generator seeded with ``seed`` at its start and restored
after, so an evaluation is reproducible and leaves the caller's random stream alone.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from dltest import __version__
from dltest.attacks import AttackSpec, attack_preset
from dltest.data import ImageDataset
from dltest.errors import DltestError
from dltest.inference import PROBE_SIZE, adapt
from dltest.progress import progress_bar
from dltest.settings import default_device


class RobustnessWarning(UserWarning):
    """A reason to distrust a robustness number (randomised model, train mode)."""


@dataclass
class AttackOutcome:
    """Robust accuracy under one attack."""

    attack: str
    settings: dict[str, Any]
    robust_accuracy: float
    robust_correct: int
    n: int
    seconds: float

    @property
    def label(self) -> str:
        return AttackSpec(**{k: v for k, v in self.settings.items()}).label


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
    batch_size: int = 256
    device: str = "cpu"
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0
    versions: dict[str, str] = field(default_factory=dict)

    def robust_accuracy(self, attack: str) -> float:
        for outcome in self.attacks:
            if outcome.attack == attack:
                return outcome.robust_accuracy
        raise KeyError(attack)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def seeded_subset(data: ImageDataset, n: int | None, seed: int) -> tuple[ImageDataset, list[int] | None]:
    """``n`` inputs of ``data`` drawn at random with ``seed`` (sorted), or all of them."""
    if n is None or n >= len(data):
        if n is not None and n < 1:
            raise DltestError(f"--n must be >= 1, got {n}")
        return data, None
    if n < 1:
        raise DltestError(f"--n must be >= 1, got {n}")
    pick = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:n].sort().values
    return data.subset(pick), pick.tolist()


def check_model(model: nn.Module, probe: Tensor) -> list[str]:
    """Put ``model`` in eval mode; return warnings: it was in train mode, it is randomised."""
    found = []
    if model.training:
        found.append("the model was in train mode; it is evaluated in eval mode (RobustBench's rule)")
    model.eval()
    with torch.no_grad():
        first, second = model(probe), model(probe)
    if not torch.allclose(first, second, rtol=1e-4, atol=1e-5):
        found.append(
            "the model's outputs change between two calls on the same inputs in eval mode (a randomised "
            "model?): gradient attacks overestimate its robustness; consider an EOT attack"
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
) -> RobustnessReport:
    """Clean and robust accuracy of ``model`` on ``data`` (or a seeded subset of ``n`` inputs).

    ``attacks`` are names (presets for ``dataset``, default ``data.name``, purpose ``eval``, with
    the overrides ``eps``, ``steps``, ``alpha``, ``queries``) or ready :class:`AttackSpec`\\ s.
    """
    started = time.perf_counter()
    device = default_device(device)
    specs = [
        a if isinstance(a, AttackSpec) else attack_preset(
            a, dataset or data.name, "eval", channels=data.input_shape[0], eps=eps,
            steps=steps if _takes(a, "steps") else None,
            alpha=alpha if _takes(a, "alpha") else None,
            queries=queries if _takes(a, "queries") else None, seed=seed,
        )
        for a in attacks
    ]
    for option, value in (("steps", steps), ("alpha", alpha), ("queries", queries)):
        if value is not None and not any(isinstance(a, str) and _takes(a, option) for a in attacks):
            names = ", ".join(a if isinstance(a, str) else a.name for a in attacks)
            raise DltestError(f"{option} applies to none of the attacks {names}")
    subset, indices = seeded_subset(data, n, seed)
    if len(subset) == 0:
        raise DltestError(f"{data.name}/{data.split} is empty: nothing to evaluate")
    was_training = model.training
    model = adapt(model.to(device), subset.images(slice(0, PROBE_SIZE), device))
    notes = check_model(model, subset.images(slice(0, min(len(subset), 16)), device))
    for note in notes:
        warnings.warn(note, RobustnessWarning, stacklevel=2)
    num_classes = data.num_classes
    try:
        correct_mask = _clean_correct(model, subset, batch_size, device)
        outcomes = []
        for spec in specs:
            outcomes.append(_robust(model, subset, correct_mask, spec, num_classes, batch_size, device, seed, progress))
    finally:
        if was_training:
            model.train()
    return RobustnessReport(
        dataset=data.name, split=data.split, n=len(subset), pool_size=len(data), seed=seed,
        clean_accuracy=int(correct_mask.sum()) / len(subset), clean_correct=int(correct_mask.sum()),
        attacks=outcomes, indices=indices, batch_size=batch_size, device=str(device), warnings=notes,
        seconds=round(time.perf_counter() - started, 3), versions=versions(),
    )


def versions() -> dict[str, str]:
    import torchattacks

    return {"dltest": __version__, "torch": str(torch.__version__), "torchattacks": str(torchattacks.__version__)}


def _takes(name: str, option: str) -> bool:
    return option in {
        "pgd": {"steps", "alpha"}, "autoattack-fast": {"steps", "queries"}, "square": {"queries"},
        "deepfool": {"steps"},
    }.get(name, set())


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
    robust = 0
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), progress_bar(spec.label, total=len(data), enabled=progress) as advance:
        torch.manual_seed(seed)
        for start in range(0, len(data), batch_size):
            stop = min(start + batch_size, len(data))
            keep = torch.nonzero(correct[start:stop]).flatten() + start
            if len(keep):
                x = data.images(keep, device)
                y = data.y[keep].to(device)
                adv = attack(x, y)
                model.eval()
                with torch.no_grad():
                    robust += int((model(adv).argmax(1) == y).sum())
            advance(stop - start)
    return AttackOutcome(
        attack=spec.name, settings=spec.to_dict(), robust_accuracy=robust / len(data), robust_correct=robust,
        n=len(data), seconds=round(time.perf_counter() - started, 3),
    )
