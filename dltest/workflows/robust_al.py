"""Robust active learning (the paper's Algorithm 1, SPEC §4): budgeted training from scratch.

initial random labeled pool -> standard training (the initial model, shared by every metric of
a seed) -> per stage: one inference pass over the unlabeled pool -> ``select`` with the metric
-> the dataset's labels play the oracle -> adversarial training on the labeled pool, warm-started
from the previous stage's best epoch -> clean and robust accuracy on the holdout half.

Everything lives in a run folder, rewritten atomically after every stage::

    config.json    the settings (a resumed run must match them)
    log.jsonl      one record per (metric, stage): labeled size, selected indices, accuracy,
                   robust accuracy per attack, the selection's bias (SPEC §6), seconds spent
    state/         the initial model, and per metric the latest stage's model and labeled pool
    summary.json   the last stage of every metric;  <metric>.pt  its final model
    figure.png     accuracy and robustness per stage, one line per metric (the paper's Figure 2)

A run killed at any moment continues with ``resume=True`` from the last finished stage and
ends with the selections and figures of an uninterrupted run: every random draw is seeded by
(seed, metric, stage), never by what ran before.
"""

from __future__ import annotations

import copy
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

from dltest import __version__
from dltest.adversarial_training import AT_METHODS, AdversarialTraining, adversarial_training
from dltest.analysis.bias import selection_bias
from dltest.analysis.plots import accuracy_by_stage
from dltest.attacks import attack_preset, parse_attack_list
from dltest.checkpoint import resolve_arch, save_checkpoint
from dltest.data import ImageDataset
from dltest.errors import DltestError
from dltest.inference import infer
from dltest.io import atomic_path, write_json
from dltest.profiles import PROFILES, dataset_profile
from dltest.robustness import evaluate_robustness
from dltest.runtime import check_seed, resolve_device, seeded
from dltest.selection import select
from dltest.selectors import get_selector
from dltest.training import TrainConfig, robust_check, train
from dltest.zoo import ARCHITECTURES, default_arch, model_for_dataset

CONFIG_FILE, LOG_FILE, SUMMARY_FILE, FIGURE_FILE = "config.json", "log.jsonl", "summary.json", "figure.png"


@dataclass(frozen=True)
class RobustALConfig:
    """The settings of one robust active-learning run (every figure of the run follows from them).

    ``budget`` is the final labeled-pool size, ``initial`` the random initial pool, ``per_stage``
    how many inputs each stage labels. ``at`` is the adversarial-training method (``None``:
    standard active learning, the paper's Table 1), with ``at_steps`` inner steps of ``at_alpha``
    (default: the method's preset). ``epochs`` per stage, the best kept by
    robust accuracy on ``val_n`` validation inputs under a ``check_steps``-step PGD.
    ``train_size`` limits the unlabeled pool to a seeded subset of the training data. ``arch`` is
    a zoo name or the user's ``module:Class`` / ``file.py:Class``, built with ``arch_kwargs``
    (its forward must return logits).
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
    eval_attacks: tuple[str, ...] = ("pgd",)
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
        """The selector options that apply to ``metric`` (e.g. ``samples`` only to bald)."""
        from dltest.selectors import REGISTRY

        cls = REGISTRY.get(metric)
        allowed = cls.option_defaults() if cls else {}
        return {k: v for k, v in self.metric_options.items() if k in allowed}

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["metrics"], data["eval_attacks"] = list(self.metrics), list(self.eval_attacks)
        data["final_attacks"] = list(self.final_attacks)
        return data


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

    ``selected`` are positions in the dataset's training split (``source_index``).
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
        return {"command": "dltest robust-al", "dltest_version": __version__, "seed": self.config.seed,
                "config": self.config.to_dict(), "final": final,
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
    progress: bool = False,
) -> RobustALResult:
    """Run robust (or, with ``config.at=None``, standard) active learning for every metric.

    ``train_data`` is the unlabeled pool whose labels play the oracle; ``val_data`` picks each
    stage's best epoch; ``holdout`` is only for the reported figures. ``model_factory`` builds
    the untrained model (default: the dataset's zoo architecture, or ``config.arch``).
    ``on_stage`` is called with each finished record (live views).
    """
    device = resolve_device(device)
    if config.train_size is not None:
        train_data = train_data.sample(config.train_size, _seed(config.seed, "pool", 0))
    _check_data(config, train_data, val_data, holdout)
    folder = Path(run_dir) if run_dir is not None else None
    if folder is not None:
        _prepare_folder(folder, config, resume)
    factory = model_factory or _zoo_or_user_model(config, train_data)
    _check_model_fits(factory, train_data)
    profile = dataset_profile(train_data.name, train_data.input_shape[0])
    method = _method(config, profile.attack.name)
    val = val_data.sample(config.val_n, config.seed)
    check = robust_check(method.eps, steps=config.check_steps) if method else None
    eval_specs = [attack_preset(a, train_data.name, "eval", channels=train_data.input_shape[0], eps=config.eps,
                                seed=config.seed) for a in config.eval_attacks]

    def evaluate(model: nn.Module, attacks=eval_specs) -> tuple[float, dict[str, float]]:
        report = evaluate_robustness(model, holdout, attacks, n=config.eval_n, seed=config.seed, device=device)
        return report.clean_accuracy, {o.attack: o.robust_accuracy for o in report.attacks}

    augment = profile.augment
    initial_model, initial_labeled, initial_record = _initial(config, factory, train_data, val, folder, device,
                                                              evaluate, augment, progress)
    records: dict[str, list[StageRecord]] = {}
    models: dict[str, nn.Module] = {}
    for metric in config.metrics:
        model, labeled, history = _resume_metric(folder, metric, factory, initial_model, initial_labeled, device)
        if not history:
            history = [replace(initial_record, metric=metric)]
            if on_stage:
                on_stage(history[0])
        for stage in range(history[-1].stage + 1, config.stages + 1):
            record, model, labeled = _stage(config, metric, stage, model, labeled, train_data, val, method, check,
                                            evaluate, augment, device, progress)
            history.append(record)
            if folder is not None:
                _save_metric_state(folder, metric, model, labeled, history)
                _write_log(folder, config, records | {metric: history})
            if on_stage:
                on_stage(record)
        records[metric], models[metric] = history, model
    result = RobustALResult(config, records, models, folder)
    if config.final_attacks:
        final_specs = [attack_preset(a, train_data.name, "eval", channels=train_data.input_shape[0],
                                     eps=config.eps, seed=config.seed) for a in config.final_attacks]
        result.final_attacks = {m: evaluate(model, final_specs)[1] for m, model in models.items()}
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


def _initial(config, factory, train_data, val, folder, device, evaluate, augment, progress):
    """The initial model: standard training on a seeded random pool; stored once per run."""
    path = folder / "state" / "initial.pt" if folder is not None else None
    if path is not None and path.is_file():
        state = _read_state(path)
        model = factory()
        model.load_state_dict(state["model"])
        return model.to(device).eval(), torch.as_tensor(state["labeled"]), StageRecord(**state["record"])
    started = time.perf_counter()
    generator = torch.Generator().manual_seed(_seed(config.seed, "initial", 0))
    labeled = torch.randperm(len(train_data), generator=generator)[: config.initial].sort().values
    with seeded(_seed(config.seed, "init", 0)):
        model = factory()
    result = train(model, train_data.subset(labeled), val, _train_config(config, 0, augment, config.initial_epochs),
                   device=device, progress=progress)
    trained = time.perf_counter()
    clean, robust = evaluate(result.model)
    record = StageRecord(metric="", seed=config.seed, stage=0, labeled=len(labeled), selected=[],
                         clean_accuracy=clean, robust_accuracy=robust, bias=None,
                         seconds={"select": 0.0, "train": round(trained - started, 3),
                                  "evaluate": round(time.perf_counter() - trained, 3)},
                         best_epoch=result.best_epoch, stopped_early=result.stopped_early)
    if path is not None:
        _write_state(path, {"model": result.model.state_dict(), "labeled": labeled, "record": asdict(record)})
    return result.model, labeled, record


def _stage(config, metric, stage, model, labeled, train_data, val, method, check, evaluate, augment, device,
           progress):
    """Select ``stage_size`` inputs, label them, train on the labeled pool, evaluate."""
    started = time.perf_counter()
    outputs = infer(model, train_data, device=device)
    selection = select(metric, config.stage_size(stage), model=model, data=train_data, outputs=outputs,
                       labeled=labeled, seed=_seed(config.seed, metric, stage), device=device,
                       **config.options_for(metric))
    chosen = torch.tensor(selection.indices, dtype=torch.long)
    candidates = _complement(labeled, len(train_data))
    bias = selection_bias(outputs.probs[candidates], train_data.y[candidates],
                          torch.searchsorted(candidates, chosen))
    labeled = torch.cat([labeled, chosen]).sort().values
    selected_at = time.perf_counter()

    stage_method = method
    if method is not None and stage > 1:
        stage_method = replace(method, warmup_epochs=0.0)  # warm-started from a robust model: no ramp
    result = train(copy.deepcopy(model), train_data.subset(labeled), val, _train_config(config, stage, augment),
                   adversary=stage_method, val_adversary=check, device=device, progress=progress)
    trained_at = time.perf_counter()
    clean, robust = evaluate(result.model)
    record = StageRecord(
        metric=metric, seed=config.seed, stage=stage, labeled=len(labeled),
        selected=train_data.source_index[chosen].tolist(),
        clean_accuracy=clean, robust_accuracy=robust, bias=bias,
        seconds={"select": round(selected_at - started, 3), "train": round(trained_at - selected_at, 3),
                 "evaluate": round(time.perf_counter() - trained_at, 3)},
        best_epoch=result.best_epoch, stopped_early=result.stopped_early,
    )
    return record, result.model, labeled


def _seed(seed: int, purpose: str, stage: int) -> int:
    """A seed per (run seed, purpose or metric, stage), the same whatever ran before."""
    return (seed * 1_000_003 + zlib.crc32(purpose.encode()) * 1009 + stage) % (2**63 - 1)


def _complement(labeled: Tensor, n: int) -> Tensor:
    keep = torch.ones(n, dtype=torch.bool)
    keep[labeled] = False
    return torch.nonzero(keep).flatten()


def _zoo_or_user_model(config: RobustALConfig, data: ImageDataset) -> Callable[[], nn.Module]:
    """A builder of the untrained model: the zoo's (the dataset's architecture by default) or the
    user's ``module:Class``."""
    arch = config.arch or default_arch(data.name, data.input_shape)
    if arch in ARCHITECTURES:
        return lambda: model_for_dataset(data.name, arch, data.num_classes, data.input_shape)
    build = resolve_arch(arch)
    return lambda: build(**config.arch_kwargs)


def _check_model_fits(factory: Callable[[], nn.Module], data: ImageDataset) -> None:
    try:
        with seeded(0), torch.no_grad():
            out = factory().eval()(data.images(slice(0, 2)))
    except DltestError:
        raise
    except Exception as exc:
        raise DltestError(f"the model cannot take {data.name} inputs of shape {tuple(data.input_shape)} "
                          f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
    if out.ndim != 2 or out.shape[1] != data.num_classes:
        raise DltestError(f"the model outputs shape {tuple(out.shape)}, but {data.name} has {data.num_classes} classes")


def _check_data(config: RobustALConfig, train_data, val_data, holdout) -> None:
    if config.budget > len(train_data):
        raise DltestError(f"budget ({config.budget}) exceeds the training pool of {len(train_data)} inputs")
    if not (train_data.name == val_data.name == holdout.name):
        raise DltestError(f"train, val and holdout data must be one dataset, got {train_data.name}, "
                          f"{val_data.name}, {holdout.name}")


# --- the run folder ----------------------------------------------------------------------------


def _prepare_folder(folder: Path, config: RobustALConfig, resume: bool) -> None:
    config_path = folder / CONFIG_FILE
    wanted = {"command": "dltest robust-al", "dltest_version": __version__, **config.to_dict()}
    if folder.exists() and not folder.is_dir():
        raise DltestError(f"run folder {folder} is a file")
    if config_path.is_file():
        if not resume:
            raise DltestError(f"{folder} already holds a run; resume it with --resume or choose another --out")
        try:
            found = json.loads(config_path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise DltestError(f"cannot resume {folder}: its {CONFIG_FILE} is unreadable ({exc})") from None
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
    folder.mkdir(parents=True, exist_ok=True)
    write_json(config_path, wanted)


def _state_path(folder: Path, metric: str) -> Path:
    return folder / "state" / f"{metric}.pt"


def _write_state(path: Path, state: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def _read_state(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise DltestError(f"cannot resume from {path}: unreadable ({type(exc).__name__}); remove the run folder "
                          "to start afresh") from None


def _save_metric_state(folder: Path, metric: str, model: nn.Module, labeled: Tensor,
                       history: list[StageRecord]) -> None:
    _write_state(_state_path(folder, metric), {
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "labeled": labeled,
        "records": [json.dumps(asdict(r)) for r in history],
    })


def _resume_metric(folder, metric, factory, initial_model, initial_labeled, device):
    """The model, labeled pool and records of ``metric``'s last finished stage (none: the initial model)."""
    path = _state_path(folder, metric) if folder is not None else None
    if path is None or not path.is_file():
        return copy.deepcopy(initial_model), initial_labeled.clone(), []
    state = _read_state(path)
    model = factory()
    model.load_state_dict(state["model"])
    history = [StageRecord(**json.loads(r)) for r in state["records"]]
    return model.to(device).eval(), torch.as_tensor(state["labeled"]), history


def _write_log(folder: Path, config: RobustALConfig, records: dict[str, list[StageRecord]]) -> None:
    with atomic_path(folder / LOG_FILE) as tmp:
        with open(tmp, "w") as f:
            for metric in config.metrics:
                for record in records.get(metric, []):
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
    return [StageRecord(**json.loads(line)) for line in path.read_text().splitlines() if line.strip()]


def _total_seconds(records: Sequence[StageRecord]) -> dict[str, float]:
    totals = {"select": 0.0, "train": 0.0, "evaluate": 0.0}
    for r in records:
        for k, v in r.seconds.items():
            totals[k] = round(totals.get(k, 0.0) + v, 3)
    return totals
