"""``dltest metrics``: the acquisition functions, one line each, with their options."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from dltest.cli.app import app
from dltest.io import check_writable, write_json
from dltest.selectors import REGISTRY


def metric_catalogue() -> list[dict]:
    """Every registered selector: name, summary, options with defaults, whether it reruns the model."""
    return [
        {"metric": name, "summary": cls.summary, "options": cls.option_defaults(),
         "score": cls.score_name, "runs_model_again": cls.needs_model}
        for name, cls in sorted(REGISTRY.items())
    ]


@app.command("metrics")
def metrics_command(
    out: Annotated[Optional[Path], typer.Option(help="Also write the list as JSON.")] = None,
) -> None:
    """List the acquisition functions (selectors) and the options each one takes."""
    if out:
        check_writable(out)
    catalogue = metric_catalogue()
    table = Table(title="dltest acquisition functions", show_lines=False)
    table.add_column("metric", style="bold cyan")
    table.add_column("what it selects")
    table.add_column("options (default)")
    table.add_column("runs model again")
    for row in catalogue:
        options = ", ".join(f"{k}={v}" for k, v in row["options"].items()) or "-"
        table.add_row(row["metric"], row["summary"], options, "yes" if row["runs_model_again"] else "no")
    Console(width=max(Console().width, 120)).print(table)
    if out:
        write_json(out, catalogue)
