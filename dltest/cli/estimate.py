"""``dltest estimate``: a model's accuracy (and robust accuracy) on an unlabeled pool from few labels.

- ``dltest estimate plan --budget 200 -d pool.npz -m model.pt --design active --out plan.json
  --csv to-label.csv``: one inference pass, a seeded draw, the labeling sheet; with
  ``--attacks pgd``, first an attack over the whole pool with the predicted labels (no labels,
  one attack pass) whose survival flags make a better robust-accuracy estimate.
- ``dltest estimate --plan plan.json --labels to-label.csv --out estimate.json [--attacks pgd]``:
  the estimate with its 95% interval, the effective sample size and the labels a simple random
  sample would have needed for the same width.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer

from dltest.cli.app import app, robustness_warnings_as_lines
from dltest.cli.options import (
    Arch, ArchKwargs, BatchSize, DataRoot, Dataset, Device, Download, ModelPath, Normalize, Seed, Split, TrustModel,
    load_data_and_model,
)
from dltest.errors import DltestError
from dltest.cli.defaults import DESIGNS, INFERENCE_BATCH, SCORES

if TYPE_CHECKING:  # for type hints only: the commands import these when they run
    from dltest.estimation import EstimateResult, EstimationPlan

POOL_LABELS = "pool"

estimate_app = typer.Typer(
    help="Estimate accuracy (and robust accuracy) on an unlabeled pool from few labels, with 95% intervals: "
         "'dltest estimate plan' draws the inputs to label; 'dltest estimate --plan P --labels L' estimates.",
    invoke_without_command=True,
)
app.add_typer(estimate_app, name="estimate")


@estimate_app.command("plan")
def plan_command(
    budget: Annotated[str, typer.Option("--budget", "-b", help="How many inputs to label: a count (200) or a share of the pool (4%).")] = "200",
    design: Annotated[str, typer.Option("--design", help=f"Sampling design: {', '.join(DESIGNS)}.")] = "active",
    score: Annotated[str, typer.Option("--score", help=f"importance: the uncertainty score the draw follows ({', '.join(SCORES)}).")] = "entropy",
    strata: Annotated[Optional[int], typer.Option("--strata", help="stratified: number of confidence strata (default 5).", show_default=False)] = None,
    uniform_share: Annotated[Optional[float], typer.Option("--uniform-share", help="importance, active: share of the uniform in the draw probability, in (0, 1]; bounds the weights by 1/share (default 0.5).", show_default=False)] = None,
    proportional_share: Annotated[Optional[float], typer.Option("--proportional-share", help="stratified: share of the budget allocated proportionally, the rest Neyman (default 0.5).", show_default=False)] = None,
    attacks: Annotated[Optional[str], typer.Option("--attacks", help="Plan-time attacks (comma-separated presets) run over the WHOLE pool with the model's predicted labels: no labels, but one attack pass over the pool per attack. Whether each prediction survives makes the robust figures' surrogate (confidence x survived), and the active and importance draws then aim at robust accuracy too; 'dltest estimate --attacks' then takes these attacks or a subset.", show_default=False)] = None,
    eps: Annotated[Optional[str], typer.Option(help="--attacks: Linf radius (default: the dataset's preset).", show_default=False)] = None,
    steps: Annotated[Optional[int], typer.Option(help="--attacks: attack iterations (default: the preset's).", show_default=False)] = None,
    alpha: Annotated[Optional[float], typer.Option(help="--attacks: PGD step size (default: the preset's).", show_default=False)] = None,
    attack_restarts: Annotated[Optional[str], typer.Option("--attack-restarts", help="--attacks: run each plan-time attack this many times (1 to 9; default 3, or 1 when no attack has a random start) with the seeds seed, seed+1, ...; the surrogate then uses the share of runs each prediction survived, at that many times the attack's cost. An attack without a random start (fgsm, deepfool) runs once: its runs would agree.", show_default=False)] = None,
    dataset: Dataset = "mnist",
    split: Split = "test",
    model: ModelPath = None,
    seed: Seed = 0,
    out: Annotated[Path, typer.Option(help="The plan (JSON).")] = Path("plan.json"),
    csv_path: Annotated[Optional[Path], typer.Option("--csv", help="The labeling sheet: index, source, probability, draws, and an empty label column.", show_default=False)] = None,
    data_root: DataRoot = None,
    download: Download = False,
    device: Device = None,
    batch_size: BatchSize = INFERENCE_BATCH,
    trust_model: TrustModel = False,
    arch: Arch = None,
    arch_kwargs: ArchKwargs = None,
    normalize: Normalize = None,
) -> None:
    """Draw the inputs to label (seeded, with known probabilities) and write the plan and the sheet.
    With --attacks, first attack the whole pool with the predicted labels (costs an attack pass
    over the pool, no labels) for a better robust-accuracy estimate."""
    from dltest.attacks import parse_attack_list, parse_eps
    from dltest.cli.app import flags
    from dltest.estimation import plan
    from dltest.estimation.planning import check_plan_request
    from dltest.io import check_outputs

    options = {key: value for key, value in (("strata", strata), ("uniform_share", uniform_share),
                                             ("proportional_share", proportional_share)) if value is not None}
    names = parse_attack_list(attacks) if attacks else []
    restarts = None if attack_restarts is None else _parse_restarts(attack_restarts)
    with flags():  # the library's checks, before anything is loaded
        check_plan_request(design, budget, score=score, attacks=names, eps=eps, steps=steps, alpha=alpha,
                           attack_restarts=restarts, device=device, **options)
    eps_value = parse_eps(eps)
    check_outputs({"--out": out, "--csv": csv_path}, {"--model": model, "--dataset": dataset})
    data, net, info = load_data_and_model(dataset, split, model, data_root, download, trust_model, arch, arch_kwargs,
                                          normalize, need_labels=False)
    with robustness_warnings_as_lines():
        drawn = plan(net, data, design=design, budget=budget, seed=seed, score=score, batch_size=batch_size,
                     device=device, progress=True, model_name=info.source, attacks=names, eps=eps_value, steps=steps,
                     alpha=alpha, attack_restarts=restarts, **options)
    drawn.model = info.describe()
    drawn.model_path = str(model) if model else None
    drawn.save(out)
    if csv_path:
        drawn.write_sheet(csv_path)
    _print_plan(drawn, out, csv_path)


def _parse_restarts(text: str) -> int:
    from dltest.estimation.planning import MAX_ATTACK_RESTARTS, check_attack_restarts

    try:
        value = int(text.strip())
    except ValueError:
        raise DltestError(f"--attack-restarts {text!r}: give a whole number from 1 to {MAX_ATTACK_RESTARTS}") from None
    try:
        return check_attack_restarts(value)
    except DltestError:
        raise DltestError(f"--attack-restarts {text}: give a whole number from 1 to {MAX_ATTACK_RESTARTS}") from None


def _print_plan(drawn: EstimationPlan, out: Path, sheet: Path | None) -> None:
    from rich.console import Console

    console = Console()
    distinct = len(drawn.labels_needed)
    console.print(f"{drawn.design}: {drawn.budget} draws, {distinct} inputs to label, of {drawn.pool_size} "
                  f"({drawn.dataset}/{drawn.split}, seed {drawn.seed})")
    if drawn.strata_sizes:
        counts = [drawn.strata.count(h) for h in range(len(drawn.strata_sizes))] if drawn.strata else []
        console.print("strata by confidence (size: labels): "
                      + ", ".join(f"{n}: {k}" for n, k in zip(drawn.strata_sizes, counts)))
    for note in drawn.notes:
        if note.startswith("interval will not be valid"):
            console.print(f"[bold red]{note}[/]")
        elif note.startswith("plan-time attacks"):
            console.print(note)
    console.print(f"wrote {out}" + (f" and the sheet {sheet} (fill in its label column)" if sheet else "")
                  + f" in {drawn.seconds:.2f} s")


@estimate_app.callback()
def estimate_command(
    ctx: typer.Context,
    plan_path: Annotated[Optional[Path], typer.Option("--plan", help="The plan from 'dltest estimate plan'.", show_default=False)] = None,
    labels: Annotated[Optional[str], typer.Option("--labels", help="The labels: the sheet's CSV (index, label), an .npz (index and label, or y), or 'pool' for the labels of the plan's dataset (experiments).", show_default=False)] = None,
    out: Annotated[Optional[Path], typer.Option(help="The estimate (JSON), default estimate.json.", show_default=False)] = None,
    attacks: Annotated[Optional[str], typer.Option("--attacks", help="Also robust accuracy under these attacks (comma-separated), run on the labeled inputs only (with their given labels). A plan made with --attacks takes those attacks or a subset, run with the plan's settings.", show_default=False)] = None,
    confidence: Annotated[float, typer.Option("--confidence", help="Confidence of the two-sided interval.")] = 0.95,
    model: Annotated[Optional[Path], typer.Option("--model", "-m", help="--attacks: the plan's model (default: the one the plan names).", show_default=False)] = None,
    dataset: Annotated[Optional[str], typer.Option("--dataset", "-d", help="--attacks or --labels pool: the plan's pool (default: the one the plan names).", show_default=False)] = None,
    split: Annotated[Optional[str], typer.Option("--split", help="The pool's split (default: the plan's).", show_default=False)] = None,
    eps: Annotated[Optional[str], typer.Option(help="--attacks: Linf radius (default: the dataset's preset).", show_default=False)] = None,
    steps: Annotated[Optional[int], typer.Option(help="--attacks: attack iterations (default: the preset's).", show_default=False)] = None,
    alpha: Annotated[Optional[float], typer.Option(help="--attacks: PGD step size (default: the preset's).", show_default=False)] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Attack batch size.")] = 256,
    data_root: DataRoot = None,
    download: Download = False,
    device: Device = None,
    trust_model: TrustModel = False,
    arch: Arch = None,
    arch_kwargs: ArchKwargs = None,
    normalize: Normalize = None,
) -> None:
    """Estimate accuracy on the plan's pool from its labels (subcommand 'plan' draws the inputs to label)."""
    from dltest.attacks import parse_attack_list, parse_eps
    from dltest.estimation import estimate, load_plan, read_label_file
    from dltest.estimation.estimating import check_plan_attacks
    from dltest.io import check_outputs, write_json
    from dltest.runtime import resolve_device

    if ctx.invoked_subcommand is not None:
        given = [flag for flag, value in (("--plan", plan_path), ("--labels", labels), ("--out", out),
                                          ("--attacks", attacks)) if value is not None]
        if given:
            raise DltestError(f"{', '.join(given)} belong to 'dltest estimate', not to 'dltest estimate plan'")
        return
    if plan_path is None or labels is None:
        raise DltestError("give --plan PLAN.json and --labels LABELS.csv (or 'dltest estimate plan ...' to make a plan)")
    out = out or Path("estimate.json")
    names = parse_attack_list(attacks) if attacks else []
    eps_value = parse_eps(eps)
    if not names and (eps is not None or steps is not None or alpha is not None):
        raise DltestError("--eps, --steps and --alpha set the attacks: give --attacks too")
    resolve_device(device)
    label_file = None if labels == POOL_LABELS else Path(labels)
    check_outputs({"--out": out}, {"--plan": plan_path, "--labels": label_file, "--model": model, "--dataset": dataset})
    drawn = load_plan(plan_path)
    check_plan_attacks(drawn, names, eps_value, steps, alpha)  # before loading the model: refuse mismatches
    given = read_label_file(label_file) if label_file is not None else None
    net = data = None
    if names or given is None:
        data, net = _plan_pool(drawn, names, model, dataset, split, data_root, download, trust_model,
                               arch, arch_kwargs, normalize)
    if given is None:
        data.require_labels("--labels pool")
        given = data.y.numpy()
    with robustness_warnings_as_lines():
        result = estimate(drawn, given, model=net, data=data, attacks=names, confidence=confidence,
                          batch_size=batch_size, device=device, progress=True, eps=eps_value, steps=steps, alpha=alpha,
                          labels_name=labels)
    write_json(out, result.to_dict())
    _print_estimate(result, out)


def _plan_pool(drawn: EstimationPlan, attacks: list[str], model: Path | None, dataset: str | None, split: str | None,
               data_root: Path | None, download: bool, trust_model: bool, arch: str | None = None,
               arch_kwargs: str | None = None, normalize: str | None = None):
    """The plan's pool (and its model when attacks need it, loaded as the plan's was: give the same
    --arch / --normalize)."""
    from dltest.data import load_dataset

    name, part = dataset or drawn.dataset, split or drawn.split
    if not attacks:
        data = load_dataset(name, part, root=data_root, download=download or None)
        if len(data) != drawn.pool_size:
            raise DltestError(f"{name}/{part} has {len(data)} inputs, the plan's pool {drawn.pool_size}: give the plan's pool")
        return data, None
    path = model or (Path(drawn.model_path) if drawn.model_path else None)
    data, net, _ = load_data_and_model(name, part, path, data_root, download, trust_model, arch, arch_kwargs,
                                       normalize, need_labels=False)
    return data, net


def _print_estimate(result: EstimateResult, out: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    conf = f"{100 * result.figures[0].confidence:g}%"
    table = Table(title=f"dltest estimate: {result.design} on {result.dataset}/{result.split} "
                        f"({result.pool_size} inputs), seed {result.seed}")
    for column, justify in (("figure", "left"), ("estimate", "right"), (f"{conf} interval", "right"),
                            ("labels", "right"), ("effective n", "right"), ("SRS labels, same width", "right")):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    for f in result.figures:
        table.add_row(f.figure, f"{100 * f.estimate:.2f}%", f"{100 * f.low:.2f}-{100 * f.high:.2f}%", str(f.labeled),
                      "-" if f.effective_sample_size is None else f"{f.effective_sample_size:.0f}",
                      "-" if f.srs_labels is None else str(f.srs_labels))
    console = Console()
    console.print(table)
    for f in result.figures:
        if f.surrogate_a is not None:
            console.print(f"{f.figure}: surrogate h = a g + b (f - g) with a = {f.surrogate_a:.3f} "
                          f"(on {f.surrogate_a_draws:g} right draws that survived at plan time), b = {f.surrogate_b:.3f} "
                          f"(on {f.surrogate_b_draws:g} right draws broken at plan time)")
    console.print(f"interval: {result.interval}")
    if not result.valid:
        console.print(f"[bold red]interval not valid:[/] {result.invalid_reason}; the gate refuses this estimate")
    console.print(f"wrote {out} in {result.seconds:.2f} s")


# --- dltest gate --estimate ----------------------------------------------------------------------


def gate_on_estimate(path: Path, policy: Any, out: Path) -> None:
    """``dltest gate --estimate``: decide the minimums on the estimate's interval, write ``out``,
    print the bars; exit 1 when one fails."""
    from dltest.estimation.gating import decide_on_estimate, estimate_gate_report, load_estimate
    from dltest.io import check_outputs, write_json
    from rich.console import Console
    from rich.table import Table

    check_outputs({"--out": out}, {"--estimate": path})
    data = load_estimate(path)
    bars = decide_on_estimate(data, policy)
    report = estimate_gate_report(bars, data, str(path))
    write_json(out, report)
    console = Console()
    table = Table(title=f"dltest gate on the estimate {path} ({data.get('design')}, {data.get('dataset')})")
    for column in ("bar", "estimate", "interval", "result"):
        table.add_column(column)
    for bar in bars:
        table.add_row(bar.name, f"{100 * bar.estimate:.2f}%", f"{100 * bar.low:.2f}-{100 * bar.high:.2f}%",
                      "[green]pass[/]" if bar.passed else "[bold red]FAIL[/]")
    console.print(table)
    for rule in dict.fromkeys(bar.rule for bar in bars):
        console.print(f"rule: {rule}")
    console.print(f"gate {'[green]passed[/]' if report['passed'] else '[bold red]failed[/]'}; wrote {out}")
    if not report["passed"]:
        raise typer.Exit(1)

