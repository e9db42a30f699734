"""Robust active learning (the paper's Algorithm 1, SPEC §4): budgeted training from scratch.

initial random labeled pool -> standard training (the initial model, shared by every metric of
a seed) -> per stage: one inference pass over the unlabeled pool -> ``select`` with the metric
-> the dataset's labels play the oracle -> adversarial training on the labeled pool, warm-started
from the previous stage's best epoch -> clean and robust accuracy on the holdout half.

Everything lives in a run folder (:mod:`dltest.workflows.robust_al_folder`), rewritten atomically
after every stage; the settings and records are in :mod:`dltest.workflows.robust_al_config`::

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
import json
import os
import time
import warnings
import zlib
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from dltest.header import output_header
from dltest.adapter import check_fits
from dltest.adversarial_training import AdversarialTraining
from dltest.analysis.bias import selection_bias
from dltest.analysis.plots import accuracy_by_stage
from dltest.attacks import attack_preset, pgd_check
from dltest.checkpoint import save_checkpoint
from dltest.data import ImageDataset, LabeledPool
from dltest.errors import DltestError, first_line
from dltest.inference import infer
from dltest.io import write_json
from dltest.profiles import dataset_profile
from dltest.robustness import evaluate_robustness
from dltest.runtime import resolve_device, seeded
from dltest.selection import select
from dltest.training import Adversary, TrainConfig, train
from dltest.zoo import ARCHITECTURES, default_arch, model_for_dataset, resolve_arch

# the run's settings and records, and its folder (also imported from here by callers and tests)
from dltest.workflows.robust_al_config import (  # noqa: F401
    EVERY_METRIC_OPTIONS, MetricState, RobustALConfig, StageRecord, _method, _name, preset, stage_attack,
)
from dltest.workflows.robust_al_folder import (  # noqa: F401
    CONFIG_FILE, FIGURE_FILE, LOG_FILE, SUMMARY_FILE, _final_attacks, _load_saved_states, _prepare_folder, _run_id,
    _state_path, _write_log, _write_state, finished_metrics, read_log,
)


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


def _train_config(config: RobustALConfig, stage: int, augment: str, epochs: int | None = None) -> TrainConfig:
    return TrainConfig(epochs=epochs or config.epochs, batch_size=config.batch_size, lr=config.lr,
                       optimizer=config.optimizer, seed=_seed(config.seed, "train", stage), augment=augment)


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


def _on_device(state: MetricState, device: torch.device) -> MetricState:
    """A saved state, its model moved to ``device`` in eval mode."""
    state.model.to(device).eval()
    return state


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


def _total_seconds(records: Sequence[StageRecord]) -> dict[str, float]:
    totals = {"select": 0.0, "train": 0.0, "evaluate": 0.0}
    for r in records:
        for k, v in r.seconds.items():
            totals[k] = round(totals.get(k, 0.0) + v, 3)
    return totals
