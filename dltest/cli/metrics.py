"""``dltest metrics``: the acquisition functions, one line each, with their options."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from dltest.cli.app import app
from dltest.selectors import REGISTRY


@app.command("metrics")
def metrics_command() -> None:
    """List the acquisition functions (selectors) and the options each one takes."""
    table = Table(title="dltest acquisition functions", show_lines=False)
    table.add_column("metric", style="bold cyan")
    table.add_column("what it selects")
    table.add_column("options (default)")
    table.add_column("runs model again")
    for name in sorted(REGISTRY):
        cls = REGISTRY[name]
        options = ", ".join(f"{k}={v}" for k, v in cls.option_defaults().items()) or "-"
        table.add_row(name, cls.summary, options, "yes" if cls.needs_model else "no")
    Console(width=max(Console().width, 120)).print(table)
