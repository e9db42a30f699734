"""What dltest knows about each dataset, in one place: :class:`DatasetProfile`.

A profile holds the facts the paper (SPEC §2-§5) fixes per dataset: the architecture, the
normalisation baked into the model, the input shape and class count, the attack family with its
eps and PGD presets, the training augmentation, the Section-8 retraining epochs, the robust
active-learning schedule of SPEC §4 and the bundled pretrained model. Everything else looks
these up through :func:`dataset_profile`; user data (an ``.npz`` file, an image folder) gets a
generic profile chosen by its channel count.
"""

from __future__ import annotations

from dataclasses import dataclass

from dltest.errors import DltestError


@dataclass(frozen=True)
class PGDSettings:
    """One PGD preset: Linf radius, step size and number of steps."""

    eps: float
    alpha: float
    steps: int


@dataclass(frozen=True)
class OptimizerRecipe:
    """Optimizer, peak learning rate (of the one-cycle schedule) and weight decay of a run from scratch."""

    optimizer: str
    lr: float
    weight_decay: float


ADAM = OptimizerRecipe("adam", 5e-3, 0.0)
STANDARD_SGD = OptimizerRecipe("sgd", 0.05, 5e-4)  # standard training from scratch, every family


@dataclass(frozen=True)
class TrainingDefaults:
    """Adversarial training's defaults for a family of datasets, beyond its eps and PGD presets.

    ``warmup_epochs``: epochs over which eps ramps up from 0 (3 at MNIST's eps 0.3, where a fresh
    LeNet-5 trained at full strength collapses to a constant predictor; none at 8/255).
    ``trades``: TRADES' inner maximisation (its paper: 40 steps of 0.01 at eps 0.3 on MNIST,
    10 steps of 2/255 on CIFAR-10); ``trades_beta``: its trade-off (6 in both).
    ``optimizer``: adversarial training from scratch (grey images at eps 0.3: Adam at a one-cycle
    peak of 5e-3, Wong et al. 2020's MNIST recipe, as SGD at 0.05 collapsed to a constant model;
    colour images: SGD at 0.1, Rice et al. 2020); ``sgd_lr``: SGD's peak when SGD is asked for.
    """

    warmup_epochs: float
    trades: PGDSettings
    optimizer: str
    sgd_lr: float
    trades_beta: float = 6.0

    def recipe(self, adversarial: bool, optimizer: str | None = None) -> OptimizerRecipe:
        """The optimizer recipe of a run from scratch; ``optimizer`` (``sgd``/``adam``) overrides the family's."""
        chosen = optimizer or (self.optimizer if adversarial else STANDARD_SGD.optimizer)
        if chosen == "adam":
            return ADAM
        return OptimizerRecipe(chosen, self.sgd_lr if adversarial else STANDARD_SGD.lr, STANDARD_SGD.weight_decay)


@dataclass(frozen=True)
class AttackFamily:
    """The attack presets shared by a family of datasets (SPEC §2 / the paper's Table 4).

    ``grey``: MNIST-like images, eps 0.3. ``colour``: SVHN/CIFAR-like images, eps 8/255 (the
    paper prints 0.3 for their training too, which cannot be meant for [0, 1] colour images;
    the authors' code used 8/255, 2/255, 7 steps). ``training`` holds the other adversarial
    training defaults (the PGD method's inner attack is ``pgd_train``).
    """

    name: str
    eps: float
    pgd_train: PGDSettings
    pgd_eval: PGDSettings
    training: TrainingDefaults

    def pgd(self, purpose: str) -> PGDSettings:
        """The PGD preset for ``purpose`` (``train`` or ``eval``)."""
        if purpose == "train":
            return self.pgd_train
        if purpose == "eval":
            return self.pgd_eval
        raise DltestError(f"unknown attack purpose {purpose!r}; choose train or eval")


GREY = AttackFamily("grey", 0.3, PGDSettings(0.3, 0.01, 40), PGDSettings(0.3, 0.01, 50),
                    TrainingDefaults(warmup_epochs=3.0, trades=PGDSettings(0.3, 0.01, 40), optimizer="adam",
                                     sgd_lr=0.05))
COLOUR = AttackFamily("colour", 8 / 255, PGDSettings(8 / 255, 2 / 255, 7), PGDSettings(8 / 255, 2 / 255, 50),
                      TrainingDefaults(warmup_epochs=0.0, trades=PGDSettings(8 / 255, 2 / 255, 10),
                                       optimizer="sgd", sgd_lr=0.1))
FAMILIES = {f.name: f for f in (GREY, COLOUR)}


@dataclass(frozen=True)
class ALSchedule:
    """Robust active learning's labeling schedule (SPEC §4, Table 3)."""

    budget: int
    initial: int
    per_stage: int

    @property
    def stages(self) -> int:
        """Selection stages after the initial pool: (budget - initial) / per_stage."""
        return (self.budget - self.initial) // self.per_stage


@dataclass(frozen=True)
class DatasetProfile:
    """The per-dataset facts of SPEC §2-§5; ``builtin`` is False for a generic user-data profile.

    ``stage_attack`` is the attack robust active learning evaluates after every stage: SPEC §2's
    PGD-50, or ``apgd-square`` where PGD-50 was measured to overstate robustness far beyond the
    standard AutoAttack (Fashion-MNIST; docs/adversarial-training.md, "Per-stage attack").
    """

    name: str
    arch: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    input_shape: tuple[int, int, int] | None
    num_classes: int | None
    attack: AttackFamily
    augment: str = "none"  # "none", "crop" or "crop-flip": training only, never selection scores
    retrain_epochs: int = 10  # Section 8: 10 retraining epochs, 20 for SVHN
    schedule: ALSchedule | None = None
    pretrained: str | None = None  # file name of the bundled checkpoint (models/), if any
    pretrained_robust: str | None = None  # the bundled adversarially trained checkpoint, if any
    stage_attack: str = "pgd"  # robust active learning's per-stage evaluation attack (see below)
    builtin: bool = True

    @property
    def channels(self) -> int:
        return len(self.mean)


PROFILES: dict[str, DatasetProfile] = {
    p.name: p
    for p in (
        DatasetProfile("mnist", "lenet5", (0.1307,), (0.3081,), (1, 28, 28), 10, GREY,
                       schedule=ALSchedule(5000, 200, 200), pretrained="lenet5-mnist.pt",
                       pretrained_robust="lenet5-mnist-robust.pt"),
        DatasetProfile("fashion-mnist", "lenet5", (0.2860,), (0.3530,), (1, 28, 28), 10, GREY,
                       schedule=ALSchedule(6000, 200, 200), pretrained="lenet5-fashion-mnist.pt",
                       pretrained_robust="lenet5-fashion-mnist-robust.pt", stage_attack="apgd-square"),
        DatasetProfile("svhn", "vgg8", (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970), (3, 32, 32), 10, COLOUR,
                       augment="crop", retrain_epochs=20, schedule=ALSchedule(10000, 1000, 500)),
        DatasetProfile("cifar10", "resnet18", (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), (3, 32, 32), 10,
                       COLOUR, augment="crop-flip", schedule=ALSchedule(25000, 1000, 500)),
    )
}


def generic_profile(channels: int, name: str = "user data") -> DatasetProfile:
    """The profile of data that is not built in: LeNet-5 and the grey presets for one channel,
    ResNet18 and the colour presets otherwise; normalisation 0.5/0.5, no augmentation, no
    schedule (give the active-learning sizes explicitly)."""
    if int(channels) < 1:
        raise DltestError(f"channels must be >= 1, got {channels}")
    grey = int(channels) == 1
    return DatasetProfile(
        name, "lenet5" if grey else "resnet18", (0.5,) * int(channels), (0.5,) * int(channels),
        None, None, GREY if grey else COLOUR, builtin=False,
    )


def dataset_profile(name: str | None, channels: int | None = None) -> DatasetProfile:
    """The profile of built-in dataset ``name``; for any other name, the generic profile of
    ``channels`` (a one-line error when neither is known)."""
    key = (name or "").lower()
    if key in PROFILES:
        return PROFILES[key]
    if channels is None:
        raise DltestError(
            f"no profile for dataset {name!r}; use one of {', '.join(PROFILES)} or give the input channels"
        )
    return generic_profile(channels, name or "user data")
