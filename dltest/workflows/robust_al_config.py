"""The settings of a robust active-learning run and what it records: :class:`RobustALConfig`
(the paper's Table 3 schedule by :func:`preset`), one :class:`StageRecord` per (metric, stage),
and :class:`MetricState`, where a metric stands after its last finished stage."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

from dltest.adversarial_training import AT_METHODS, AdversarialTraining, adversarial_training
from dltest.attacks import parse_attack_list
from dltest.data import LabeledPool
from dltest.errors import DltestError
from dltest.profiles import PROFILES
from dltest.runtime import check_seed
from dltest.selectors import get_selector
from dltest.training import TrainConfig
from dltest.zoo import ARCHITECTURES


EVERY_METRIC_OPTIONS = ("sampling", "temperature")  # how each metric of a run draws its batch


def stage_count(budget: int, initial: int, per_stage: int) -> int:
    """Selection stages of a schedule after the initial model: ceil((budget - initial) / per_stage)."""
    return -(-(budget - initial) // per_stage)


@dataclass(frozen=True)
class RobustALConfig:
    """The settings of one robust active-learning run (every figure of the run follows from them).

    ``budget`` is the final labeled-pool size, ``initial`` the random initial pool, ``per_stage``
    how many inputs each stage labels. ``at`` is the adversarial-training method (``None``:
    standard active learning, the paper's Table 1), with ``at_steps`` inner steps of ``at_alpha``
    (default: the method's preset). ``eval_attacks`` are evaluated on the holdout inputs after
    every stage (default: the dataset profile's ``stage_attack``). ``epochs`` per stage, the best kept by
    robust accuracy on ``val_n`` validation inputs under a ``check_steps``-step PGD.
    ``train_size`` limits the unlabeled pool to a seeded subset of the training data. ``arch`` is
    a zoo name or the user's ``module:Class`` / ``file.py:Class``, built with ``arch_kwargs``
    (its forward must return logits). ``metric_options`` go to the metrics that take them (e.g.
    ``samples`` to bald), except ``sampling`` and ``temperature``, which apply to every metric of
    the run: each must rank scores, and is named with its sampling (``entropy+power``) in the
    log, the summary and the files.
    """

    dataset: str
    metrics: tuple[str, ...] = ("dre",)
    arch: str | None = None
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    budget: int = 5000
    initial: int = 200
    per_stage: int = 200
    epochs: int = 10
    initial_epochs: int = 30
    at: str | None = "pgd"
    eps: float | None = None
    at_steps: int | None = None
    at_alpha: float | None = None
    warmup_epochs: float | None = None
    optimizer: str = "adam"
    lr: float = 5e-3
    batch_size: int = 128
    eval_attacks: tuple[str, ...] | None = None
    final_attacks: tuple[str, ...] = ()
    eval_n: int | None = 1000
    val_n: int = 500
    check_steps: int = 5
    train_size: int | None = None
    seed: int = 0
    metric_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_seed(self.seed)
        if not self.metrics:
            raise DltestError("metrics is empty: name at least one acquisition metric")
        if len(set(self.metrics)) != len(self.metrics):
            raise DltestError(f"metrics {', '.join(self.metrics)} name a metric twice")
        for metric in self.metrics:
            get_selector(metric, **self.options_for(metric))
        for name, value in (("initial", self.initial), ("per_stage", self.per_stage), ("epochs", self.epochs),
                            ("initial_epochs", self.initial_epochs), ("val_n", self.val_n),
                            ("check_steps", self.check_steps), ("batch_size", self.batch_size)):
            if value < 1:
                raise DltestError(f"{name} must be >= 1, got {value}")
        if self.budget <= self.initial:
            raise DltestError(f"budget ({self.budget}) must exceed the initial labeled pool ({self.initial})")
        if self.at is not None and self.at not in AT_METHODS:
            raise DltestError(f"unknown adversarial training method {self.at!r}; choose one of "
                              f"{', '.join(AT_METHODS)} (or none for standard active learning)")
        if self.at is not None:  # the method's own checks (e.g. no steps for a single-step method)
            _method(self, "grey")
        if self.arch_kwargs and (self.arch is None or self.arch in ARCHITECTURES):
            raise DltestError("arch_kwargs apply to a module:Class architecture, not to a zoo model")
        if self.train_size is not None and self.train_size < 1:
            raise DltestError(f"train_size must be >= 1, got {self.train_size}")
        if self.eval_n is not None and self.eval_n < 1:
            raise DltestError(f"eval_n must be >= 1, got {self.eval_n}")
        if self.eval_attacks is None:
            object.__setattr__(self, "eval_attacks", (stage_attack(self.dataset),))
        parse_attack_list(",".join(self.eval_attacks))
        if self.final_attacks:
            parse_attack_list(",".join(self.final_attacks))
        TrainConfig(epochs=self.epochs, batch_size=self.batch_size, lr=self.lr, optimizer=self.optimizer)

    @property
    def stages(self) -> int:
        """Selection stages after the initial model: ceil((budget - initial) / per_stage)."""
        return stage_count(self.budget, self.initial, self.per_stage)

    def stage_size(self, stage: int) -> int:
        """Inputs labeled at ``stage`` (1-based): per_stage, the last stage takes the remainder."""
        return min(self.per_stage, self.budget - self.initial - (stage - 1) * self.per_stage)

    def options_for(self, metric: str) -> dict[str, Any]:
        """The selector options that apply to ``metric``: those its constructor takes (e.g.
        ``samples`` only to bald), and ``sampling`` / ``temperature``, which apply to every metric."""
        from dltest.selectors import REGISTRY

        cls = REGISTRY.get(metric)
        allowed = cls.option_defaults() if cls else {}
        return {k: v for k, v in self.metric_options.items() if k in allowed or k in EVERY_METRIC_OPTIONS}

    def label(self, metric: str) -> str:
        """``metric``'s name in the run's log, summary, state and model files: the metric's own
        name, with its sampling when it has one (``entropy+power``)."""
        return get_selector(metric, **self.options_for(metric)).label

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["metrics"], data["eval_attacks"] = list(self.metrics), list(self.eval_attacks)
        data["final_attacks"] = list(self.final_attacks)
        return data


def stage_attack(dataset: str) -> str:
    """The per-stage evaluation attack of ``dataset``: its profile's (``pgd`` for data that is not built in)."""
    profile = PROFILES.get(dataset.lower())
    return profile.stage_attack if profile is not None else "pgd"


def preset(dataset: str, **overrides: Any) -> RobustALConfig:
    """The paper's Table 3 schedule for ``dataset`` (its profile's), with ``overrides``; data that
    is not built in has no schedule, so ``budget``, ``initial`` and ``per_stage`` must be given."""
    schedule_keys = ("budget", "initial", "per_stage")
    values = {k: v for k, v in overrides.items() if v is not None or k not in schedule_keys}  # at=None: standard AL
    profile = PROFILES.get(dataset.lower())
    if profile is not None and profile.schedule is not None:
        schedule = profile.schedule
        values = {"budget": schedule.budget, "initial": schedule.initial, "per_stage": schedule.per_stage, **values}
    missing = [k for k in schedule_keys if k not in values]
    if missing:
        raise DltestError(f"{dataset} has no active-learning schedule of the paper's: give {', '.join(missing)}")
    return RobustALConfig(dataset=dataset, **values)


@dataclass
class StageRecord:
    """One line of the run log: a metric after one stage (stage 0: the initial model).

    ``metric`` is the metric's name in the run (:meth:`RobustALConfig.label`): ``entropy``, or
    ``entropy+power`` where the run samples its batches. ``selected`` are positions in the dataset's training split (``source_index``); ``attacks``
    names the attacks behind ``robust_accuracy`` with their settings (e.g.
    ``apgd-square eps=0.3 steps=100 queries=1000``).
    """

    metric: str
    seed: int
    stage: int
    labeled: int
    selected: list[int]
    clean_accuracy: float
    robust_accuracy: dict[str, float]
    bias: dict[str, float] | None
    seconds: dict[str, float]
    best_epoch: int | None = None
    stopped_early: str | None = None
    attacks: list[str] = field(default_factory=list)  # the settings of each robust_accuracy's attack



@dataclass
class MetricState:
    """Where a metric stands after its last finished stage: that stage's model, its labeled pool
    (positions in the training pool, with the data's labels) and its records from stage 0 on.
    ``metric`` is one of ``config.metrics`` (its records, files and seeds use its name in the run,
    :func:`_name`); the initial model's state has the metric "" and one record."""

    metric: str
    model: nn.Module
    pool: LabeledPool
    records: list[StageRecord]

    @property
    def stage(self) -> int:
        """The last finished stage (0: the initial model)."""
        return self.records[-1].stage


def _method(config: RobustALConfig, family: str) -> AdversarialTraining | None:
    if config.at is None:
        return None
    return adversarial_training(config.at, family, eps=config.eps, steps=config.at_steps, alpha=config.at_alpha,
                                warmup_epochs=config.warmup_epochs)


def _name(config: RobustALConfig, metric: str) -> str:
    """``metric``'s name in the run's records and files (``entropy+power`` with sampling; "" initial)."""
    return config.label(metric) if metric else ""
