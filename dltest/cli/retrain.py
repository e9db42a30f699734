"""``dltest retrain``: select -> attack -> retrain -> before/after on the holdout half (Section 8)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from dltest.cli.app import app, robustness_warnings_as_lines
from dltest.cli.options import (
    Arch, ArchKwargs, Normalize,
    Alpha, DataRoot, Dataset, Device, Download, Eps, ModelPath, Queries, Seed, Steps, TrustModel,
    load_data_and_model,
)
from dltest.errors import DltestError
from dltest.cli.defaults import RETRAIN_LR

POOL_SPLITS = ("val", "train")


@app.command("retrain")
def retrain_command(
    metric: Annotated[str, typer.Option(help="The metric that selects from the pool; `dltest metrics` lists them.")] = "dre",
    budget: Annotated[str, typer.Option("--budget", "-b", help="How many pool inputs: a count or a share (1%..10% in the paper).")] = "4%",
    dataset: Dataset = "mnist",
    model: ModelPath = None,
    pool_split: Annotated[str, typer.Option(help="Candidate pool: val (default, the test half not used for reporting) or train.")] = "val",
    selection: Annotated[Optional[Path], typer.Option(help="Use this selection JSON of the pool instead of selecting.")] = None,
    examples: Annotated[Optional[Path], typer.Option(help="Use these adversarial examples (.npz from `dltest attack`) instead of selecting and attacking.")] = None,
    attack: Annotated[str, typer.Option(help="Attack that turns the selected inputs into adversarial examples.")] = "pgd",
    eps: Eps = None,
    steps: Steps = None,
    alpha: Alpha = None,
    queries: Queries = None,
    eval_attacks: Annotated[str, typer.Option(help="Attacks for the before/after robustness on the holdout half, comma-separated.")] = "pgd",
    eval_eps: Annotated[Optional[str], typer.Option(help="eps of the evaluation attacks (default: the preset's).")] = None,
    eval_steps: Annotated[Optional[int], typer.Option(help="Steps of the evaluation PGD (default: the preset's).")] = None,
    eval_n: Annotated[Optional[int], typer.Option(help="Evaluate on a seeded subset of the holdout half of this size.")] = None,
    val_n: Annotated[int, typer.Option(help="Pool inputs on which PGD robust accuracy picks the best epoch.")] = 1000,
    epochs: Annotated[Optional[int], typer.Option(help="Retraining epochs (default: 10, 20 for SVHN).")] = None,
    lr: Annotated[float, typer.Option(help="Peak learning rate (SGD, one-cycle).")] = RETRAIN_LR,
    batch_size: Annotated[int, typer.Option(min=1, help="Training and attack batch size.")] = 128,
    train_size: Annotated[Optional[int], typer.Option(min=1, help="Retrain on a seeded random subset of the training split of this size.")] = None,
    seed: Seed = 0,
    out: Annotated[Path, typer.Option(help="Checkpoint of the retrained model.")] = Path("retrained.pt"),
    report: Annotated[Optional[Path], typer.Option(help="JSON report (default: <out>.json).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the retraining from <out>.partial.")] = False,
    data_root: DataRoot = None,
    download: Download = False,
    device: Device = None,
    trust_model: TrustModel = False,
    arch: Arch = None,
    arch_kwargs: ArchKwargs = None,
    normalize: Normalize = None,
) -> None:
    """Retrain a model on the training data plus adversarial examples of selected inputs."""
    from dltest.attacks import attack_preset, check_attack_name, load_adversarial, parse_attack_list, parse_eps, takes
    from dltest.io import check_outputs, write_json
    from dltest.resume import discard, partial_path
    from dltest.selection import load_selection
    from dltest.workflows.retrain import check_retrain_settings, retrain, retrain_config, retrain_data
    from rich.console import Console

    # Every setting is checked before anything is trained or written.
    if pool_split not in POOL_SPLITS:
        raise DltestError(f"--pool-split must be one of {', '.join(POOL_SPLITS)} (disjoint from the holdout half), got {pool_split!r}")
    if selection and examples:
        raise DltestError("give --selection or --examples, not both")
    selecting = {} if selection or examples else {"metric": metric, "budget": budget}
    check_retrain_settings(seed=seed, eval_n=eval_n, val_n=val_n, batch_size=batch_size, device=device, **selecting)
    check_attack_name(attack)
    eps_value = parse_eps(eps)
    eval_names = parse_attack_list(eval_attacks)
    eval_eps_value = parse_eps(eval_eps)
    report = report or out.with_suffix(".json")
    check_outputs({"--out": out, "--report": report, "the partial state": partial_path(out)},
                  {"--model": model, "--dataset": dataset, "--selection": selection, "--examples": examples})

    pool, net, info = load_data_and_model(dataset, pool_split, model, data_root, download, trust_model,
                                          arch, arch_kwargs, normalize)
    config = retrain_config(pool.name, pool.input_shape[0], epochs=epochs, batch_size=batch_size, lr=lr, seed=seed)
    spec = attack_preset(attack, pool.name, "train", channels=pool.input_shape[0], eps=eps_value, steps=steps,
                         alpha=alpha, queries=queries, seed=seed)
    eval_specs = [
        attack_preset(name, pool.name, "eval", channels=pool.input_shape[0], eps=eval_eps_value,
                      steps=eval_steps if takes(name, "steps") else None, seed=seed)
        for name in eval_names
    ]
    if eval_steps is not None and not any(takes(name, "steps") for name in eval_names):
        raise DltestError(f"--eval-steps applies to none of the attacks {', '.join(eval_names)}")
    chosen = load_selection(str(selection), pool) if selection else None
    ready = load_adversarial(examples, pool) if examples else None
    if ready is not None:
        ready.meta["file"] = str(examples)
    train_data, holdout = retrain_data(dataset, train_size, seed, root=data_root, download=download or None)

    with robustness_warnings_as_lines():
        result = retrain(
            net, train_data=train_data, pool=pool, holdout=holdout, metric=metric, budget=budget, attack=spec,
            eval_attacks=eval_specs, config=config, seed=seed, eval_n=eval_n, val_n=val_n, selection=chosen,
            examples=ready, device=device, batch_size=batch_size, progress=True, state_path=partial_path(out),
            resume=resume,
        )
    result.settings.update({"model": info.source, "model_info": info.describe(),
                            "selection_file": str(selection) if selection else None,
                            "examples_file": str(examples) if examples else None})
    result.save(out, info)
    discard(partial_path(out))
    data = result.to_dict()
    write_json(report, {"checkpoint": str(out), **data})
    _print(data, result)
    Console().print(f"wrote {out} and {report}")


def _print(data, result) -> None:
    from rich.console import Console
    from rich.table import Table

    s = data["settings"]
    source = f"{s['metric']} selection of {s['budget']}" if s["metric"] else f"{s['budget']} given examples"
    table = Table(title=f"retrain on {s['dataset']}: {source} from {s['pool_split']}, seed {s['seed']} "
                        f"(holdout, {result.before.n} inputs)")
    table.add_column("")
    table.add_column("clean", justify="right")
    names = [o.attack for o in result.before.attacks]
    for name in names:
        table.add_column(name, justify="right")
    for label, part in (("before", data["before"]), ("after", data["after"])):
        table.add_row(label, f"{100 * part['clean_accuracy']:.2f}%",
                      *[f"{100 * part['robust_accuracy'][n]:.2f}%" for n in names])
    gain = data["gain"]
    table.add_row("gain", f"{100 * gain['clean_accuracy']:+.2f}", *[f"{100 * gain['robust_accuracy'][n]:+.2f}" for n in names])
    Console().print(table)
