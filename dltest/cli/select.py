"""``dltest select``: rank a pool with a metric (an acquisition function) and write the selection."""

from __future__ import annotations

import csv
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from dltest.cli.app import app
from dltest.cli.options import (
    BatchSize, DataRoot, Dataset, Device, Download, ModelPath, Seed, Split, TrustModel, load_data_and_model,
)
from dltest.budget import parse_budget
from dltest.inference import INFERENCE_BATCH
from dltest.io import atomic_path, check_writable
from dltest.selection import SelectionResult, load_selection, select
from dltest.errors import DltestError
from dltest.selectors import REGISTRY, get_selector


@app.command("select")
def select_command(
    metric: Annotated[str, typer.Option("--metric", help="The metric that ranks the pool (an acquisition function); `dltest metrics` lists them.")] = "dre",
    budget: Annotated[str, typer.Option("--budget", "-b", help="How many inputs: a count (400) or a share of the pool (4%).")] = "4%",
    dataset: Dataset = "mnist",
    split: Split = "test",
    model: ModelPath = None,
    seed: Seed = 0,
    out: Annotated[Optional[Path], typer.Option(help="Selection JSON (default: selection-<metric>-<budget>.json).")] = None,
    csv_path: Annotated[Optional[Path], typer.Option("--csv", help="Also write rank, index, score as CSV.")] = None,
    labeled: Annotated[Optional[Path], typer.Option(help="A selection JSON of already-labeled inputs of the same pool: never selected again; core-set starts from them.")] = None,
    data_root: DataRoot = None,
    download: Download = False,
    device: Device = None,
    batch_size: BatchSize = INFERENCE_BATCH,
    trust_model: TrustModel = False,
    mc_samples: Annotated[Optional[int], typer.Option("--mc-samples", help="bald, dropout-entropy: T, the number of MC-dropout samples [default: 10].", show_default=False)] = None,
    dropout: Annotated[Optional[float], typer.Option("--dropout", help="bald, dropout-entropy: rate of the dropout put before the final linear layer of a model without dropout [default: 0.1].", show_default=False)] = None,
    candidate_factor: Annotated[Optional[float], typer.Option("--candidate-factor", help="dfal: DeepFool runs on a random subset of min(factor x budget, pool) inputs [default: 10].", show_default=False)] = None,
    overshoot: Annotated[Optional[float], typer.Option("--overshoot", help="dfal: DeepFool overshoot [default: 0.02].", show_default=False)] = None,
    deepfool_steps: Annotated[Optional[int], typer.Option("--deepfool-steps", help="dfal: most DeepFool iterations per input [default: 50].", show_default=False)] = None,
    egl_variant: Annotated[Optional[str], typer.Option("--egl-variant", help="egl: 'exact' (gradient over all trainable parameters) or 'last-layer' [default: exact].", show_default=False)] = None,
) -> None:
    """Select the inputs most worth labeling or testing."""
    options = metric_options(
        metric,
        {
            "--mc-samples": ("samples", mc_samples),
            "--dropout": ("dropout", dropout),
            "--candidate-factor": ("candidate_factor", candidate_factor),
            "--overshoot": ("overshoot", overshoot),
            "--deepfool-steps": ("steps", deepfool_steps),
            "--egl-variant": ("variant", egl_variant),
        },
    )
    get_selector(metric, **options)  # unknown metric, bad option or malformed budget: fail before loading anything
    parse_budget(budget, pool_size=sys.maxsize)
    out = check_writable(out or Path(f"selection-{metric}-{budget.strip().replace('%', 'pct')}.json"))
    if csv_path:
        check_writable(csv_path)
    data, net, info = load_data_and_model(dataset, split, model, data_root, download, trust_model)
    labeled_indices = load_selection(str(labeled), data).indices if labeled else None
    result = select(
        metric, budget, model=net, data=data, seed=seed, labeled=labeled_indices, device=device,
        batch_size=batch_size, progress=True, model_name=info.source, **options,
    )
    result.save(str(out))
    if csv_path:
        _write_csv(csv_path, result)
    print_summary(result, out)


def metric_options(metric: str, flags: dict[str, tuple[str, object]]) -> dict[str, object]:
    """The metric options the user set (flag -> (option, value or None)); a flag the metric
    does not take is a one-line error."""
    if metric not in REGISTRY:
        get_selector(metric)  # raises the unknown-metric error
    takes = REGISTRY[metric].option_defaults()
    options = {}
    for flag, (name, value) in flags.items():
        if value is None:
            continue
        if name not in takes:
            accepted = ", ".join(f for f, (n, _) in flags.items() if n in takes) or "none of the metric flags"
            raise DltestError(f"{flag} is not an option of metric {metric!r} (it takes {accepted})")
        options[name] = value
    return options


def print_summary(result: SelectionResult, out: Path) -> None:
    console = Console()
    table = Table(title=f"{result.metric}: {result.budget} of {result.pool_size} inputs ({result.dataset}/{result.split}, seed {result.seed})")
    table.add_column("predicted class")
    table.add_column("selected", justify="right")
    table.add_column("share", justify="right")
    for name, count in sorted(result.predicted_counts.items(), key=lambda kv: -kv[1]):
        table.add_row(name, str(count), f"{100 * count / result.budget:.1f}%")
    console.print(table)
    finite = [s for s in result.scores or [] if s is not None]
    if finite:
        console.print(f"{result.score_name or 'score'}: min {min(finite):.4g}, max {max(finite):.4g}"
                      + (f" ({len(result.scores) - len(finite)} without a finite score)" if len(finite) < result.budget else ""))
    console.print(f"wrote {out} in {result.seconds:.2f} s")


def _write_csv(path: Path, result: SelectionResult) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["rank", "index", result.score_name or "score"])
        scores = result.scores or [None] * len(result.indices)
        writer.writerows((rank, index, score) for rank, (index, score) in enumerate(zip(result.indices, scores)))
