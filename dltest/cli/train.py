"""``dltest train``: train a zoo model on a dataset and write a self-describing checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from dltest.cli.app import app
from dltest.cli.defaults import ARCHITECTURES, AT_METHODS
from dltest.cli.options import DataRoot, Dataset, Device, Download, Seed, Steps
from dltest.errors import DltestError


@app.command("train")
def train_command(
    dataset: Dataset = "mnist",
    arch: Annotated[Optional[str], typer.Option(help=f"One of {', '.join(ARCHITECTURES)} (default: the paper's model for the dataset).")] = None,
    epochs: Annotated[int, typer.Option(min=1)] = 20,
    batch_size: Annotated[int, typer.Option(min=1)] = 128,
    optimizer: Annotated[Optional[str], typer.Option(help="sgd or adam (default: sgd; adam for adversarial training on grey images).", show_default=False)] = None,
    lr: Annotated[Optional[float], typer.Option(help="Peak learning rate of the one-cycle schedule (default: 0.05 sgd; 5e-3 adam; 0.1 for adversarial training on colour images).", show_default=False)] = None,
    augment: Annotated[Optional[str], typer.Option(help="none, crop or crop-flip (default: per dataset).", show_default=False)] = None,
    init: Annotated[Optional[Path], typer.Option(help="Start from this dltest checkpoint's weights (fine-tune, e.g. harden a standard model with --at).", show_default=False)] = None,
    train_size: Annotated[Optional[int], typer.Option(min=1, help="Train on a seeded random subset of this size.", show_default=False)] = None,
    seed: Seed = 0,
    out: Annotated[Path, typer.Option(help="Checkpoint to write.")] = Path("model.pt"),
    report: Annotated[Optional[Path], typer.Option("--report", help="JSON report (default: <out>.json).", show_default=False)] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from <out>.partial if an earlier run stopped.")] = False,
    at: Annotated[Optional[str], typer.Option(help=f"Adversarial training: {', '.join(AT_METHODS)}; best epoch by PGD robust accuracy on the val half.", show_default=False)] = None,
    adversarial: Annotated[bool, typer.Option("--adversarial", help="Same as --at pgd (Madry PGD, SPEC §2 preset: the paper's 'full' baseline).")] = False,
    eps: Annotated[Optional[str], typer.Option(help="Linf radius of adversarial training, a number or a fraction like 8/255 (default: 0.3 grey, 8/255 colour).", show_default=False)] = None,
    steps: Steps = None,
    alpha: Annotated[Optional[float], typer.Option(help="Step size: absolute for pgd/trades, a multiple of eps for fgsm-rs (1.25) and n-fgsm (1.0).", show_default=False)] = None,
    warmup_epochs: Annotated[Optional[float], typer.Option(help="Epochs over which eps ramps up from 0 (default: 3 grey, 0 colour).", show_default=False)] = None,
    beta: Annotated[Optional[float], typer.Option(help="trades: weight of the robustness term [default: 6].", show_default=False)] = None,
    eval_n: Annotated[int, typer.Option(help="Seeded holdout inputs for the final PGD robust accuracy.")] = 1000,
    data_root: DataRoot = None,
    download: Download = False,
    device: Device = None,
) -> None:
    """Train a model (standard, or adversarial with --at); the best epoch on the val half is kept."""
    from dltest.attacks import parse_eps
    from dltest.io import check_outputs, write_json
    from dltest.resume import partial_path
    from dltest.workflows.pretrain import pretrain
    from rich.console import Console
    from rich.table import Table

    if adversarial and at not in (None, "pgd"):
        raise DltestError(f"--adversarial means --at pgd; it contradicts --at {at}")
    at = "pgd" if adversarial else at
    at_options = {k: v for k, v in dict(eps=parse_eps(eps), steps=steps, alpha=alpha, warmup_epochs=warmup_epochs,
                                        beta=beta).items() if v is not None}
    if at is None and at_options:
        raise DltestError("--eps, --steps, --alpha, --warmup-epochs and --beta set adversarial training: add --at METHOD")
    report_path = report or out.with_suffix(".json")
    check_outputs({"--out": out, "--report": report_path, "the partial state": partial_path(out)},
                  {"--dataset": dataset, "--init": init})
    result = pretrain(dataset, epochs=epochs, batch_size=batch_size, optimizer=optimizer, lr=lr, augment=augment,
                      seed=seed, at=at, at_options=at_options, arch=arch, init=init, train_size=train_size, eval_n=eval_n,
                      out=out, resume=resume, data_root=data_root, download=download or None, device=device)
    write_json(report_path, result.report)
    method = result.report["adversarial"]
    kind = f", adversarial: {method['method']} eps {method['eps']:g}" if method else ""
    table = Table(title=f"{result.arch} on {result.report['dataset']} ({result.report['train_size']} training "
                        f"inputs, seed {seed}{kind})")
    cols = ("best epoch", "val robust accuracy" if method else "val accuracy", "holdout accuracy")
    cols += (f"holdout PGD robust accuracy ({result.report['holdout_robust_n']} inputs)",) if method else ()
    for col in cols + ("time",):
        table.add_column(col, justify="right")
    robust = (f"{100 * result.holdout_robust_accuracy:.2f}%",) if method else ()
    table.add_row(str(result.training.best_epoch + 1), f"{100 * result.training.best_score:.2f}%",
                  f"{100 * result.holdout_accuracy:.2f}%", *robust, f"{result.training.seconds:.0f} s")
    Console().print(table)
    if result.training.stopped_early:
        Console(stderr=True).print(f"note: {result.training.stopped_early}")
    Console().print(f"wrote {out} and {report_path}")
