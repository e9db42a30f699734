"""``dltest analyze``: the paper's analyses of selections and robust active-learning runs.

- ``bias``: how far a selection's entropy, gini, lc, margin and label distributions lie from its
  pool's (JSD base 2, in [0, 1]); for a run folder, the bias its log recorded at every stage.
- ``correlation``: per stage, Pearson r across functions between bias and robust accuracy,
  with the paper's Figure 3 heat map as PNG.
- ``compare``: Wilcoxon signed-rank tests between functions over paired robust accuracies.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer

from dltest.header import output_header
from dltest.cli.defaults import BINS, INFERENCE_BATCH
from dltest.cli.app import app, flag, flags
from dltest.cli.options import BatchSize, DataRoot, Device, Download, TrustModel, load_data_and_model
from dltest.errors import DltestError

if TYPE_CHECKING:  # for type hints only: the commands import these when they run
    from dltest.analysis.runs import Run
    from rich.console import Console

analyze_app = typer.Typer(
    help="Analyses of selections and robust active-learning runs: selection bias, bias-robustness "
         "correlation, Wilcoxon comparisons.",
    no_args_is_help=True,
)
app.add_typer(analyze_app, name="analyze")

RunFolders = Annotated[list[Path], typer.Argument(help="robust-al run folders (one per seed), of one dataset.",
                                                  show_default=False)]
Attacks = Annotated[Optional[str], typer.Option("--attacks", help="Comma-separated attacks to use (default: every attack in the runs).")]
NoPlot = Annotated[bool, typer.Option("--no-plot", help="Write no PNG.")]


@analyze_app.command("bias")
def bias_command(
    source: Annotated[Path, typer.Argument(help="A selection JSON (from dltest select) or a robust-al run folder.",
                                           show_default=False)],
    model: Annotated[Optional[Path], typer.Option("--model", "-m", help="Selection: the model that scores the pool (default: the one the selection names, else the dataset's bundled model).")] = None,
    dataset: Annotated[Optional[str], typer.Option("--dataset", "-d", help="Selection: the pool's dataset (default: the one the selection names).")] = None,
    split: Annotated[Optional[str], typer.Option(help="Selection: the pool's split (default: the one the selection names, else test).")] = None,
    labeled: Annotated[Optional[Path], typer.Option(help="Selection: a selection JSON of the inputs that were already labeled, i.e. left out of the pool.")] = None,
    bins: Annotated[int, typer.Option(min=2, help="Histogram bins.")] = BINS,
    out: Annotated[Optional[Path], typer.Option(help="JSON output (default: bias-<name>.json); a run's PNG goes beside it.")] = None,
    no_plot: NoPlot = False,
    data_root: DataRoot = None,
    download: Download = False,
    device: Device = None,
    batch_size: BatchSize = INFERENCE_BATCH,
    trust_model: TrustModel = False,
) -> None:
    """Selection bias (JSD base 2) of entropy, gini, lc, margin and label: selected set vs pool."""
    from dltest.analysis.runs import load_run, run_bias_report
    from dltest.io import check_outputs, write_json
    from rich.console import Console

    out = out or Path(f"bias-{source.stem if source.is_file() else source.resolve().name}.json")
    check_outputs({"--out": out}, {"SOURCE": source, "--model": model, "--dataset": dataset, "--labeled": labeled})
    if source.is_dir():
        _refuse_writing_into_runs(_with_figure(out, no_plot), [source])
        given = [name for name, value in (("--model", model), ("--dataset", dataset), ("--split", split),
                                          ("--labeled", labeled)) if value is not None]
        if given:
            raise DltestError(f"{', '.join(given)} only apply to a selection file; {source} is a run folder")
        run = load_run(source)
        report = run_bias_report(run)
        _print_run_bias(report)
        if not no_plot:
            from dltest.analysis.plots import bias_by_stage

            report["figure"] = str(bias_by_stage(run.records, out.with_suffix(".png"),
                                                 title=f"selection bias, {report['dataset']}, seed {report['seed']}"))
    else:
        report = _selection_bias(source, model, dataset, split, labeled, bins, data_root, download, device,
                                 batch_size, trust_model)
        _print_selection_bias(report)
    write_json(out, report)
    Console().print(f"wrote {out}" + (f" and {report['figure']}" if report.get("figure") else ""))


@analyze_app.command("correlation")
def correlation_command(
    runs: RunFolders,
    attacks: Attacks = None,
    out: Annotated[Path, typer.Option(help="JSON output; the heat map goes beside it as PNG.")] = Path("correlation.json"),
    no_plot: NoPlot = False,
) -> None:
    """Per stage, Pearson r across functions between selection bias and robust accuracy (Figure 3)."""
    from dltest.analysis.compare import bias_robustness_correlations, ordered_characteristics
    from dltest.analysis.runs import all_records, load_runs
    from dltest.io import check_writable, write_json
    from rich.table import Table

    out = check_writable(out)
    _refuse_writing_into_runs(_with_figure(out, no_plot), runs)
    loaded = load_runs(runs)
    correlations = bias_robustness_correlations(all_records(loaded), _names(attacks, "--attacks"))
    report = {**_header("analyze correlation", loaded), "correlations": [vars(c) for c in correlations]}
    if not no_plot:
        from dltest.analysis.plots import correlation_heatmap

        report["figure"] = str(correlation_heatmap(correlations, out.with_suffix(".png"),
                                                   title=f"{report['dataset']}: bias vs robustness, seeds {', '.join(map(str, report['seed']))}"))
    console = _console()
    for attack in dict.fromkeys(c.attack for c in correlations):
        cells = [c for c in correlations if c.attack == attack]
        characteristics = ordered_characteristics({c.characteristic for c in cells})
        table = Table(title=f"Pearson r, bias vs robust accuracy under {attack} (n = functions)")
        table.add_column("stage", justify="right")
        table.add_column("n", justify="right")
        for c in characteristics:
            table.add_column(c, justify="right")
        for stage in sorted({c.stage for c in cells}):
            row = {c.characteristic: c for c in cells if c.stage == stage}
            n = max(len(c.functions) for c in row.values())
            table.add_row(str(stage), str(n), *(_r_cell(row[c].r) if c in row else "" for c in characteristics))
        defined = {c: [x.r for x in cells if x.characteristic == c and x.r is not None] for c in characteristics}
        table.add_row("mean", "", *(f"{sum(v) / len(v):+.2f}" if v else "-" for v in defined.values()),
                      end_section=True)
        console.print(table)
    write_json(out, report)
    console.print(f"wrote {out}" + (f" and {report['figure']}" if report.get("figure") else ""))


@analyze_app.command("compare")
def compare_command(
    runs: RunFolders,
    metrics: Annotated[Optional[str], typer.Option("--metrics", help="A,B: test A against B; A,B,C,...: A against each of the others (default: the two metrics the runs hold, e.g. RUN_A of dre and RUN_B of random).",
                                                   show_default=False)] = None,
    alpha: Annotated[float, typer.Option(help="Significance level.")] = 0.05,
    attacks: Attacks = None,
    out: Annotated[Optional[Path], typer.Option(help="JSON output (default: compare-<A>-<B>.json).")] = None,
) -> None:
    """Wilcoxon signed-rank test between functions' robust accuracies, paired by seed, stage, attack."""
    from dltest.analysis.compare import compare_functions
    from dltest.analysis.runs import all_records, load_runs
    from dltest.io import check_writable, write_json
    from rich.table import Table

    if not 0 < alpha < 1:
        raise DltestError(f"--alpha must lie in (0, 1), got {alpha}")
    if out:
        check_writable(out)
        _refuse_writing_into_runs({"--out": out}, runs)
    loaded = load_runs(runs)
    names = _names(metrics, "--metrics") or _two_metrics(loaded)
    out = check_writable(out or Path(f"compare-{'-'.join(names)}.json"))
    _refuse_writing_into_runs({"--out": out}, runs)
    comparisons = compare_functions(all_records(loaded), names, _names(attacks, "--attacks"), alpha)
    report = {**_header("analyze compare", loaded), "alpha": alpha, "attacks": _names(attacks, "--attacks"),
              "comparisons": [c.to_dict() for c in comparisons]}
    console = _console()
    table = Table(title=f"Wilcoxon signed-rank, robust accuracy paired by (seed, stage, attack), alpha {alpha:g}")
    for column in ("A", "B", "pairs", "mean A", "mean B", "median A-B", "p-value", "verdict"):
        table.add_column(column, justify="left" if column in ("A", "B", "verdict") else "right")
    for c in comparisons:
        table.add_row(c.metric_a, c.metric_b, str(c.pairs), f"{c.mean_a:.4f}", f"{c.mean_b:.4f}",
                      f"{c.median_difference:+.4f}", f"{c.p_value:.3g}",
                      ("[bold]" if c.significant else "") + c.verdict + (f" ({c.note})" if c.note else ""))
    console.print(table)
    write_json(out, report)
    console.print(f"wrote {out}")


def _with_figure(out: Path, no_plot: bool) -> dict[str, Path]:
    """The outputs of a command that writes ``out`` and, unless ``no_plot``, a PNG beside it."""
    return {"--out": out} if no_plot else {"--out": out, "its figure": out.with_suffix(".png")}


def _refuse_writing_into_runs(outputs: dict[str, Path], runs: list[Path]) -> None:
    """An analysis never writes inside a run folder it reads: it would overwrite (or shadow) the
    run's own files (log.jsonl, summary.json, figure.png, its models)."""
    folders = {os.path.realpath(run): run for run in runs if run.is_dir()}
    for option, path in outputs.items():
        where = Path(os.path.realpath(path)).parent
        for real, run in folders.items():
            if where == Path(real) or Path(real) in where.parents:
                raise DltestError(f"{option} {path} lies inside the input run folder {run}; write it elsewhere "
                                  "(an analysis never changes the runs it reads)")


# --- bias of a selection ------------------------------------------------------------------------


def _selection_bias(path: Path, model, dataset, split, labeled, bins, data_root, download, device, batch_size,
                    trust) -> dict[str, Any]:
    """The pool and model a selection file names (or the flags), then the library's report."""
    from dltest.analysis.bias import selection_bias_report
    from dltest.selection import load_selection

    selection = load_selection(str(path))
    dataset = dataset or selection.dataset
    if not dataset:
        raise DltestError(f"{path} names no dataset: pass --dataset")
    split = split or selection.split or "test"
    if model is None and selection.model:
        model = Path(selection.model)
        if not model.is_file():
            raise DltestError(f"the model {model} named by {path} is not there: pass --model")
    done = load_selection(str(labeled)) if labeled is not None else None
    data, net, info = load_data_and_model(dataset, split, model, data_root, download, trust)
    with flags(data="--dataset/--split"):  # the library names its parameters, the user knows the flags
        report = selection_bias_report(net, data, selection, labeled=done, bins=bins, batch_size=batch_size,
                                       device=device, progress=True, source=str(path), model_name=info.source)
    if report["note"]:
        report["note"] = report["note"].replace("pass labeled", f"pass {flag('labeled')}")
    return report


def _print_selection_bias(report: dict[str, Any]) -> None:
    from rich.table import Table

    console = _console()
    table = Table(title=f"bias of {report['metric']} ({report['selected']} of {report['pool_size']} inputs, "
                        f"{report['dataset']}/{report['split']}): JSD base 2, 0 = the pool's distribution")
    table.add_column("characteristic")
    table.add_column("JSD", justify="right")
    for name, value in report["bias"].items():
        table.add_row(name, f"{value:.4f}")
    console.print(table)
    if report.get("note"):
        console.print(f"note: {report['note']}")


# --- bias recorded in a run ---------------------------------------------------------------------


def _print_run_bias(report: dict[str, Any]) -> None:
    from dltest.analysis.bias import CHARACTERISTICS
    from dltest.analysis.compare import ordered_characteristics
    from rich.table import Table

    rows = [r for r in report["records"] if r["bias"]]
    characteristics = ordered_characteristics({c for r in rows for c in r["bias"]}) or list(CHARACTERISTICS)
    table = Table(title=f"selection bias per stage, {report['dataset']}, seed {report['seed']} (JSD base 2)")
    for column in ("metric", "stage", "labeled", *characteristics):
        table.add_column(column, justify="left" if column == "metric" else "right")
    previous = None
    for r in sorted(rows, key=lambda r: (r["metric"], r["stage"])):
        table.add_row(r["metric"] if r["metric"] != previous else "", str(r["stage"]), str(r["labeled"] or ""),
                      *(f"{r['bias'][c]:.4f}" if c in r["bias"] else "-" for c in characteristics),
                      end_section=False)
        previous = r["metric"]
    _console().print(table)


# --- shared ------------------------------------------------------------------------------------


def _header(command: str, runs: list[Run]) -> dict[str, Any]:
    seeds = sorted({r["seed"] for run in runs for r in run.records})
    return output_header(command, seeds, runs=[str(r.path) for r in runs], dataset=runs[0].config.get("dataset"))


def _two_metrics(runs: list[Run]) -> list[str]:
    found = list(dict.fromkeys(m for run in runs for m in run.metrics))
    if len(found) != 2:
        raise DltestError(f"the runs hold {len(found)} metrics ({', '.join(found)}): choose with --metrics A,B")
    return found


def _names(value: str | None, flag: str) -> list[str] | None:
    if value is None:
        return None
    names = [v.strip() for v in value.split(",") if v.strip()]
    if not names:
        raise DltestError(f"{flag} is empty: give comma-separated names")
    return names


def _console() -> Console:
    from rich.console import Console

    return Console(width=max(Console().width, 120))  # wide tables stay readable in pipes and logs


def _r_cell(r: float | None) -> str:
    if r is None:
        return "-"
    colour = "red" if r <= -0.5 else "green" if r >= 0.5 else ""
    return f"[{colour}]{r:+.2f}[/{colour}]" if colour else f"{r:+.2f}"
