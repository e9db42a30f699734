"""``dltest gate``: evaluate a model and fail the build when a bar does not hold.

Exit codes: 0 every bar holds, 1 a bar fails, 2 bad usage. Bars come from the command line or
from ``dltest.toml`` (``[gate]``) / ``pyproject.toml`` (``[tool.dltest.gate]``); the command line
wins. Writes the JSON report (``--out``), JUnit XML (``--junit``), a Markdown table
(``--markdown``, and appended to ``$GITHUB_STEP_SUMMARY`` when that is set).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from dltest.cli.app import app
from dltest.cli.options import (
    Arch, ArchKwargs, AttackBatch, DataRoot, Device, Download, Normalize, TrustModel, load_data_and_model,
)

if TYPE_CHECKING:  # for type hints only: the commands import these when they run
    from dltest.gate import GateResult

Share = Optional[str]


@app.command("gate")
def gate_command(
    min_accuracy: Annotated[Share, typer.Option("--min-accuracy", help="Bar on clean accuracy, a share in [0, 1] (0.98).", show_default=False)] = None,
    min_robust: Annotated[Share, typer.Option("--min-robust", help="Bars on robust accuracy: pgd=0.8,square=0.85 (a bare 0.8 applies to worst-case: robust to every attack).", show_default=False)] = None,
    baseline: Annotated[Optional[Path], typer.Option("--baseline", help="A previous gate (or evaluate) report: drops are measured on its inputs, with its attack settings.", show_default=False)] = None,
    max_drop: Annotated[Share, typer.Option("--max-drop", help="Largest drop allowed against the baseline, absolute (0.02 = 2 points); per figure: accuracy=0.01,pgd=0.03.", show_default=False)] = None,
    max_relative_drop: Annotated[Share, typer.Option("--max-relative-drop", help="Largest drop allowed as a share of the baseline's figure (0.05 = 5%).", show_default=False)] = None,
    confidence: Annotated[Optional[float], typer.Option("--confidence", help="Confidence of every decision [default: 0.95].", show_default=False)] = None,
    attacks: Annotated[Optional[str], typer.Option("--attacks", help="Attacks to evaluate besides those the bars name (comma-separated).", show_default=False)] = None,
    config: Annotated[Optional[Path], typer.Option("--config", help="TOML file with a [gate] table (default: ./dltest.toml, else [tool.dltest.gate] in ./pyproject.toml).", show_default=False)] = None,
    dataset: Annotated[Optional[str], typer.Option("--dataset", "-d", help="mnist, fashion-mnist, cifar10, svhn, an .npz file or an image folder [default: mnist].", show_default=False)] = None,
    split: Annotated[Optional[str], typer.Option(help="Split to evaluate on [default: holdout].", show_default=False)] = None,
    model: Annotated[Optional[Path], typer.Option("--model", "-m", help="A dltest checkpoint, TorchScript or ONNX file; default: the bundled model of the dataset.", show_default=False)] = None,
    n: Annotated[Optional[int], typer.Option("--n", help="Evaluate a seeded random subset of this many inputs [default: all].", show_default=False)] = None,
    seed: Annotated[Optional[int], typer.Option(help="Random seed of the subset and the attacks [default: 0, or the baseline's].", show_default=False)] = None,
    eps: Annotated[Optional[str], typer.Option(help="Linf radius in (0, 1] (0.3 or 8/255; default: the dataset's preset).", show_default=False)] = None,
    steps: Annotated[Optional[int], typer.Option(help="Attack iterations (default: the preset's).", show_default=False)] = None,
    alpha: Annotated[Optional[float], typer.Option(help="PGD step size (default: the preset's).", show_default=False)] = None,
    queries: Annotated[Optional[int], typer.Option(help="Square's query budget (default 5000).", show_default=False)] = None,
    out: Annotated[Path, typer.Option(help="JSON report to write.")] = Path("gate.json"),
    junit: Annotated[Optional[Path], typer.Option("--junit", help="Also write JUnit XML, one test case per bar.", show_default=False)] = None,
    markdown: Annotated[Optional[Path], typer.Option("--markdown", help="Also write the Markdown table.", show_default=False)] = None,
    allow_randomised: Annotated[bool, typer.Option("--allow-randomised", help="Evaluate a model whose outputs change between calls in eval mode (attacks overestimate its robustness).")] = False,
    batch_size: AttackBatch = 256,
    data_root: DataRoot = None,
    download: Download = False,
    device: Device = None,
    trust_model: TrustModel = False,
    arch: Arch = None,
    arch_kwargs: ArchKwargs = None,
    normalize: Normalize = None,
    estimate: Annotated[Optional[Path], typer.Option("--estimate", help="Decide the minimums on an estimate from 'dltest estimate' (its interval's lower end) instead of evaluating.", show_default=False)] = None,
) -> None:
    """Fail the build (exit 1) when accuracy or robustness misses a bar; exact statistics decide."""
    from dltest.gate import append_step_summary, check_step_summary, gate_settings, load_baseline, run_gate, write_text
    from dltest.io import check_outputs, write_json
    from dltest.runtime import resolve_device
    from rich.console import Console

    given = {
        "min-accuracy": min_accuracy, "min-robust": min_robust, "max-drop": max_drop,
        "max-relative-drop": max_relative_drop, "confidence": confidence, "attacks": attacks,
        "baseline": baseline, "dataset": dataset, "split": split, "model": model, "n": n, "seed": seed,
        "eps": eps, "steps": steps, "alpha": alpha, "queries": queries,
        "allow-randomised": allow_randomised or None,
    }
    settings = gate_settings(given, config)
    if estimate is not None:
        from dltest.cli.estimate import gate_on_estimate

        return gate_on_estimate(estimate, settings.policy, out)
    resolve_device(device)  # a bogus --device fails before anything is loaded
    check_outputs({"--out": out, "--junit": junit, "--markdown": markdown},
                  {"--model": settings.model, "--baseline": settings.baseline, "--dataset": settings.dataset,
                   "--config": settings.source})
    check_step_summary()
    settings.policy.check(has_baseline=settings.baseline is not None)  # before loading anything
    base = load_baseline(settings.baseline) if settings.baseline else None
    data, net, info = load_data_and_model(settings.dataset, settings.split,
                                          Path(settings.model) if settings.model else None, data_root, download,
                                          trust_model, arch, arch_kwargs, normalize)
    result = run_gate(net, data, settings.policy, baseline=base, **settings.evaluation(), batch_size=batch_size,
                      device=device, progress=True, model_name=info.source)
    if base is not None:
        result.baseline = settings.baseline
    report = result.to_dict()
    report["config"] = settings.source
    write_json(out, report)
    table = result.markdown()
    if junit:
        write_text(junit, result.junit_xml())
    if markdown:
        write_text(markdown, table)
    summary = append_step_summary(table)
    for note in result.warnings:
        typer.echo(f"warning: {note}", err=True)
    print_gate(result)
    written = ", ".join(str(p) for p in (out, junit, markdown, summary) if p is not None)
    Console().print(f"wrote {written} in {result.report.seconds:.1f} s")
    if not result.passed:
        raise typer.Exit(1)


def print_gate(result: GateResult) -> None:
    from rich.console import Console
    from rich.table import Table

    conf = f"{100 * result.confidence:g}%"
    report = result.report
    table = Table(title=f"dltest gate: {result.model} on {report.n} of {report.pool_size} inputs of "
                        f"{report.dataset}/{report.split}, seed {report.seed}")
    for column, justify in (("bar", "left"), ("measured", "right"), (f"{conf} interval", "right"),
                            ("decided on", "right"), ("result", "left")):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    for bar in result.bars:
        low, high = bar.interval
        table.add_row(bar.name, f"{100 * bar.estimate:.2f}% ({bar.correct}/{bar.n})",
                      f"{100 * low:.2f}-{100 * high:.2f}%", bar.decided_on,
                      "[green]pass[/]" if bar.passed else "[bold red]FAIL[/]")
    console = Console()
    console.print(table)
    worst = report.worst_case
    if worst is not None and not any(bar.figure == worst.attack for bar in result.bars):
        console.print(f"{worst.label}: {100 * worst.robust_accuracy:.2f}% ({worst.robust_correct}/{worst.n}) "
                      "robust to every attack (no bar)")
    rules = dict.fromkeys(bar.rule for bar in result.bars)
    for rule in rules:
        console.print(f"rule: {rule}")
    verdict = "[green]passed[/]" if result.passed else f"[bold red]failed[/] ({len(result.failures)} of {len(result.bars)} bars)"
    console.print(f"gate {verdict}")
