"""``dltest attack``: the adversarial versions of a selection, written to an ``.npz``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from dltest.cli.app import app
from dltest.header import output_header
from dltest.cli.options import (
    Arch, ArchKwargs, Normalize,
    Alpha, AttackBatch, DataRoot, Dataset, Device, Download, Eps, ModelPath, Queries, Seed, Steps, TrustModel,
    load_data_and_model,
)
from dltest.errors import DltestError


@app.command("attack")
def attack_command(
    selection: Annotated[Optional[Path], typer.Option(help="A selection JSON from `dltest select`; default: every input of the split.")] = None,
    attack: Annotated[str, typer.Option(help="pgd, fgsm, square, autoattack, autoattack-fast, deepfool or apgd-square.")] = "pgd",
    purpose: Annotated[str, typer.Option(help="Preset to start from: train (PGD for (re)training) or eval.")] = "train",
    dataset: Dataset = "mnist",
    split: Annotated[Optional[str], typer.Option(help="The pool the selection indexes (default: the selection's split, else val).")] = None,
    model: ModelPath = None,
    eps: Eps = None,
    steps: Steps = None,
    alpha: Alpha = None,
    queries: Queries = None,
    seed: Seed = 0,
    out: Annotated[Path, typer.Option(help="The .npz to write: x (N,H,W,C float in [0,1]), y, indices, source_index, predictions, settings.")] = Path("adversarial.npz"),
    report: Annotated[Optional[Path], typer.Option(help="JSON summary (default: <out>.json).")] = None,
    batch_size: AttackBatch = 256,
    data_root: DataRoot = None,
    download: Download = False,
    device: Device = None,
    trust_model: TrustModel = False,
    arch: Arch = None,
    arch_kwargs: ArchKwargs = None,
    normalize: Normalize = None,
) -> None:
    """Generate adversarial examples from selected inputs, for `dltest retrain` or your own use."""
    from dltest.attacks import attack_preset, check_attack_request, generate_adversarial
    from dltest.io import check_outputs, read_json, write_json
    from dltest.runtime import check_seed, resolve_device
    from dltest.selection import load_selection
    from rich.console import Console
    from rich.table import Table

    # the library's own checks (attack, purpose, eps, overrides, seed, device), before loading anything
    check_attack_request(attack, purpose, eps=eps, alpha=alpha, steps=steps, queries=queries)
    check_seed(seed)
    resolve_device(device)
    if out.suffix != ".npz":
        raise DltestError(f"--out must end in .npz, got {out}")
    report = report or out.with_suffix(".json")
    check_outputs({"--out": out, "--report": report}, {"--model": model, "--dataset": dataset, "--selection": selection})
    if split is None:
        raw = read_json(selection) if selection else {}
        split = raw.get("split") if isinstance(raw, dict) and raw.get("split") else "val"
    data, net, info = load_data_and_model(dataset, split, model, data_root, download, trust_model,
                                          arch, arch_kwargs, normalize)
    spec = attack_preset(attack, data.name, purpose, channels=data.input_shape[0], eps=eps, steps=steps,
                         alpha=alpha, queries=queries, seed=seed)
    chosen = load_selection(str(selection), data) if selection else None
    examples = generate_adversarial(net, data, chosen.indices if chosen else None, spec, seed=seed,
                                    batch_size=batch_size, device=device, progress=True)
    examples.meta.update({"model": info.source, "selection": str(selection) if selection else None,
                          "metric": chosen.metric if chosen else None})
    examples.save(out)
    clean_acc = float((examples.clean_pred == examples.y).float().mean())
    adv_acc = float((examples.adv_pred == examples.y).float().mean())
    write_json(report, {
        **output_header("attack", seed), "out": str(out), "dataset": data.name, "split": data.split,
        "model": info.source, "model_info": info.describe(), "selection": str(selection) if selection else None, "n": len(examples),
        "attack": spec.to_dict(), "batch_size": batch_size, "clean_accuracy": clean_acc, "robust_accuracy": adv_acc,
        "success_rate": examples.success_rate,
    })
    table = Table(title=f"{spec.label} on {len(examples)} inputs of {data.name}/{data.split} (seed {seed})")
    for col in ("accuracy before", "accuracy after", "attack success"):
        table.add_column(col, justify="right")
    table.add_row(f"{100 * clean_acc:.2f}%", f"{100 * adv_acc:.2f}%", f"{100 * examples.success_rate:.2f}%")
    Console().print(table)
    Console().print(f"wrote {out} and {report}")
