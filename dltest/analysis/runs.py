"""Reading robust active-learning run folders (written by ``dltest robust-al``) for the analyses.

A run folder holds ``config.json`` (the settings, ``"command": "robust-al"``), ``log.jsonl`` (one
record per metric and stage: labeled size, selected positions, clean and robust accuracy, the
selection's bias, seconds) and, once finished, ``summary.json``. Several seeds are several
folders; :func:`load_runs` gathers their records and refuses the same (metric, seed, stage) twice.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from dltest.errors import DltestError
from dltest.io import parse_json_text

REQUIRED = ("metric", "seed", "stage", "clean_accuracy", "robust_accuracy")


@dataclass
class Run:
    """One run folder: its settings, its stage records in log order, and its summary if finished."""

    path: Path
    config: dict[str, Any]
    records: list[dict[str, Any]]
    summary: dict[str, Any] | None = None

    @property
    def metrics(self) -> list[str]:
        """The run's metrics, in the order they first appear in its log."""
        return list(dict.fromkeys(r["metric"] for r in self.records))


def load_run(path: str | os.PathLike) -> Run:
    """Read a robust-al run folder, with a one-line error naming what is missing or malformed."""
    folder = Path(path)
    if not folder.is_dir():
        raise DltestError(f"{folder} is not a run folder (no such folder)")
    config = _read_object(folder / "config.json")
    if config.get("command") not in ("robust-al", "dltest robust-al"):
        raise DltestError(f"{folder}/config.json is not from dltest robust-al (command {config.get('command')!r})")
    log = folder / "log.jsonl"
    if not log.is_file():
        raise DltestError(f"{folder} holds no log.jsonl: the run has not finished a stage")
    records = []
    try:
        lines = log.read_text().splitlines()
    except (UnicodeDecodeError, OSError) as exc:
        raise DltestError(f"cannot read {log} as text ({str(exc).splitlines()[0][:80]})") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        record = parse_json_text(line, f"{log}:{number}")
        records.append(_check_record(record, f"{log}:{number}"))
    if not records:
        raise DltestError(f"{log} is empty: the run has not finished a stage")
    summary_path = folder / "summary.json"
    summary = _read_object(summary_path) if summary_path.is_file() else None
    return Run(folder, config, records, summary)


def load_runs(paths: Sequence[str | os.PathLike]) -> list[Run]:
    """Several run folders (e.g. one per seed) whose records never repeat a (metric, seed, stage)."""
    if not paths:
        raise DltestError("name at least one run folder")
    runs = [load_run(p) for p in paths]
    seen: dict[tuple[str, int, int], Path] = {}
    for run in runs:
        for r in run.records:
            key = (r["metric"], r["seed"], r["stage"])
            if key in seen:
                where = "twice in" if seen[key] == run.path else f"in both {seen[key]} and"
                raise DltestError(f"metric {key[0]!r}, seed {key[1]}, stage {key[2]} appears {where} {run.path}")
            seen[key] = run.path
    datasets = sorted({str(run.config.get("dataset")) for run in runs})
    if len(datasets) > 1:
        raise DltestError(f"the runs are on different datasets ({', '.join(datasets)}): analyse each on its own")
    return runs


def all_records(runs: Sequence[Run]) -> list[dict[str, Any]]:
    return [r for run in runs for r in run.records]


def _read_object(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise DltestError(f"{path.parent} is not a run folder (no {path.name})")
    try:
        text = path.read_text()
    except (UnicodeDecodeError, OSError) as exc:
        raise DltestError(f"{path} is not a valid JSON file ({exc})") from None
    data = parse_json_text(text, str(path))
    if not isinstance(data, dict):
        raise DltestError(f"{path} does not hold a JSON object")
    return data


def _check_record(record: Any, where: str) -> dict[str, Any]:
    if not isinstance(record, dict):
        raise DltestError(f"{where} is not a JSON object")
    missing = [k for k in REQUIRED if k not in record]
    if missing:
        raise DltestError(f"{where} lacks {', '.join(missing)}")
    if not isinstance(record["metric"], str) or not _is_int(record["seed"]) or not _is_int(record["stage"]):
        raise DltestError(f"{where}: metric must be a string, seed and stage integers")
    robust = record["robust_accuracy"]
    if not isinstance(robust, dict) or not all(_is_number(v) for v in robust.values()):
        raise DltestError(f"{where}: robust_accuracy must map attack names to numbers")
    bias = record.get("bias")
    if bias is not None and (not isinstance(bias, dict) or not all(_is_number(v) for v in bias.values())):
        raise DltestError(f"{where}: bias must map characteristics to numbers, or be null")
    return record


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def run_bias_report(run: Run) -> dict[str, Any]:
    """``dltest analyze bias`` of a robust-al run: the selection bias its log records per stage."""
    from dltest.header import output_header

    rows = [{"metric": r["metric"], "seed": r["seed"], "stage": r["stage"], "labeled": r.get("labeled"),
             "bias": r.get("bias")} for r in run.records]
    if not any(row["bias"] for row in rows):
        raise DltestError(f"{run.path}/log.jsonl records no bias at any stage (stage 0 has none: it selects nothing)")
    return {**output_header("analyze bias", run.config.get("seed")),
            "source": str(run.path), "kind": "run", "dataset": run.config.get("dataset"), "records": rows}
