"""A robust-al run folder: ``config.json`` (a resume must match it), ``log.jsonl``, the state
files under ``state/`` (the initial model and per metric its latest model and labeled pool, read
and written through :mod:`dltest.resume`; format 1 of runs before issue 19 is still read), and
each metric's kept final attacks (``state/<metric>.final.json``)."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from dltest.header import output_header
from dltest.checkpoint import state_digest
from dltest.data import LabeledPool
from dltest.errors import DltestError
from dltest.io import atomic_path, parse_json_text, read_json, write_json
from dltest.resume import EDITED, ResumeState, Wording

from dltest.workflows.robust_al_config import MetricState, RobustALConfig, StageRecord, _name, stage_count

CONFIG_FILE, LOG_FILE, SUMMARY_FILE, FIGURE_FILE = "config.json", "log.jsonl", "summary.json", "figure.png"


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


def _write_log(folder: Path, config: RobustALConfig, records: dict[str, list[StageRecord]]) -> None:
    with atomic_path(folder / LOG_FILE) as tmp:
        with open(tmp, "w") as f:
            for metric in config.metrics:
                for record in records.get(config.label(metric), []):
                    f.write(json.dumps(asdict(record)) + "\n")


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
        stages = stage_count(int(config["budget"]), int(config["initial"]), int(config["per_stage"]))
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


