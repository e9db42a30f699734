"""``dltest select``: rank a pool with a metric (an acquisition function) and write the selection."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from dltest.cli.app import app
from dltest.cli.options import (
    Arch, ArchKwargs, Normalize,
    BatchSize, DataRoot, Dataset, Device, Download, ModelPath, Seed, Split, TrustModel, load_data_and_model,
)
from dltest.cli.defaults import INFERENCE_BATCH
from dltest.errors import DltestError

if TYPE_CHECKING:  # for type hints only: the commands import these when they run
    from dltest.selection import SelectionResult


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
    arch: Arch = None,
    arch_kwargs: ArchKwargs = None,
    normalize: Normalize = None,
    sampling: Annotated[Optional[str], typer.Option("--sampling", help="Any score-based metric: draw the batch at random with probabilities from the scores (power, softmax or rank; Kirsch et al. 2023) instead of taking the top scores.", show_default=False)] = None,
    temperature: Annotated[Optional[float], typer.Option("--temperature", help="With --sampling: T > 0; small T approaches the top scores, large T a uniform draw [default: 1].", show_default=False)] = None,
    reference_split: Annotated[Optional[str], typer.Option("--reference-split", help="dsa, lsa, mdsa: the split of the dataset the model was trained on (train).", show_default=False)] = None,
    reference: Annotated[Optional[Path], typer.Option("--reference", help="dsa, lsa, mdsa: the training data as an .npz file or image folder (instead of --reference-split).", show_default=False)] = None,
    reference_size: Annotated[Optional[int], typer.Option("--reference-size", help="dsa, lsa, mdsa: size of the seeded random subsample of the reference [default: 10000].", show_default=False)] = None,
    reference_seed: Annotated[Optional[int], typer.Option("--reference-seed", help="dsa, lsa, mdsa: seed of that subsample [default: 0].", show_default=False)] = None,
    layer: Annotated[Optional[str], typer.Option("--layer", help="dsa, lsa, mdsa: the module whose activations are compared (a name from model.named_modules()) [default: penultimate].", show_default=False)] = None,
    var_threshold: Annotated[Optional[float], typer.Option("--var-threshold", help="lsa: neurons whose variance is below this in any class's reference are left out of every class (sadl's rule) [default: 1e-5].", show_default=False)] = None,
    mc_samples: Annotated[Optional[int], typer.Option("--mc-samples", help="bald, dropout-entropy, batchbald: T, the number of MC-dropout samples [default: 10].", show_default=False)] = None,
    dropout: Annotated[Optional[float], typer.Option("--dropout", help="bald, dropout-entropy, batchbald: rate of the dropout put before the final linear layer of a model without dropout [default: 0.1].", show_default=False)] = None,
    joint_samples: Annotated[Optional[int], typer.Option("--joint-samples", help="batchbald: label configurations enumerated, then sampled, for the joint entropy [default: 1000].", show_default=False)] = None,
    max_memory_mb: Annotated[Optional[float], typer.Option("--max-memory-mb", help="batchbald: bound on its working memory [default: 1024].", show_default=False)] = None,
    candidate_factor: Annotated[Optional[float], typer.Option("--candidate-factor", help="dfal: DeepFool runs on a random subset of min(factor x budget, pool) inputs; batchbald: chooses among the factor x budget inputs of highest BALD [default: 10].", show_default=False)] = None,
    ats_upper: Annotated[Optional[float], typer.Option("--ats-upper", help="ats: inputs with top probability >= this are confident and come last [default: 0.99].", show_default=False)] = None,
    ats_radius: Annotated[Optional[float], typer.Option("--ats-radius", help="ats: coverage radius per unit of distance from the class corner [default: 0.005].", show_default=False)] = None,
    ats_threshold: Annotated[Optional[float], typer.Option("--ats-threshold", help="ats: smallest coverage gain of a greedy pick [default: 0.001].", show_default=False)] = None,
    overshoot: Annotated[Optional[float], typer.Option("--overshoot", help="dfal: DeepFool overshoot [default: 0.02].", show_default=False)] = None,
    deepfool_steps: Annotated[Optional[int], typer.Option("--deepfool-steps", help="dfal: most DeepFool iterations per input [default: 50].", show_default=False)] = None,
    egl_variant: Annotated[Optional[str], typer.Option("--egl-variant", help="egl: 'exact' (gradient over all trainable parameters) or 'last-layer' [default: exact].", show_default=False)] = None,
) -> None:
    """Select the inputs most worth labeling or testing."""
    from dltest.data import load_dataset
    from dltest.io import check_outputs
    from dltest.selection import check_request, load_selection, select

    options = metric_options(
        metric,
        {
            "--reference-size": ("reference_size", reference_size),
            "--reference-seed": ("reference_seed", reference_seed),
            "--layer": ("layer", layer),
            "--var-threshold": ("var_threshold", var_threshold),
            "--mc-samples": ("samples", mc_samples),
            "--dropout": ("dropout", dropout),
            "--joint-samples": ("joint_samples", joint_samples),
            "--max-memory-mb": ("max_memory_mb", max_memory_mb),
            "--candidate-factor": ("candidate_factor", candidate_factor),
            "--ats-upper": ("upper", ats_upper),
            "--ats-radius": ("radius", ats_radius),
            "--ats-threshold": ("threshold", ats_threshold),
            "--overshoot": ("overshoot", overshoot),
            "--deepfool-steps": ("steps", deepfool_steps),
            "--egl-variant": ("variant", egl_variant),
        },
    )
    if sampling is not None or temperature is not None:
        options.update(sampling=sampling, temperature=temperature)
    if reference_split is not None and reference is not None:
        raise DltestError("give either --reference-split or --reference, not both")
    # the library's own checks (metric, options, budget, seed, device, reference), before loading anything
    check_request(metric, budget, seed=seed, device=device,
                  reference=reference_split is not None or reference is not None, **options)
    out = out or Path(f"selection-{metric}-{budget.strip().replace('%', 'pct')}.json")
    check_outputs({"--out": out, "--csv": csv_path}, {"--model": model, "--dataset": dataset, "--labeled": labeled,
                                                        "--reference": reference})
    data, net, info = load_data_and_model(dataset, split, model, data_root, download, trust_model,
                                          arch, arch_kwargs, normalize, need_labels=False)
    labeled_indices = load_selection(str(labeled), data).indices if labeled else None
    reference_data = None
    if reference is not None:
        reference_data = load_dataset(str(reference), "all")
    elif reference_split is not None:
        reference_data = load_dataset(dataset, reference_split, root=data_root, download=download or None)
    result = select(
        metric, budget, model=net, data=data, seed=seed, labeled=labeled_indices, device=device,
        batch_size=batch_size, progress=True, model_name=info.source, reference=reference_data, **options,
    )
    result.model_info = info.describe()
    result.save(str(out))
    if csv_path:
        _write_csv(csv_path, result)
    print_summary(result, out)


def metric_options(metric: str, flags: dict[str, tuple[str, object]]) -> dict[str, object]:
    """The metric options the user set (flag -> (option, value or None)); a flag the metric
    does not take is a one-line error."""
    from dltest.selectors import REGISTRY, get_selector

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
    from rich.console import Console
    from rich.table import Table

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
    from dltest.io import atomic_path

    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["rank", "index", result.score_name or "score"])
        scores = result.scores or [None] * len(result.indices)
        writer.writerows((rank, index, score) for rank, (index, score) in enumerate(zip(result.indices, scores)))
