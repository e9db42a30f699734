"""Robust active learning (the paper's Algorithm 1, SPEC §4): budgeted training from scratch.

initial random labeled pool -> standard training (the initial model, shared by every metric of
a seed) -> per stage: one inference pass over the unlabeled pool -> ``select`` with the metric
-> the dataset's labels play the oracle -> adversarial training on the labeled pool, warm-started
from the previous stage's best epoch -> clean and robust accuracy on the holdout half.

Everything lives in a run folder, rewritten atomically after every stage::

    config.json    the settings (a resumed run must match them)
    log.jsonl      one record per (metric, stage): labeled size, selected indices, accuracy,
                   robust accuracy per attack, the selection's bias (SPEC §6), seconds spent
    state/         the initial model, and per metric the latest stage's model, labeled pool (a
                   LabeledPool: positions and their labels) and records, written and read with
                   dltest.resume (format 2; the format-1 files of dltest before issue 19 still resume);
                   <metric>.final.json  the final attacks on its last model, run as soon as the
                   metric's last stage is done (a resume reuses them while the state matches)
    summary.json   the last stage of every metric;  <metric>.pt  its final model
    figure.png     accuracy and robustness per stage, one line per metric (the paper's Figure 2)

A run killed at any moment continues with ``resume=True`` from the last finished stage and
ends with the selections and figures of an uninterrupted run: every random draw is seeded by
(seed, metric, stage), never by what ran before.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import time
import warnings
import zlib
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from dltest.header import output_header
from dltest.adapter import check_fits
from dltest.adversarial_training import AT_METHODS, AdversarialTraining, adversarial_training
from dltest.analysis.bias import selection_bias
from dltest.analysis.plots import accuracy_by_stage
from dltest.attacks import attack_preset, parse_attack_list, pgd_check
from dltest.checkpoint import save_checkpoint, state_digest
from dltest.data import ImageDataset, LabeledPool
from dltest.errors import DltestError, first_line
from dltest.inference import infer
from dltest.io import atomic_path, parse_json_text, read_json, write_json
from dltest.resume import EDITED, ResumeState, Wording
from dltest.profiles import PROFILES, dataset_profile
from dltest.robustness import evaluate_robustness
from dltest.runtime import check_seed, resolve_device, seeded
from dltest.selection import select
from dltest.selectors import get_selector
from dltest.training import Adversary, TrainConfig, train
from dltest.zoo import ARCHITECTURES, default_arch, model_for_dataset, resolve_arch

CONFIG_FILE, LOG_FILE, SUMMARY_FILE, FIGURE_FILE = "config.json", "log.jsonl", "summary.json", "figure.png"
EVERY_METRIC_OPTIONS = ("sampling", "temperature")  # how each metric of a run draws its batch


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
        return -(-(self.budget - self.initial) // self.per_stage)

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
class RobustALResult:
    """Every metric's stage records, the final models, and where the run folder is."""

    config: RobustALConfig
    records: dict[str, list[StageRecord]]
    models: dict[str, nn.Module]
    run_dir: Path | None
    final_attacks: dict[str, dict[str, float]] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        final = {}
        for metric, records in self.records.items():
            last = records[-1]
            final[metric] = {"labeled": last.labeled, "stage": last.stage, "clean_accuracy": last.clean_accuracy,
                             "robust_accuracy": {**last.robust_accuracy, **self.final_attacks.get(metric, {})}}
        return {**output_header("robust-al", self.config.seed), "config": self.config.to_dict(), "final": final,
                "seconds": {m: _total_seconds(r) for m, r in self.records.items()}}


def robust_active_learning(
    config: RobustALConfig,
    *,
    train_data: ImageDataset,
    val_data: ImageDataset,
    holdout: ImageDataset,
    run_dir: str | os.PathLike | None = None,
    resume: bool = False,
    model_factory: Callable[[], nn.Module] | None = None,
    device: str | torch.device | None = None,
    on_stage: Callable[[StageRecord], None] | None = None,
    on_start: Callable[[], None] | None = None,
    progress: bool = False,
) -> RobustALResult:
    """Run robust (or, with ``config.at=None``, standard) active learning for every metric.

    ``train_data`` is the unlabeled pool whose labels play the oracle; ``val_data`` picks each
    stage's best epoch; ``holdout`` is only for the reported figures. ``model_factory`` builds
    the untrained model (default: the dataset's zoo architecture, or ``config.arch``).
    ``on_stage`` is called with each finished record (live views); ``on_start`` once every setting,
    the run folder and its saved state are checked, before the first training.
    """
    device = resolve_device(device)
    if config.train_size is not None:
        train_data = train_data.sample(config.train_size, _seed(config.seed, "pool", 0))
    _check_data(config, train_data, val_data, holdout)
    folder = Path(run_dir) if run_dir is not None else None
    factory = model_factory or _zoo_or_user_model(config, train_data)
    _check_model_fits(factory, train_data)
    saved: dict[str, MetricState] = {}
    if folder is not None:
        _prepare_folder(folder, config, resume)
        saved = _load_saved_states(folder, config, factory, train_data.y)  # all checked before any work
    profile = dataset_profile(train_data.name, train_data.input_shape[0])
    method = _method(config, profile.attack.name)
    val = val_data.sample(config.val_n, config.seed)
    check = pgd_check(method.eps, steps=config.check_steps) if method else None
    eval_specs = [attack_preset(a, train_data.name, "eval", channels=train_data.input_shape[0], eps=config.eps,
                                seed=config.seed) for a in config.eval_attacks]

    def evaluate(model: nn.Module, attacks=eval_specs) -> tuple[float, dict[str, float], list[str]]:
        """Clean accuracy, robust accuracy per attack name, and each attack with its settings."""
        report = evaluate_robustness(model, holdout, attacks, n=config.eval_n, seed=config.seed, device=device)
        return (report.clean_accuracy, {o.attack: o.robust_accuracy for o in report.attacks},
                [o.label for o in report.attacks])

    final_specs = [attack_preset(a, train_data.name, "eval", channels=train_data.input_shape[0], eps=config.eps,
                                 seed=config.seed) for a in config.final_attacks]
    data = StageData(train_data, val)
    runtime = StageRuntime(method, check, evaluate, profile.augment, device, progress)
    if on_start:
        on_start()
    initial = _on_device(saved[""], device) if "" in saved else _initial(config, factory, data, runtime, folder)
    records: dict[str, list[StageRecord]] = {}
    models: dict[str, nn.Module] = {}
    final_attacks: dict[str, dict[str, float]] = {}
    for metric in config.metrics:
        name = _name(config, metric)
        state = _on_device(saved[metric], device) if metric in saved else _start(initial, config, metric)
        if metric not in saved and on_stage:
            on_stage(state.records[0])
        while state.stage < config.stages:
            state = _stage(config, state, data, runtime)
            if folder is not None:
                _write_state(_state_path(folder, name), config, state)
                _write_log(folder, config, records | {name: state.records})
            if on_stage:
                on_stage(state.records[-1])
        records[name], models[name] = state.records, state.model
        if final_specs:  # per metric, as soon as it is done, kept in the run folder: a resume never repeats it
            final_attacks[name] = _final_attacks(folder, config, state, lambda m: evaluate(m, final_specs)[1])
    result = RobustALResult(config, records, models, folder, final_attacks)
    if folder is not None:
        _finish(folder, result, train_data)
    return result


# --- stages ------------------------------------------------------------------------------------


def _method(config: RobustALConfig, family: str) -> AdversarialTraining | None:
    if config.at is None:
        return None
    return adversarial_training(config.at, family, eps=config.eps, steps=config.at_steps, alpha=config.at_alpha,
                                warmup_epochs=config.warmup_epochs)


def _train_config(config: RobustALConfig, stage: int, augment: str, epochs: int | None = None) -> TrainConfig:
    return TrainConfig(epochs=epochs or config.epochs, batch_size=config.batch_size, lr=config.lr,
                       optimizer=config.optimizer, seed=_seed(config.seed, "train", stage), augment=augment)


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


@dataclass(frozen=True)
class StageData:
    """The data every stage reads: the training pool (its labels play the oracle) and the
    validation inputs that pick each stage's best epoch."""

    train: ImageDataset
    val: ImageDataset


@dataclass(frozen=True)
class StageRuntime:
    """What every stage runs with: the adversarial-training method (None: standard training) and
    its per-epoch robustness check, the holdout evaluation, augmentation, device, progress bars."""

    method: AdversarialTraining | None
    check: Adversary | None
    evaluate: Callable[[nn.Module], tuple[float, dict[str, float], list[str]]]
    augment: str
    device: torch.device
    progress: bool


def _initial(config: RobustALConfig, factory: Callable[[], nn.Module], data: StageData, runtime: StageRuntime,
             folder: Path | None) -> MetricState:
    """The initial model: standard training on a seeded random pool; stored once per run."""
    started = time.perf_counter()
    generator = torch.Generator().manual_seed(_seed(config.seed, "initial", 0))
    positions = torch.randperm(len(data.train), generator=generator)[: config.initial]
    pool = LabeledPool(len(data.train))
    pool.label(positions, data.train.y[positions])
    with seeded(_seed(config.seed, "init", 0)):
        model = factory()
    result = train(model, data.train.subset(pool.labeled()), data.val,
                   _train_config(config, 0, runtime.augment, config.initial_epochs), device=runtime.device,
                   progress=runtime.progress)
    trained = time.perf_counter()
    clean, robust, attacks = runtime.evaluate(result.model)
    record = StageRecord(metric="", seed=config.seed, stage=0, labeled=len(pool), selected=[],
                         clean_accuracy=clean, robust_accuracy=robust, bias=None, attacks=attacks,
                         seconds={"select": 0.0, "train": round(trained - started, 3),
                                  "evaluate": round(time.perf_counter() - trained, 3)},
                         best_epoch=result.best_epoch, stopped_early=result.stopped_early)
    state = MetricState("", result.model, pool, [record])
    if folder is not None:
        _write_state(_state_path(folder, ""), config, state)
    return state


def _name(config: RobustALConfig, metric: str) -> str:
    """``metric``'s name in the run's records and files (``entropy+power`` with sampling; "" initial)."""
    return config.label(metric) if metric else ""


def _start(initial: MetricState, config: RobustALConfig, metric: str) -> MetricState:
    """A metric's stage 0: a copy of the initial model and pool, the initial record under its name."""
    return MetricState(metric, copy.deepcopy(initial.model), copy.deepcopy(initial.pool),
                       [replace(initial.records[0], metric=_name(config, metric))])


def _stage(config: RobustALConfig, state: MetricState, data: StageData, runtime: StageRuntime) -> MetricState:
    """The metric's next stage: select ``stage_size`` unlabeled inputs with it, label them, train on
    the labeled pool (warm-started from the last stage's model), evaluate. ``state`` is left as it was."""
    metric, stage, model, pool = state.metric, state.stage + 1, state.model, copy.deepcopy(state.pool)
    device, progress = runtime.device, runtime.progress
    started = time.perf_counter()
    name = _name(config, metric)
    outputs = infer(model, data.train, device=device)
    selection = select(metric, config.stage_size(stage), model=model, data=data.train, outputs=outputs,
                       labeled=pool.labeled(), seed=_seed(config.seed, name, stage), device=device,
                       **config.options_for(metric))
    chosen = torch.tensor(selection.indices, dtype=torch.long)
    candidates = pool.unlabeled()
    bias = selection_bias(outputs.probs[candidates], data.train.y[candidates],
                          torch.searchsorted(candidates, chosen))
    pool.label(chosen, data.train.y[chosen])  # the dataset's labels play the oracle
    labeled = data.train.subset(pool.labeled())
    selected_at = time.perf_counter()

    method = runtime.method
    stage_method = method
    if method is not None and stage > 1:
        stage_method = replace(method, warmup_epochs=0.0)  # warm-started from a robust model: no ramp
    train_config = _train_config(config, stage, runtime.augment)
    result = train(copy.deepcopy(model), labeled, data.val, train_config, adversary=stage_method,
                   val_adversary=runtime.check, device=device, progress=progress)
    if result.best_epoch < 0 and stage_method is not method:
        # every epoch collapsed to near-constant predictions at full eps: train the stage again from the same
        # weights with the first stage's eps ramp; without it the kept weights collapse again at every stage
        result = train(copy.deepcopy(model), labeled, data.val, train_config, adversary=method,
                       val_adversary=runtime.check, device=device, progress=progress)
        result.stopped_early = "every epoch collapsed at full eps; trained again with the eps warm-up" + (
            f" ({result.stopped_early})" if result.stopped_early else "")
    trained_at = time.perf_counter()
    clean, robust, attacks = runtime.evaluate(result.model)
    record = StageRecord(
        metric=name, seed=config.seed, stage=stage, labeled=len(pool),
        selected=data.train.source_index[chosen].tolist(),
        clean_accuracy=clean, robust_accuracy=robust, bias=bias, attacks=attacks,
        seconds={"select": round(selected_at - started, 3), "train": round(trained_at - selected_at, 3),
                 "evaluate": round(time.perf_counter() - trained_at, 3)},
        best_epoch=result.best_epoch, stopped_early=result.stopped_early,
    )
    return MetricState(metric, result.model, pool, [*state.records, record])


def _seed(seed: int, purpose: str, stage: int) -> int:
    """A seed per (run seed, purpose or metric, stage), the same whatever ran before."""
    return (seed * 1_000_003 + zlib.crc32(purpose.encode()) * 1009 + stage) % (2**63 - 1)


def _zoo_or_user_model(config: RobustALConfig, data: ImageDataset) -> Callable[[], nn.Module]:
    """A builder of the untrained model: the zoo's (the dataset's architecture by default) or the
    user's ``module:Class``."""
    arch = config.arch or default_arch(data.name, data.input_shape)
    if arch in ARCHITECTURES:
        return lambda: model_for_dataset(data.name, arch, data.num_classes, data.input_shape)
    build = resolve_arch(arch)
    return lambda: build(**config.arch_kwargs)


def _check_model_fits(factory: Callable[[], nn.Module], data: ImageDataset) -> None:
    """The untrained model takes the data and scores its classes, checked as every command checks a model."""
    with seeded(0):
        try:
            model = factory()  # a zoo model probes its input size while it is built
        except DltestError:
            raise
        except Exception as exc:
            raise DltestError(f"the model cannot take {data.name} inputs of shape {tuple(data.input_shape)} "
                              f"({first_line(exc)})") from None
        check_fits(model, data)


def _check_data(config: RobustALConfig, train_data, val_data, holdout) -> None:
    if config.budget > len(train_data):
        raise DltestError(f"budget ({config.budget}) exceeds the training pool of {len(train_data)} inputs")
    if not (train_data.name == val_data.name == holdout.name):
        raise DltestError(f"train, val and holdout data must be one dataset, got {train_data.name}, "
                          f"{val_data.name}, {holdout.name}")


# --- the run folder ----------------------------------------------------------------------------


def _prepare_folder(folder: Path, config: RobustALConfig, resume: bool) -> None:
    config_path = folder / CONFIG_FILE
    wanted = {**output_header("robust-al", config.seed), **config.to_dict()}  # a resume compares keys, not order
    if folder.exists() and not folder.is_dir():
        raise DltestError(f"run folder {folder} is a file")
    if config_path.is_file():
        if not resume:
            raise DltestError(f"{folder} already holds a run; resume it with --resume or choose another --out")
        found = read_json(config_path)
        if not isinstance(found, dict):
            raise DltestError(f"cannot resume {folder}: its {CONFIG_FILE} does not hold a JSON object")
        found = {k: v for k, v in found.items() if k != "dltest_version"}
        mismatched = sorted(k for k in set(found) | set(wanted) - {"dltest_version"}
                            if k != "dltest_version" and found.get(k) != wanted.get(k))
        if mismatched:
            raise DltestError(f"cannot resume {folder}: it was run with other settings ({', '.join(mismatched)})")
        return
    if resume and folder.exists() and any(folder.iterdir()):
        raise DltestError(f"cannot resume {folder}: it holds no {CONFIG_FILE}")
    if resume and not folder.exists():
        raise DltestError(f"cannot resume {folder}: no such run folder")
    if folder.is_dir() and any(folder.iterdir()):
        raise DltestError(f"{folder} is not empty and holds no dltest run ({CONFIG_FILE}); choose a new or empty "
                          "folder for --out")
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    try:
        write_json(config_path, wanted)
    except DltestError:
        if created:
            folder.rmdir()
        raise


STATE_KIND, STATE_VERSION = "dltest robust-al state", 2
STATE_FORMAT_1 = "dltest robust-al state 1"  # before issue 19: the labeled positions alone, the settings hashed
STATE_WORDING = Wording(unreadable="unreadable, truncated or not a state file",
                        other_settings="it comes from another run or other settings",
                        remedy="remove the run folder to start afresh")


def _state_path(folder: Path, metric: str) -> Path:
    """``state/initial.pt`` for the initial model (metric ""), else ``state/<metric>.pt``."""
    return folder / "state" / f"{metric or 'initial'}.pt"


def _state_file(path: Path, config: RobustALConfig, labels: Tensor | None = None) -> ResumeState:
    """The state file at ``path`` of a run with ``config``; ``labels`` (the training pool's) let it
    read the state files of format 1 too."""
    legacy = (lambda raw, file: _read_format_1(raw, file, config, labels)) if labels is not None else None
    return ResumeState(path, STATE_KIND, STATE_VERSION, config.to_dict(), wording=STATE_WORDING, legacy=legacy)


def _write_state(path: Path, config: RobustALConfig, state: MetricState) -> None:
    """Save ``state`` (its model's weights, its records as JSON lines and its labeled pool's
    ``size``, ``labeled`` and ``labels``) atomically, with the settings and a digest."""
    weights = {k: v.detach().cpu() for k, v in state.model.state_dict().items()}
    lines = [json.dumps(asdict(r)) for r in state.records]
    _state_file(path, config).save({"model": weights, "records": lines, **state.pool.state_dict()})


def _final_path(folder: Path, metric: str) -> Path:
    return folder / "state" / f"{metric}.final.json"


def _final_attacks(folder: Path | None, config: RobustALConfig, state: MetricState,
                   attack: Callable[[nn.Module], dict[str, float]]) -> dict[str, float]:
    """The final attacks' robust accuracy of a metric's last model, computed once per run folder:
    the result is kept beside the metric's state with a digest of that state and reused only while
    the digest matches (the same settings, weights, labeled pool and records). The digest is the
    one of state format 1, so the results kept by runs of earlier dltest are reused too."""
    metric, model = _name(config, state.metric), state.model
    if folder is None:
        return attack(model)
    weights = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    lines = [json.dumps(asdict(r)) for r in state.records]
    digest = hashlib.sha256(json.dumps([_format_1_digest(_run_id(config), weights, state.pool.labeled(), lines),
                                        list(config.final_attacks)]).encode()).hexdigest()
    path = _final_path(folder, metric)
    if path.is_file():
        try:
            kept = read_json(path)
        except DltestError:
            kept = None
        if (isinstance(kept, dict) and kept.get("digest") == digest and isinstance(kept.get("robust_accuracy"), dict)
                and all(isinstance(v, float) for v in kept["robust_accuracy"].values())):
            return kept["robust_accuracy"]
    accuracy = attack(model)
    write_json(path, {"metric": metric, "attacks": list(config.final_attacks), "robust_accuracy": accuracy,
                      "digest": digest})
    return accuracy


def _load_saved_states(folder: Path, config: RobustALConfig, factory: Callable[[], nn.Module],
                       labels: Tensor) -> dict[str, MetricState]:
    """Every state file of the run, checked, under its metric in ``config.metrics`` (the initial model
    under ""); a state file that is unreadable, edited, or from another run or other settings is
    refused, never used.
    ``labels`` are the training pool's (the oracle)."""
    saved = {}
    for metric in ("", *config.metrics):
        path = _state_path(folder, _name(config, metric))
        if os.path.lexists(path):
            saved[metric] = _read_state(path, config, metric, factory, labels)
    if saved and "" not in saved:
        raise DltestError(f"cannot resume {folder}: {_state_path(folder, '')} is missing; remove the run folder "
                          "to start afresh")
    return saved


def _read_state(path: Path, config: RobustALConfig, metric: str, factory: Callable[[], nn.Module],
                labels: Tensor) -> MetricState:
    file = _state_file(path, config, labels)
    state = file.load()
    weights, lines = state.get("model"), state.get("records")
    if (not isinstance(weights, dict) or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in weights.items())
            or not isinstance(lines, list) or not all(isinstance(line, str) for line in lines)):
        raise file.refuse("it lacks the model, labeled pool or records")
    try:
        pool = LabeledPool.from_state_dict({k: state.get(k) for k in ("size", "labeled", "labels")})
    except DltestError as exc:
        raise file.refuse(f"its labeled pool is malformed ({str(exc)[:120]})") from None
    if pool.size != len(labels):
        raise file.refuse(f"its labeled pool covers {pool.size} inputs, not the training pool of {len(labels)}")
    if not torch.equal(pool.labels(), labels[pool.labeled()].long()):
        raise file.refuse("its labels are not the training data's (the data changed since)")
    records = _check_records(lines, config, _name(config, metric), pool, file.refuse)
    model = factory()
    try:
        model.load_state_dict(weights)
    except (RuntimeError, KeyError, TypeError, ValueError) as exc:
        raise file.refuse(f"its weights do not fit the model ({str(exc).splitlines()[0][:120]})") from None
    return MetricState(metric, model.eval(), pool, records)


def _read_format_1(raw: dict[str, Any], file: ResumeState, config: RobustALConfig,
                   labels: Tensor) -> dict[str, Any] | None:
    """The contents of a state file of format 1 (dltest before issue 19), checked as that format
    was, with its labeled positions' labels taken from the data; None for any other format."""
    if raw.get("format") != STATE_FORMAT_1:
        return None
    weights, labeled, lines = raw.get("model"), raw.get("labeled"), raw.get("records")
    if (not isinstance(weights, dict) or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in weights.items())
            or not isinstance(labeled, Tensor) or not isinstance(lines, list)
            or not all(isinstance(line, str) for line in lines)):
        raise file.refuse("it lacks the model, labeled pool or records")
    if raw.get("run") != _run_id(config):
        raise file.refuse(STATE_WORDING.other_settings)
    if raw.get("digest") != _format_1_digest(raw["run"], weights, labeled, lines):
        raise file.refuse(EDITED)
    n = len(labels)
    if labeled.dtype != torch.long or labeled.ndim != 1 or (len(labeled) and not 0 <= int(labeled.min()) <= int(labeled.max()) < n):
        raise file.refuse(f"its labeled pool is not positions in the pool of {n}")
    return {"model": weights, "records": lines, "size": n, "labeled": labeled, "labels": labels[labeled].long()}


def _run_id(config: RobustALConfig) -> str:
    """Format 1's fingerprint of the settings: a hash of them."""
    return hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True, default=str).encode()).hexdigest()


def _format_1_digest(run_id: str, weights: dict[str, Tensor], labeled: Tensor, records: list[str]) -> str:
    """Format 1's digest of a state: settings (``run_id``), weights, labeled positions and records."""
    return state_digest({**{f"model.{k}": v for k, v in weights.items()}, "labeled": labeled},
                        {"format": STATE_FORMAT_1, "run": run_id, "records": records})


def _check_records(lines: list[str], config: RobustALConfig, metric: str, pool: LabeledPool,
                   refuse: Callable[[str], DltestError]) -> list[StageRecord]:
    """The records of a state file, consistent with the settings and the labeled pool."""
    records = []
    for line in lines:
        try:
            records.append(StageRecord(**parse_json_text(line, "a record")))
        except (DltestError, TypeError) as exc:
            raise refuse(f"a record is malformed ({str(exc)[:80]})") from None
    stages = [r.stage for r in records]
    if not records or stages != list(range(len(records))) or stages[-1] > config.stages:
        raise refuse(f"its stages {stages[:8]} are not 0, 1, ... up to at most {config.stages}")
    if any(r.metric != metric or r.seed != config.seed for r in records) or (not metric and len(records) > 1):
        raise refuse(f"its records are not those of metric {metric or 'initial'!r}, seed {config.seed}")
    expected = config.initial + sum(config.stage_size(k) for k in range(1, stages[-1] + 1))
    if len(pool) != expected or records[-1].labeled != expected:
        raise refuse(f"its labeled pool is not {expected} distinct positions in the pool of {pool.size}")
    return records


def _on_device(state: MetricState, device: torch.device) -> MetricState:
    """A saved state, its model moved to ``device`` in eval mode."""
    state.model.to(device).eval()
    return state


def _write_log(folder: Path, config: RobustALConfig, records: dict[str, list[StageRecord]]) -> None:
    with atomic_path(folder / LOG_FILE) as tmp:
        with open(tmp, "w") as f:
            for metric in config.metrics:
                for record in records.get(config.label(metric), []):
                    f.write(json.dumps(asdict(record)) + "\n")


def _finish(folder: Path, result: RobustALResult, train_data: ImageDataset) -> None:
    _write_log(folder, result.config, result.records)
    for metric, model in result.models.items():
        last = result.records[metric][-1]
        save_checkpoint(model.cpu(), folder / f"{metric}.pt", arch=result.config.arch or default_arch(
            train_data.name, train_data.input_shape), arch_kwargs=result.config.arch_kwargs,
            dataset=train_data.name, input_shape=train_data.input_shape,
            num_classes=train_data.num_classes,
            meta={"command": "dltest robust-al", "metric": metric, "labeled": last.labeled, "stage": last.stage,
                  "clean_accuracy": last.clean_accuracy, "robust_accuracy": last.robust_accuracy,
                  "config": json.loads(json.dumps(result.config.to_dict()))})
    write_json(folder / SUMMARY_FILE, result.summary())
    records = [asdict(r) for rs in result.records.values() for r in rs]
    try:
        accuracy_by_stage(records, folder / FIGURE_FILE, title=f"{train_data.name}, seed {result.config.seed}")
    except DltestError as exc:  # matplotlib missing: the run's figures are all in the log anyway
        warnings.warn(f"no {FIGURE_FILE}: {exc}", stacklevel=2)


def read_log(path: str | os.PathLike) -> list[StageRecord]:
    """The records of a run's ``log.jsonl`` (or of the run folder that holds it)."""
    path = Path(path)
    if path.is_dir():
        path = path / LOG_FILE
    if not path.is_file():
        raise DltestError(f"no run log at {path}")
    records = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if line.strip():
            fields = parse_json_text(line, f"{path}:{number}")
            try:
                records.append(StageRecord(**fields))
            except TypeError:
                raise DltestError(f"{path}:{number} is not a stage record of dltest robust-al") from None
    return records


def finished_metrics(folder: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """The metrics of a run folder that reached the last stage, in ``summary.json``'s ``final`` shape
    (labeled, stage, clean accuracy, robust accuracy with the final attacks): for a finished run its
    summary, for one still going (or stopped) the metrics done so far, with the final attacks kept in
    ``state/`` for those already attacked."""
    folder = Path(folder)
    if (folder / SUMMARY_FILE).is_file():
        summary = read_json(folder / SUMMARY_FILE)
        if isinstance(summary, dict) and isinstance(summary.get("final"), dict):
            return summary["final"]
        raise DltestError(f"{folder / SUMMARY_FILE} holds no 'final' table")
    config = read_json(folder / CONFIG_FILE)
    try:
        stages = -(-(int(config["budget"]) - int(config["initial"])) // int(config["per_stage"]))
    except (TypeError, KeyError, ValueError):
        raise DltestError(f"{folder / CONFIG_FILE} lacks the schedule (budget, initial, per_stage)") from None
    finished = {}
    for record in read_log(folder) if (folder / LOG_FILE).is_file() else []:
        if record.stage != stages:
            continue
        final = read_json(_final_path(folder, record.metric)) if _final_path(folder, record.metric).is_file() else {}
        finished[record.metric] = {"labeled": record.labeled, "stage": record.stage,
                                   "clean_accuracy": record.clean_accuracy,
                                   "robust_accuracy": {**record.robust_accuracy, **final.get("robust_accuracy", {})}}
    return finished


def _total_seconds(records: Sequence[StageRecord]) -> dict[str, float]:
    totals = {"select": 0.0, "train": 0.0, "evaluate": 0.0}
    for r in records:
        for k, v in r.seconds.items():
            totals[k] = round(totals.get(k, 0.0) + v, 3)
    return totals
