"""``dltest train``: train a zoo model on a dataset and write a self-describing checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import torch
import typer
from rich.console import Console
from rich.table import Table

from dltest.checkpoint import save_checkpoint
from dltest.cli.app import app
from dltest.attacks import attack_preset, parse_eps
from dltest.cli.options import Alpha, DataRoot, Dataset, Device, Download, Eps, Seed, Steps
from dltest.data import load_dataset
from dltest.errors import DltestError
from dltest.io import check_outputs, write_json
from dltest.training import DEFAULT_AUGMENT, TrainConfig, accuracy, train
from dltest.zoo import ARCHITECTURES, default_arch, model_for_dataset


@app.command("train")
def train_command(
    dataset: Dataset = "mnist",
    arch: Annotated[Optional[str], typer.Option(help=f"One of {', '.join(ARCHITECTURES)} (default: the paper's model for the dataset).")] = None,
    epochs: Annotated[int, typer.Option(min=1)] = 20,
    batch_size: Annotated[int, typer.Option(min=1)] = 128,
    lr: Annotated[float, typer.Option(help="Peak learning rate (SGD, one-cycle schedule).")] = 0.05,
    augment: Annotated[Optional[str], typer.Option(help="none, crop or crop-flip (default: per dataset).")] = None,
    train_size: Annotated[Optional[int], typer.Option(min=1, help="Train on a seeded random subset of this size.")] = None,
    seed: Seed = 0,
    out: Annotated[Path, typer.Option(help="Checkpoint to write.")] = Path("model.pt"),
    report: Annotated[Optional[Path], typer.Option("--report", help="JSON report (default: <out>.json).")] = None,
    resume: Annotated[bool, typer.Option(help="Continue from <out>.partial if an earlier run stopped.")] = False,
    adversarial: Annotated[bool, typer.Option("--adversarial", help="Madry PGD adversarial training (SPEC §2 preset; the paper's 'full' baseline); best epoch by PGD robust accuracy on the val half.")] = False,
    eps: Eps = None,
    steps: Steps = None,
    alpha: Alpha = None,
    data_root: DataRoot = None,
    download: Download = False,
    device: Device = None,
) -> None:
    """Train a model (standard, or adversarial with --adversarial); the best epoch on the val half is kept."""
    eps_value = parse_eps(eps)
    if not adversarial and (eps is not None or steps is not None or alpha is not None):
        raise DltestError("--eps, --steps and --alpha set the PGD of adversarial training: add --adversarial")
    report = report or out.with_suffix(".json")
    check_outputs({"--out": out, "--report": report, "the partial state": Path(f"{out}.partial")}, {"--dataset": dataset})
    config = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, seed=seed,
                         augment=augment or DEFAULT_AUGMENT.get(dataset, "none"))
    train_data = load_dataset(dataset, "train", root=data_root, download=download or None)
    val_data = load_dataset(dataset, "val", root=data_root, download=download or None)
    holdout = load_dataset(dataset, "holdout", root=data_root, download=download or None)
    if train_size:
        pick = torch.randperm(len(train_data), generator=torch.Generator().manual_seed(seed))[:train_size]
        train_data = train_data.subset(pick.sort().values)
    torch.manual_seed(seed)
    arch_name = arch or default_arch(train_data.name, train_data.input_shape)
    model = model_for_dataset(train_data.name, arch_name, train_data.num_classes, train_data.input_shape)
    pgd = None
    if adversarial:
        pgd = attack_preset("pgd", train_data.name, "train", channels=train_data.input_shape[0], eps=eps_value,
                            steps=steps, alpha=alpha, seed=seed)
    result = train(model, train_data, val_data, config, adversary=pgd.adversary() if pgd else None, device=device,
                   state_path=f"{out}.partial", resume=resume)
    test_acc = accuracy(result.model, holdout, device=device)
    adv_info = {}
    if pgd:
        adv_info = {"adversarial": pgd.to_dict(),
                    "holdout_robust_accuracy": accuracy(result.model, holdout, device=device, adversary=pgd.adversary())}
    meta = {"command": "dltest train", "config": config.__dict__, "train_size": len(train_data),
            "best_epoch": result.best_epoch, "val_accuracy": result.best_score, "holdout_accuracy": test_acc, **adv_info}
    save_checkpoint(result.model.cpu(), out, arch=arch_name, dataset=train_data.name,
                    input_shape=train_data.input_shape, num_classes=train_data.num_classes, meta=meta)
    Path(f"{out}.partial").unlink(missing_ok=True)
    write_json(report, {"dataset": train_data.name, "arch": arch_name, "seed": seed, "checkpoint": str(out),
                        "holdout_accuracy": test_acc, **adv_info, **result.summary(), "config": config.__dict__})
    kind = f", adversarial: {pgd.label}" if pgd else ""
    table = Table(title=f"{arch_name} on {train_data.name} ({len(train_data)} training inputs, seed {seed}{kind})")
    cols = ("best epoch", "val robust accuracy" if pgd else "val accuracy", "holdout accuracy")
    cols += ("holdout robust accuracy",) if pgd else ()
    for col in cols + ("time",):
        table.add_column(col, justify="right")
    robust = (f"{100 * adv_info['holdout_robust_accuracy']:.2f}%",) if pgd else ()
    table.add_row(str(result.best_epoch + 1), f"{100 * result.best_score:.2f}%", f"{100 * test_acc:.2f}%", *robust,
                  f"{result.seconds:.0f} s")
    Console().print(table)
    Console().print(f"wrote {out} and {report}")
