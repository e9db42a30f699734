"""``dltest robust-al``: budgeted training from scratch with robust (or standard) active learning."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from dltest.cli.app import app
from dltest.cli.defaults import ARCHITECTURES, AT_METHODS
from dltest.cli.options import DataRoot, Dataset, Device, Download, Seed
from dltest.errors import DltestError

if TYPE_CHECKING:  # for type hints only: the commands import these when they run
    from dltest.workflows.robust_al import StageRecord


@app.command("robust-al")
def robust_al_command(
    metric: Annotated[str, typer.Option("--metric", "--metrics", help="Acquisition metric, or several comma-separated (each from the same initial model).")] = "dre",
    sampling: Annotated[Optional[str], typer.Option("--sampling", help="Every metric (each must rank scores): draw each stage's batch at random with probabilities from the scores (power, softmax or rank; Kirsch et al. 2023) instead of taking the top scores; the run names it, e.g. entropy+power.", show_default=False)] = None,
    temperature: Annotated[Optional[float], typer.Option("--temperature", help="With --sampling: T > 0; small T approaches the top scores, large T a uniform draw [default: 1].", show_default=False)] = None,
    dataset: Dataset = "mnist",
    arch: Annotated[Optional[str], typer.Option(help=f"One of {', '.join(ARCHITECTURES)} (default: the paper's model for the dataset), or your module:Class / file.py:Class returning logits (imported, so that module or file is executed).", show_default=False)] = None,
    arch_kwargs: Annotated[Optional[str], typer.Option(help="JSON keyword arguments of a module:Class architecture.", show_default=False)] = None,
    budget: Annotated[Optional[int], typer.Option(help="Final labeled-pool size (default: Table 3's, 5000 for MNIST).", show_default=False)] = None,
    initial: Annotated[Optional[int], typer.Option(help="Random initial labeled pool (default: Table 3's, 200 for MNIST).", show_default=False)] = None,
    per_stage: Annotated[Optional[int], typer.Option(help="Inputs labeled per stage (default: Table 3's, 200 for MNIST).", show_default=False)] = None,
    epochs: Annotated[int, typer.Option(help="Training epochs per stage (the best kept on the val half).")] = 10,
    initial_epochs: Annotated[int, typer.Option(help="Standard-training epochs of the initial model.")] = 30,
    at: Annotated[str, typer.Option(help=f"Adversarial training: {', '.join(AT_METHODS)} (pgd: the paper's protocol; the single-step ones are faster but masked gradients on small pools, see docs/adversarial-training.md).")] = "pgd",
    standard: Annotated[bool, typer.Option("--standard", help="Standard active learning (no adversarial training; the paper's Table 1).")] = False,
    eps: Annotated[Optional[str], typer.Option(help="Linf radius of training and evaluation (default: 0.3 grey, 8/255 colour).", show_default=False)] = None,
    steps: Annotated[Optional[int], typer.Option(help="Inner steps of pgd/trades (default: the preset's, 40 on grey images; --steps 4 --alpha 0.1875: the fast mode, 1/8 of the time, see docs/adversarial-training.md).", show_default=False)] = None,
    alpha: Annotated[Optional[float], typer.Option(help="Step size of the adversarial training (absolute for pgd/trades, a multiple of eps for fgsm-rs/n-fgsm).", show_default=False)] = None,
    warmup_epochs: Annotated[Optional[float], typer.Option(help="Epochs over which eps ramps up in the first adversarial stage (default: 3 grey, 0 colour).", show_default=False)] = None,
    optimizer: Annotated[str, typer.Option(help="sgd or adam.")] = "adam",
    lr: Annotated[float, typer.Option(help="Peak learning rate (one-cycle per stage).")] = 5e-3,
    batch_size: Annotated[int, typer.Option(min=1)] = 128,
    eval_attacks: Annotated[Optional[str], typer.Option(help="Attacks evaluated on the holdout half after every stage (default: the dataset's per-stage attack: pgd; apgd-square for fashion-mnist, where PGD-50 overstates robustness).", show_default=False)] = None,
    final_attacks: Annotated[str, typer.Option(help="Attacks evaluated only on the final models, e.g. autoattack.")] = "",
    eval_n: Annotated[int, typer.Option(help="Seeded holdout subset evaluated per stage.")] = 1000,
    val_n: Annotated[int, typer.Option(help="Val inputs that pick each stage's best epoch.")] = 500,
    train_size: Annotated[Optional[int], typer.Option(help="Use a seeded random subset of the training split of this size as the unlabeled pool.", show_default=False)] = None,
    seed: Seed = 0,
    out: Annotated[Path, typer.Option(help="Run folder, new or empty (log.jsonl, summary.json, figure.png, final models); a folder holding other files is refused.")] = Path("robust-al-run"),
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --out from its last finished stage.")] = False,
    data_root: DataRoot = None,
    download: Download = False,
    device: Device = None,
) -> None:
    """Train from scratch on a labeling budget: select, label, adversarially train, stage by stage."""
    from dltest.attacks import parse_attack_list, parse_eps
    from dltest.zoo import parse_arch_kwargs, resolve_arch
    from dltest.data import BUILTINS, load_dataset
    from dltest.progress import console as err_console
    from dltest.workflows.robust_al import preset, robust_active_learning
    from rich.console import Console
    from rich.table import Table

    metrics = tuple(m.strip() for m in metric.split(",") if m.strip())
    config = preset(
        dataset.lower() if dataset.lower() in BUILTINS else dataset, metrics=metrics, arch=arch, arch_kwargs=parse_arch_kwargs(arch_kwargs, "--arch-kwargs"), budget=budget, initial=initial, per_stage=per_stage,
        epochs=epochs, initial_epochs=initial_epochs, at=None if standard else at, eps=parse_eps(eps),
        at_steps=steps, at_alpha=alpha,
        warmup_epochs=warmup_epochs, optimizer=optimizer, lr=lr, batch_size=batch_size,
        eval_attacks=tuple(parse_attack_list(eval_attacks)) if eval_attacks is not None else None,
        final_attacks=tuple(parse_attack_list(final_attacks)) if final_attacks.strip() else (),
        eval_n=eval_n, val_n=val_n, train_size=train_size, seed=seed,
        metric_options={k: v for k, v in (("sampling", sampling), ("temperature", temperature)) if v is not None},
    )
    if arch is not None:
        resolve_arch(arch)  # a bad name or module is a one-line error before any data is loaded
    if not out.parent.is_dir():
        raise DltestError(f"cannot write {out}: folder {out.parent} does not exist")
    load = dict(root=data_root, download=download or None)
    train_data = load_dataset(dataset, "train", **load)
    val_data = load_dataset(dataset, "val", **load)
    holdout = load_dataset(dataset, "holdout", **load)
    kind = "standard" if standard else f"robust ({at})"
    names = [config.label(m) for m in metrics]
    intro = (f"{kind} active learning on {train_data.name}: {', '.join(names)}, {config.initial} -> "
             f"{config.budget} labeled in {config.stages} stages of {config.per_stage}, seed {seed}")
    with StageView(config.stages) as view:
        result = robust_active_learning(config, train_data=train_data, val_data=val_data, holdout=holdout,
                                        run_dir=out, resume=resume, device=device, on_stage=view.update,
                                        on_start=lambda: err_console.print(intro))
    table = Table(title=f"{kind} active learning on {train_data.name}, seed {seed}: last stage (holdout, "
                        f"{config.eval_n} inputs)")
    for col in ("metric", "labeled", "clean"):
        table.add_column(col, justify="right")
    summary = result.summary()
    attacks = list(next(iter(summary["final"].values()))["robust_accuracy"])
    for name in attacks:
        table.add_column(name, justify="right")
    table.add_column("time", justify="right")
    for m, final in summary["final"].items():
        seconds = sum(summary["seconds"][m].values())
        table.add_row(m, str(final["labeled"]), f"{100 * final['clean_accuracy']:.2f}%",
                      *[f"{100 * final['robust_accuracy'][a]:.2f}%" for a in attacks], f"{seconds:.0f} s")
    Console().print(table)
    Console().print(f"wrote {out}/ (log.jsonl, summary.json, figure.png, {', '.join(m + '.pt' for m in names)})")


class StageView:
    """The latest stage of every metric: a live table on a terminal, one plain line per stage
    elsewhere (CI logs)."""

    def __init__(self, stages: int):
        from rich.live import Live

        from dltest.progress import console

        self.stages = stages
        self.latest: dict[str, StageRecord] = {}
        self.console = console
        self.live = Live(console=console, refresh_per_second=2) if console.is_terminal else None

    def __enter__(self) -> "StageView":
        if self.live is not None:
            self.live.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.live is not None:
            self.live.__exit__(*exc)

    def update(self, record: StageRecord) -> None:
        self.latest[record.metric] = record
        if self.live is None:
            self.console.print(_line(record), highlight=False)
            return
        from rich.table import Table

        table = Table(title="robust active learning")
        for col in ("metric", "stage", "labeled", "clean", *record.robust_accuracy, "bias (entropy)", "stage time"):
            table.add_column(col, justify="right")
        for r in self.latest.values():
            table.add_row(r.metric, f"{r.stage}/{self.stages}", str(r.labeled), f"{100 * r.clean_accuracy:.2f}%",
                          *[f"{100 * v:.2f}%" for v in r.robust_accuracy.values()],
                          f"{r.bias['entropy']:.3f}" if r.bias else "-", f"{sum(r.seconds.values()):.1f} s")
        self.live.update(table)


def _line(record: StageRecord) -> str:
    robust = " ".join(f"{a} {100 * v:.2f}%" for a, v in record.robust_accuracy.items())
    bias = f" bias(entropy) {record.bias['entropy']:.3f}" if record.bias else ""
    note = f" [{record.stopped_early}]" if record.stopped_early else ""
    return (f"{record.metric} stage {record.stage}: {record.labeled} labeled, clean {100 * record.clean_accuracy:.2f}%, "
            f"{robust}{bias}, {sum(record.seconds.values()):.1f} s{note}")
