"""``dltest metrics``: the metrics (acquisition functions), one line each, with their options and
what each one needs."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from dltest.cli.app import app
from dltest.header import output_header

if TYPE_CHECKING:  # for type hints only: the commands import these when they run
    from dltest.selectors import Selector


def needs(cls: type[Selector]) -> list[str]:
    """What a metric needs beyond the model's outputs on the pool."""
    found = []
    if cls.needs_embeddings:
        found.append("penultimate embeddings (a model split into embed + head)")
    if cls.needs_mc_samples:
        found.append("MC-dropout samples (runs the model T times, or its head on the cached embeddings)")
    elif cls.needs_model:
        found.append("the model and the pool's images (runs the model again)")
    if cls.needs_reference:
        found.append("training data as reference (--reference-split train or --reference FILE); no labels: "
                     "the reference is grouped by predicted class")
    return found or ["the pool's outputs only"]


def metric_catalogue() -> list[dict]:
    """Every registered metric: name, summary, options with defaults, what it needs, whether it
    reruns the model and which ``--sampling`` modes apply (``power`` only to scores where higher
    is better)."""
    from dltest.selectors import REGISTRY, SAMPLINGS, ScoreSelector

    return [
        {"metric": name, "summary": cls.summary, "options": cls.option_defaults(), "score": cls.score_name,
         "needs": needs(cls), "runs_model_again": cls.needs_model, "needs_reference": cls.needs_reference,
         "sampling": [m for m in SAMPLINGS if m != "power" or cls.highest] if issubclass(cls, ScoreSelector) else []}
        for name, cls in sorted(REGISTRY.items())
    ]


@app.command("metrics")
def metrics_command(
    out: Annotated[Optional[Path], typer.Option(help="Also write the list as JSON.")] = None,
) -> None:
    """List the metrics (acquisition functions), the options each takes and what each needs."""
    from dltest.io import check_writable, write_json
    from rich.console import Console
    from rich.table import Table

    if out:
        check_writable(out)
    catalogue = metric_catalogue()
    table = Table(title="dltest metrics (acquisition functions)", show_lines=True)
    table.add_column("metric", style="bold cyan")
    table.add_column("what it selects")
    table.add_column("options (default)")
    table.add_column("needs")
    table.add_column("--sampling")
    for row in catalogue:
        options = ", ".join(f"{k}={v}" for k, v in row["options"].items()) or "-"
        table.add_row(row["metric"], row["summary"], options, "; ".join(row["needs"]), ", ".join(row["sampling"]) or "no")
    Console(width=max(Console().width, 160)).print(table)
    Console().print("--sampling power|softmax|rank with --temperature T applies where listed "
                    "(stochastic batch acquisition, Kirsch et al. 2023).")
    if out:
        write_json(out, {**output_header("metrics", None), "metrics": catalogue})
