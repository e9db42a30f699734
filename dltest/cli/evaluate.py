"""``dltest evaluate``: clean accuracy and robust accuracy per attack on a split."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer

from dltest.cli.app import app, robustness_warnings_as_lines
from dltest.header import output_header
from dltest.cli.options import (
    Arch, ArchKwargs, Normalize,
    Alpha, AttackBatch, DataRoot, Dataset, Device, Download, Eps, ModelPath, Queries, Seed, Steps, TrustModel,
    load_data_and_model,
)

if TYPE_CHECKING:  # for type hints only: the commands import these when they run
    from dltest.checkpoint import ModelInfo
    from dltest.robustness import RobustnessReport


@app.command("evaluate")
def evaluate_command(
    attacks: Annotated[str, typer.Option(help="Comma-separated: pgd, fgsm, square, autoattack (standard, 100 APGD steps), autoattack-fast, deepfool, apgd-square.")] = "pgd",
    dataset: Dataset = "mnist",
    split: Annotated[str, typer.Option(help="Split to evaluate on (default: holdout, the test half kept for reporting).")] = "holdout",
    model: ModelPath = None,
    eps: Eps = None,
    steps: Steps = None,
    alpha: Alpha = None,
    queries: Queries = None,
    n: Annotated[Optional[int], typer.Option("--n", help="Evaluate a seeded random subset of this many inputs.")] = None,
    seed: Seed = 0,
    out: Annotated[Path, typer.Option(help="JSON report to write.")] = Path("evaluate.json"),
    batch_size: AttackBatch = 256,
    data_root: DataRoot = None,
    download: Download = False,
    device: Device = None,
    trust_model: TrustModel = False,
    arch: Arch = None,
    arch_kwargs: ArchKwargs = None,
    normalize: Normalize = None,
) -> None:
    """Clean accuracy and robust accuracy under attacks (model in eval mode, RobustBench's rules)."""
    from dltest.attacks import parse_attack_list
    from dltest.io import check_outputs, write_json
    from dltest.robustness import check_evaluation, evaluate_robustness
    from rich.console import Console

    names = parse_attack_list(attacks)
    # the library's own checks (attacks, overrides, eps, n, seed, device), before loading anything
    check_evaluation(names, n=n, seed=seed, device=device, eps=eps, steps=steps, alpha=alpha, queries=queries)
    check_outputs({"--out": out}, {"--model": model, "--dataset": dataset})
    data, net, info = load_data_and_model(dataset, split, model, data_root, download, trust_model,
                                          arch, arch_kwargs, normalize)
    with robustness_warnings_as_lines():
        report = evaluate_robustness(
            net, data, names, n=n, seed=seed, batch_size=batch_size, device=device, progress=True,
            eps=eps, steps=steps, alpha=alpha, queries=queries,
        )
    write_json(out, evaluation_json(report, info))
    print_report(report, title=f"{info.source} on {report.dataset}/{report.split}")
    Console().print(f"wrote {out} in {report.seconds:.1f} s")


def evaluation_json(report: RobustnessReport, info: ModelInfo) -> dict[str, Any]:
    return {**output_header("evaluate", report.seed), "model": info.source, "model_arch": info.arch,
            "model_info": info.describe(), **report.to_dict()}


def print_report(report: RobustnessReport, title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{title}: {report.n} of {report.pool_size} inputs, seed {report.seed}")
    table.add_column("attack")
    table.add_column("settings")
    table.add_column("accuracy", justify="right")
    table.add_column("correct", justify="right")
    table.add_column("time", justify="right")
    table.add_row("none (clean)", "-", f"{100 * report.clean_accuracy:.2f}%", f"{report.clean_correct}/{report.n}", "-")
    for outcome in report.attacks:
        settings = outcome.label.split(" ", 1)[1] if " " in outcome.label else "-"
        table.add_row(outcome.attack, settings, f"{100 * outcome.robust_accuracy:.2f}%",
                      f"{outcome.robust_correct}/{outcome.n}", f"{outcome.seconds:.1f} s")
    worst = report.worst_case
    if worst is not None:  # robust only if it survives every attack above
        table.add_row(f"[bold]{worst.attack}[/]", "all of the above", f"[bold]{100 * worst.robust_accuracy:.2f}%[/]",
                      f"{worst.robust_correct}/{worst.n}", f"{worst.seconds:.1f} s")
    Console().print(table)
