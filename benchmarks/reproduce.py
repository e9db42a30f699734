"""Reproduce the paper's central results and write them, beside the paper's, to docs/results.md.

    DLTEST_DATA=../shared/datasets python benchmarks/reproduce.py --quick     # a first look (MNIST, small)
    DLTEST_DATA=../shared/datasets python benchmarks/reproduce.py             # the full protocol (GPU)
    python benchmarks/reproduce.py --size smoke --runs /tmp/r --report /tmp/r/results.md   # the test's size

Parts, each for every dataset of the size:
1. robust active learning (Table 3 schedule, every acquisition function, one run folder per seed;
   a function with stochastic sampling, e.g. entropy with power sampling, gets a run folder of its
   own per seed, ``<dataset>-seed<N>-entropy-power``, with the same schedule, seed, initial model
   and evaluation inputs, so that its figures pair with the others');
2. standard active learning, the same loop without adversarial training (Table 1);
3. test selection and retraining at 1 % and 4 % of the validation half (Section 8), from the
   bundled standard-trained model.
Then the analyses (``dltest analyze``): the final-stage table beside SPEC §7's figures, Wilcoxon
tests of DRE and of random against every other function (and of each sampled function against
its top-score version), selection bias and its Pearson correlation with robustness per stage,
and the figures.

Resumable: every run lives under ``--runs``; a rerun skips finished runs, resumes robust-al runs
from their last finished stage, and rebuilds the report from what is there. Uses CUDA when
present (``--device`` to choose). Text below the line ``<!-- notes -->`` of an existing report
is kept: that is where the differences from the paper are explained by hand.
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dltest import __version__, load_dataset, load_model
from dltest.analysis.compare import bias_robustness_correlations, compare_functions, ordered_characteristics, stage_means
from dltest.analysis.runs import all_records, load_run
from dltest.errors import DltestError
from dltest.workflows.robust_al import stage_attack
from dltest.io import atomic_path, read_json, write_json
from dltest.settings import default_device
from dltest.workflows.robust_al import finished_metrics, preset, robust_active_learning

ALL_METRICS = ("random", "entropy", "deepgini", "lc", "margin", "mcp", "bald", "dropout-entropy", "egl", "dfal",
               "coreset", "dre")
UNCERTAINTY = ("entropy", "deepgini", "lc")
NOTES_MARKER = "<!-- notes -->"

# SPEC §7 (the paper's Table 5): last-stage accuracy / robustness under AutoAttack, in %.
PAPER = {
    "mnist": {"random": (98.30, 63.85), "deepgini": (98.41, 51.23), "mcp": (98.71, 51.71), "dre": (98.59, 67.69),
              "full data (adversarial training)": (98.69, 76.17)},
    "fashion-mnist": {"random": (72.61, 31.90), "deepgini": (65.93, 18.08), "mcp": (73.41, 19.02),
                      "dre": (73.79, 33.79), "full data (adversarial training)": (72.55, 34.06)},
}


@dataclass(frozen=True)
class Size:
    """How much of the protocol to run. ``schedule`` None: Table 3's (budget, initial, per stage)."""

    name: str
    datasets: tuple[str, ...]
    metrics: tuple[str, ...]
    seeds: tuple[int, ...]
    schedule: tuple[int, int, int] | None
    epochs: int
    initial_epochs: int
    at: str  # the adversarial-training method of the robust runs
    at_steps: int | None  # its inner PGD steps and step size (None: the SPEC §2 training preset, 40 of 0.01)
    at_alpha: float | None
    eval_attacks: tuple[str, ...] | None  # per-stage attacks; None: the dataset profile's (apgd-square on Fashion-MNIST)
    final_attacks: tuple[str, ...]
    eval_n: int | None
    val_n: int
    train_size: int | None
    standard_metrics: tuple[str, ...]
    standard_seeds: tuple[int, ...]
    retrain_metrics: tuple[str, ...]
    retrain_budgets: tuple[str, ...]
    retrain_seeds: tuple[int, ...]
    retrain_epochs: int | None  # None: Section 8's 10
    retrain_train_size: int | None
    retrain_eval_n: int | None
    extra: dict[str, Any] = field(default_factory=dict)
    sampled: tuple[tuple[str, str], ...] = ()  # (function, sampling): robust-al runs of their own, e.g. entropy+power


SIZES = {
    # The paper's protocol: Table 3 schedules, all 12 functions, 3 seeds, PGD-40 adversarial training,
    # AutoAttack on the final models. Meant for a GPU.
    "full": Size("full", ("mnist", "fashion-mnist"), ALL_METRICS, (0, 1, 2), None, epochs=10, initial_epochs=30,
                 at="pgd", at_steps=None, at_alpha=None, eval_attacks=None, final_attacks=("autoattack",),
                 eval_n=None, val_n=500, train_size=None, standard_metrics=ALL_METRICS, standard_seeds=(0, 1, 2), retrain_metrics=ALL_METRICS,
                 retrain_budgets=("1%", "4%"), retrain_seeds=(0, 1, 2), retrain_epochs=None,
                 retrain_train_size=None, retrain_eval_n=None),
    # The part of the full protocol that fits a 2-core CPU in about two hours: MNIST's Table 3 schedule
    # (200 -> 5000 in 24 stages of 10 warm-started epochs), DRE, random and DeepGini, 3 seeds, AutoAttack
    # on the final models; PGD-5 of 0.15 instead of PGD-40 of 0.01 (docs/adversarial-training.md: 0.5
    # AutoAttack points apart at 6/41 of the cost) and 500 holdout inputs instead of 5000.
    "cpu": Size("cpu", ("mnist",), ("random", "deepgini", "dre"), (0, 1, 2), None, epochs=10, initial_epochs=30,
                at="pgd", at_steps=5, at_alpha=0.15, eval_attacks=None, final_attacks=("autoattack",), eval_n=500,
                val_n=500, train_size=None, standard_metrics=(), standard_seeds=(), retrain_metrics=(),
                retrain_budgets=(), retrain_seeds=(), retrain_epochs=None, retrain_train_size=None,
                retrain_eval_n=None),
    # Issue 17's CPU table: the "cpu" size for all 12 functions of the paper plus BADGE, BatchBALD and
    # entropy with power sampling (Kirsch et al. 2023), the first robust-AL comparison of newer functions
    # (about 25-30 min of one core per function and seed).
    "cpu-all": Size("cpu-all", ("mnist",), ALL_METRICS + ("badge", "batchbald"), (0, 1, 2), None, epochs=10,
                    initial_epochs=30, at="pgd", at_steps=5, at_alpha=0.15, eval_attacks=None,
                    final_attacks=("autoattack",), eval_n=500, val_n=500, train_size=None, standard_metrics=(),
                    standard_seeds=(), retrain_metrics=(), retrain_budgets=(), retrain_seeds=(), retrain_epochs=None,
                    retrain_train_size=None, retrain_eval_n=None, sampled=(("entropy", "power"),)),
    # Issue 17's Fashion-MNIST part: the "cpu" size on Fashion-MNIST's Table 3 schedule (200 -> 6000 in
    # 29 stages), DRE, random and DeepGini; per stage the profile's apgd-square (PGD-50 overstates
    # Fashion's robustness by about 33 points against AutoAttack; apgd-square by 1.7, at about 37 s per
    # 500 inputs here). About 35 min of one core per function and seed, plus AutoAttack (about 6 min).
    "cpu-fashion": Size("cpu-fashion", ("fashion-mnist",), ("random", "deepgini", "dre"), (0, 1, 2), None, epochs=10,
                        initial_epochs=30, at="pgd", at_steps=5, at_alpha=0.15, eval_attacks=None,
                        final_attacks=("autoattack",), eval_n=500, val_n=500, train_size=None, standard_metrics=(),
                        standard_seeds=(), retrain_metrics=(), retrain_budgets=(), retrain_seeds=(),
                        retrain_epochs=None, retrain_train_size=None, retrain_eval_n=None),
    # A first look on a CPU: MNIST, 5 stages of 200, the functions the paper's shape is about. Ten
    # epochs per stage as in the paper: with three, a 400-input pool gets 12 optimiser steps per
    # stage and PGD training at eps 0.3 falls into the constant predictor (measured: 7% from stage 2).
    "quick": Size("quick", ("mnist",), ("random", "entropy", "deepgini", "lc", "mcp", "dre"), (0, 1, 2),
                  (1200, 200, 200), epochs=10, initial_epochs=30, at="pgd", at_steps=5, at_alpha=0.15,
                  eval_attacks=None, final_attacks=(), eval_n=500, val_n=300, train_size=None, standard_metrics=("random", "deepgini", "dre"),
                  standard_seeds=(0,), retrain_metrics=("random", "deepgini", "dre"), retrain_budgets=("1%", "4%"),
                  retrain_seeds=(0,), retrain_epochs=2, retrain_train_size=10000, retrain_eval_n=500),
    # The smallest size that runs every part (the test).
    "smoke": Size("smoke", ("mnist",), ("random", "deepgini", "dre"), (0,), (60, 20, 20), epochs=1, initial_epochs=1,
                  at="fgsm-rs", at_steps=None, at_alpha=None, eval_attacks=("pgd",), final_attacks=(), eval_n=40, val_n=40, train_size=1000,
                  standard_metrics=("random", "dre"), standard_seeds=(0,), retrain_metrics=("random", "dre"),
                  retrain_budgets=("1%",), retrain_seeds=(0,), retrain_epochs=1, retrain_train_size=500,
                  retrain_eval_n=40, sampled=(("deepgini", "power"),)),
}


def robust_al_config(size: Size, dataset: str, seed: int, standard: bool, sampled: tuple[str, str] | None = None):
    """The run's settings; ``sampled`` (function, sampling): that one function, sampling its batches."""
    overrides: dict[str, Any] = dict(
        metrics=(sampled[0],) if sampled else size.standard_metrics if standard else size.metrics, epochs=size.epochs,
        initial_epochs=size.initial_epochs, at=None if standard else size.at,
        at_steps=None if standard else size.at_steps, at_alpha=None if standard else size.at_alpha,
        eval_attacks=size.eval_attacks,
        final_attacks=size.final_attacks, eval_n=size.eval_n, val_n=size.val_n, train_size=size.train_size, seed=seed)
    if size.schedule:
        overrides.update(budget=size.schedule[0], initial=size.schedule[1], per_stage=size.schedule[2])
    if sampled:
        overrides["metric_options"] = {"sampling": sampled[1]}
    return preset(dataset, **overrides)


def run_active_learning(size: Size, dataset: str, seed: int, standard: bool, runs: Path, device,
                        sampled: tuple[str, str] | None = None) -> Path:
    """One robust-al (or standard) run folder; finished runs are skipped, unfinished ones resumed.
    ``sampled`` (function, sampling) runs that function alone, in ``<dataset>-seed<N>-<function>-<sampling>``."""
    name = f"{dataset}-seed{seed}" + (f"-{sampled[0]}-{sampled[1]}" if sampled else "")
    folder = runs / f"{'standard' if standard else 'robust'}-al" / name
    if (folder / "summary.json").is_file():
        return folder
    config = robust_al_config(size, dataset, seed, standard, sampled)
    resume = (folder / "config.json").is_file()
    folder.parent.mkdir(parents=True, exist_ok=True)
    say(f"{'resuming' if resume else 'starting'} {'standard' if standard else 'robust'} active learning: "
        f"{dataset}, seed {seed}, {', '.join(map(config.label, config.metrics))} ({config.initial} -> {config.budget} in "
        f"{config.stages} stages)")
    robust_active_learning(
        config, train_data=load_dataset(dataset, "train"), val_data=load_dataset(dataset, "val"),
        holdout=load_dataset(dataset, "holdout"), run_dir=folder, resume=resume, device=device,
        on_stage=lambda r: say(f"  {r.metric} stage {r.stage}: clean {100 * r.clean_accuracy:.2f}%, "
                               + ", ".join(f"{a} {100 * v:.2f}%" for a, v in r.robust_accuracy.items())))
    return folder


def run_retrain(size: Size, dataset: str, metric: str, budget: str, seed: int, runs: Path, device) -> Path:
    """Section 8 for one (function, budget, seed), from the bundled standard-trained model."""
    from dltest import TrainConfig, retrain

    out = runs / "retrain" / f"{dataset}-{metric}-{budget.replace('%', 'pct')}-seed{seed}.json"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    say(f"retraining {dataset} with {metric} at {budget}, seed {seed}")
    train_data = load_dataset(dataset, "train")
    if size.retrain_train_size:
        g = torch.Generator().manual_seed(seed)
        train_data = train_data.subset(torch.randperm(len(train_data), generator=g)[: size.retrain_train_size].sort().values)
    model, _ = load_model(dataset=dataset)
    config = TrainConfig(epochs=size.retrain_epochs, seed=seed) if size.retrain_epochs else None
    result = retrain(model, train_data=train_data, pool=load_dataset(dataset, "val"),
                     holdout=load_dataset(dataset, "holdout"), metric=metric, budget=budget,
                     eval_attacks=size.eval_attacks or (stage_attack(dataset),), config=config, seed=seed, eval_n=size.retrain_eval_n,
                     val_n=min(1000, size.val_n), device=device,
                     state_path=out.with_suffix(".state.pt"), resume=out.with_suffix(".state.pt").is_file())
    report = result.to_dict()
    write_json(out, {"dataset": dataset, "metric": metric, "budget": budget, "seed": seed,
                     "train_size": len(train_data), "before": report["before"], "after": report["after"],
                     "gain": report["gain"], "seconds": report["seconds"]})
    out.with_suffix(".state.pt").unlink(missing_ok=True)
    return out


# --- the report ----------------------------------------------------------------------------------


def final_rows(finished: dict[Path, dict[str, Any]]) -> dict[str, dict[str, list[float]]]:
    """metric -> {"clean": [per seed], attack: [per seed]} at each run's last stage (final attacks included;
    a run still going contributes the functions it has finished), from :func:`finished_metrics` per folder."""
    rows: dict[str, dict[str, list[float]]] = {}
    for done in finished.values():
        for metric, final in done.items():
            row = rows.setdefault(metric, {"clean": []})
            row["clean"].append(100 * final["clean_accuracy"])
            for attack, value in final["robust_accuracy"].items():
                row.setdefault(attack, []).append(100 * value)
    return rows


def _progress(finished: dict[Path, dict[str, Any]]) -> list[str]:
    """A line per run folder still going: which of its functions the table holds so far."""
    lines = []
    for folder, done in finished.items():
        if (folder / "summary.json").is_file():
            continue
        config = read_json(folder / "config.json")
        attacked = [m for m, f in done.items() if set(config.get("final_attacks", [])) <= set(f["robust_accuracy"])]
        lines.append(f"- in progress, {folder.name}: {len(done)} of {len(config['metrics'])} functions finished "
                     f"({', '.join(done) or 'none'}), final attacks on {len(attacked)}")
    return [*lines, ""] if lines else []


def mean_sd(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.fmean(values):.2f} ± {statistics.stdev(values):.2f}"


def final_table(rows: dict[str, dict[str, list[float]]], dataset: str, paper: bool) -> list[str]:
    attacks = sorted({a for r in rows.values() for a in r if a != "clean"}, key=lambda a: (a != "autoattack", a))
    headline = attacks[0] if attacks else None
    stage_attacks = [a for a in attacks if a != "autoattack"] if "autoattack" in attacks else []
    head = ["function", "seeds", "clean acc. %", *(f"robust acc. % ({a})" for a in attacks),
            *(f"{a} - autoattack (points)" for a in stage_attacks)]
    if paper:
        head += ["paper acc. %", "paper rob. % (autoattack)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    order = sorted(rows, key=lambda m: -statistics.fmean(rows[m].get(headline, [0.0])) if headline else 0)
    for metric in order:
        cells = [metric, str(len(rows[metric]["clean"])), mean_sd(rows[metric]["clean"]),
                 *(mean_sd(rows[metric].get(a, [])) for a in attacks)]
        cells += [mean_sd(_gaps(rows[metric], a)) for a in stage_attacks]
        if paper:
            known = PAPER.get(dataset, {}).get(metric)
            cells += [f"{known[0]:.2f}", f"{known[1]:.2f}"] if known else ["-", "-"]
        lines.append("| " + " | ".join(cells) + " |")
    if paper and dataset in PAPER:
        full = PAPER[dataset]["full data (adversarial training)"]
        cells = ["*full data, adversarially trained (paper)*", "", "", *([""] * (len(attacks) + len(stage_attacks))),
                 f"{full[0]:.2f}", f"{full[1]:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _gaps(row: dict[str, list[float]], attack: str) -> list[float]:
    """Per seed, how many points the per-stage attack overstates robustness against AutoAttack (same
    model, same inputs); only where both were run."""
    pgd, aa = row.get(attack, []), row.get("autoattack", [])
    return [p - a for p, a in zip(pgd, aa)] if len(pgd) == len(aa) else []


def shape_verdicts(rows: dict[str, dict[str, list[float]]], comparisons: list, headline: str) -> list[str]:
    """The paper's shape: uncertainty functions below random, DRE at or above random."""
    mean = {m: statistics.fmean(r[headline]) for m, r in rows.items() if headline in r}
    tested = {(c.metric_a, c.metric_b): c for c in comparisons}
    lines = []
    if "random" in mean:
        for metric in [m for m in UNCERTAINTY if m in mean]:
            c = tested.get(("random", metric))
            lines.append(f"- {metric} {'below' if mean[metric] < mean['random'] else 'at or above'} random at the last "
                         f"stage ({mean[metric]:.2f}% vs {mean['random']:.2f}%, {headline}); over all stages: "
                         f"{c.verdict if c else 'not tested'}. Paper: below.")
        if "dre" in mean:
            c = tested.get(("dre", "random"))
            lines.append(f"- dre {'at or above' if mean['dre'] >= mean['random'] else 'below'} random at the last stage "
                         f"({mean['dre']:.2f}% vs {mean['random']:.2f}%, {headline}); over all stages: "
                         f"{c.verdict if c else 'not tested'}. Paper: at or above.")
    return lines


def analyses(folders: list[Path], dataset: str, figures: Path, label: str, report_dir: Path) -> tuple[list[str], list]:
    """Wilcoxon tests (dre against every other function, random against the rest), selection bias,
    its correlation with robustness, and the figures; returns the report lines and the tests."""
    records = all_records([load_run(f) for f in folders])
    metrics = list(dict.fromkeys(r["metric"] for r in records))
    comparisons = []
    for first, skip in (("dre", {"dre"}), ("random", {"random", "dre"})):
        others = [m for m in metrics if m not in skip]
        if first in metrics and others:
            comparisons += compare_functions(records, [first, *others])
    for sampled in [m for m in metrics if "+" in m]:  # entropy+power against entropy's top scores
        if sampled.split("+")[0] in metrics:
            comparisons += compare_functions(records, [sampled.split("+")[0], sampled])
    lines: list[str] = []
    if comparisons:
        lines += ["", "Wilcoxon signed-rank tests (two-sided, α = 0.05) over robust accuracies paired by (seed, "
                      "stage ≥ 1, attack):", "",
                  "| A | B | pairs | mean A % | mean B % | p-value | verdict |", "|---|---|---|---|---|---|---|"]
        for c in comparisons:
            lines.append(f"| {c.metric_a} | {c.metric_b} | {c.pairs} | {100 * c.mean_a:.2f} | {100 * c.mean_b:.2f} | "
                         f"{c.p_value:.3g} | {c.verdict}{f' ({c.note})' if c.note else ''} |")
    means = stage_means(records)
    if not means:
        return lines, comparisons
    characteristics = ordered_characteristics({c for s in means.values() for m in s.values() for c in m["bias"]})
    lines += ["", "Selection bias (JSD base 2, mean over stages and seeds; 0 = the pool's distribution):", "",
              "| function | " + " | ".join(characteristics) + " |", "|---|" + "---|" * len(characteristics)]
    for metric in metrics:
        values = {c: [s[metric]["bias"][c] for s in means.values() if metric in s and c in s[metric]["bias"]]
                  for c in characteristics}
        lines.append(f"| {metric} | " + " | ".join(f"{statistics.fmean(v):.3f}" if v else "-" for v in values.values()) + " |")
    correlations = bias_robustness_correlations(records)
    lines += ["", "Pearson r across functions between bias and robust accuracy, mean over stages "
                  "(the paper, SVHN/AutoAttack: all negative, entropy the strongest at -0.65 on average):", "",
              "| attack | " + " | ".join(characteristics) + " |", "|---|" + "---|" * len(characteristics)]
    for attack in dict.fromkeys(c.attack for c in correlations):
        cells = []
        for c in characteristics:
            rs = [x.r for x in correlations if x.attack == attack and x.characteristic == c and x.r is not None]
            cells.append(f"{statistics.fmean(rs):+.2f} ({len(rs)} stages)" if rs else "undefined")
        lines.append(f"| {attack} | " + " | ".join(cells) + " |")
    try:
        from dltest.analysis.plots import accuracy_by_stage, bias_by_stage, correlation_heatmap

        figures.mkdir(parents=True, exist_ok=True)
        seeds = len({r["seed"] for r in records})
        accuracy = accuracy_by_stage(records, figures / f"{label}-accuracy.png",
                                     title=f"{dataset}: accuracy per stage, mean over {seeds} seed(s) (Figure 2)")
        heat = correlation_heatmap(correlations, figures / f"{label}-correlation.png", title=f"{dataset}: bias vs robustness")
        bias = bias_by_stage(records, figures / f"{label}-bias.png", title=f"{dataset}: selection bias per stage")
        lines += ["", f"![accuracy per stage]({_relative(accuracy, report_dir)})", "",
                  f"![correlation]({_relative(heat, report_dir)}) ![bias]({_relative(bias, report_dir)})"]
    except DltestError as exc:  # matplotlib missing: the tables stand alone
        lines += ["", f"(no figures: {exc})"]
    return lines, comparisons


def retrain_table(paths: list[Path]) -> list[str]:
    if not paths:
        return []
    results = [read_json(p) for p in paths]
    attacks = sorted({a for r in results for a in r["after"]["robust_accuracy"]})
    grouped: dict[tuple[str, str, str], list[dict]] = {}
    for r in results:
        grouped.setdefault((r["dataset"], r["budget"], r["metric"]), []).append(r)
    head = ["dataset", "budget", "function", "seeds", "clean before → after %",
            *(f"{a} before → after %" for a in attacks)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (dataset, budget, metric), rs in sorted(grouped.items()):
        clean = [f"{mean_sd([100 * r['before']['clean_accuracy'] for r in rs])} → "
                 f"{mean_sd([100 * r['after']['clean_accuracy'] for r in rs])}"]
        robust = [f"{mean_sd([100 * r['before']['robust_accuracy'][a] for r in rs])} → "
                  f"{mean_sd([100 * r['after']['robust_accuracy'][a] for r in rs])}" for a in attacks]
        lines.append(f"| {dataset} | {budget} | {metric} | {len(rs)} | " + " | ".join(clean + robust) + " |")
    return lines


def write_report(size: Size, runs: Path, report: Path, command: str, device, seconds: float) -> None:
    figures = report.parent / "results"
    old_notes = ""
    if report.is_file() and NOTES_MARKER in report.read_text():
        old_notes = report.read_text().split(NOTES_MARKER, 1)[1].strip()
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    lines = [
        "# Reproduction of the paper's central results",
        "",
        f"Written by `{command}` (size `{size.name}`), dltest {__version__}, on {platform.machine()} "
        f"{platform.system()} with {gpu or 'the CPU'}, torch {torch.__version__}; this invocation took "
        f"{seconds / 60:.1f} min (finished runs are reused).",
        "",
        "Settings against the paper's (SPEC §4, Table 3):",
        "",
        "| setting | here | paper |",
        "|---|---|---|",
        f"| schedule (budget, initial, per stage) | {size.schedule or 'Table 3'} | MNIST (5000, 200, 200), "
        f"Fashion-MNIST (6000, 200, 200) |",
        f"| training pool | {size.train_size or 'all'} training inputs | all |",
        f"| epochs per stage / initial model | {size.epochs} / {size.initial_epochs} | 10 (warm start) |",
        f"| adversarial training | {_method_text(size)} | PGD, eps 0.3, 40 steps of 0.01 |",
        f"| robustness per stage / at the end | {', '.join(size.eval_attacks or ('the profile: ' + ', '.join(f'{d} {stage_attack(d)}' for d in size.datasets),))} / "
        f"{', '.join(size.final_attacks) or '(same)'} on {size.eval_n or 'all 5000'} holdout inputs | "
        f"AutoAttack on the test set |",
        f"| seeds | {', '.join(map(str, size.seeds))} | 3 |",
    ]
    if size.sampled:
        lines.append("| stochastic sampling (Kirsch et al. 2023) | " + ", ".join(f"{m}+{s}" for m, s in size.sampled)
                     + ": a run folder of its own per seed, same initial model and evaluation inputs | - |")
    lines.append("")
    for dataset in size.datasets:
        folders = [p.parent for p in sorted((runs / "robust-al").glob(f"{dataset}-seed*/config.json"))]
        folders = [f for f in folders if (f / "log.jsonl").is_file()]
        finished = {f: finished_metrics(f) for f in folders}
        lines += [f"## {dataset}: robust active learning (Table 5)", ""]
        rows = final_rows(finished)
        if not rows:
            lines += ["(no function has finished its last stage yet)", ""]
            continue
        seeds = len({read_json(f / "config.json")["seed"] for f, done in finished.items() if done})
        lines += [f"Last stage, mean ± sd over {seeds} seed(s); the paper's robustness is under AutoAttack.", ""]
        lines += _progress(finished)
        lines += final_table(rows, dataset, paper=True)
        analysis, comparisons = analyses(folders, dataset, figures, f"{size.name}-{dataset}-robust", report.parent)
        headline = next((a for a in ("autoattack", "pgd") if any(a in r for r in rows.values())), None)
        verdicts = shape_verdicts(rows, comparisons, headline) if headline else []
        if verdicts:
            lines += ["", "The shape the paper reports:", "", *verdicts]
        lines += [*analysis, ""]
    for dataset in size.datasets:
        folders = [p.parent for p in sorted((runs / "standard-al").glob(f"{dataset}-seed*/summary.json"))]
        if folders:
            lines += [f"## {dataset}: standard active learning (Table 1)", "",
                      "The same loop with standard training; the paper finds its robustness near 0.", ""]
            lines += final_table(final_rows({f: finished_metrics(f) for f in folders}), dataset, paper=False)
            lines.append("")
    retrained = sorted((runs / "retrain").glob("*.json")) if (runs / "retrain").is_dir() else []
    if retrained:
        lines += ["## Test selection and retraining (Section 8)", "",
                  "From the bundled standard-trained model; candidates from the validation half, results on the "
                  f"holdout half{'' if not size.retrain_eval_n else f' ({size.retrain_eval_n} inputs)'}; "
                  f"{size.retrain_epochs or 10} retraining epoch(s) on "
                  f"{size.retrain_train_size or 'all'} training inputs plus the adversarial examples.", ""]
        lines += retrain_table(retrained)
        lines.append("")
    lines += compute_table(runs)
    lines += [NOTES_MARKER, "", old_notes or "## Notes\n\n(Differences from the paper, explained by hand, go here; "
                                            "rerunning the script keeps this section.)", ""]
    report.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(report) as tmp:
        tmp.write_text("\n".join(lines))


def compute_table(runs: Path) -> list[str]:
    """Where the runs' time went: minutes selecting, training and evaluating per stage (from the
    runs' summaries; the final attacks are not in them), and retraining, per part."""
    rows = []
    for part in ("robust-al", "standard-al"):
        summaries = [read_json(p) for p in sorted((runs / part).glob("*/summary.json"))] if (runs / part).is_dir() else []
        if summaries:
            total = {k: sum(t.get(k, 0.0) for s in summaries for t in s["seconds"].values())
                     for k in ("select", "train", "evaluate")}
            runs_n = sum(len(s["seconds"]) for s in summaries)
            rows.append(f"| {part} | {runs_n} (function, seed) runs | {total['select'] / 60:.1f} | "
                        f"{total['train'] / 60:.1f} | {total['evaluate'] / 60:.1f} |")
    retrained = sorted((runs / "retrain").glob("*.json")) if (runs / "retrain").is_dir() else []
    if retrained:
        seconds = sum(float(read_json(p).get("seconds", 0.0)) for p in retrained)
        rows.append(f"| retrain | {len(retrained)} retrainings | - | {seconds / 60:.1f} (all steps) | - |")
    if not rows:
        return []
    return ["## Compute", "", "Minutes of one process, summed over the runs (stage 0, the shared initial model, counted "
            "in each function's figures; final attacks not included):", "",
            "| part | runs | select | train | evaluate |", "|---|---|---|---|---|", *rows, ""]


def _method_text(size: Size) -> str:
    if size.at_steps is None and size.at_alpha is None:
        return f"{size.at} (its default preset)"
    return f"{size.at}, eps 0.3, {size.at_steps} steps of {size.at_alpha:g}"


def _relative(path: Path, base: Path) -> str:
    try:
        return str(path.resolve().relative_to(base.resolve()))
    except ValueError:
        return str(path)


def say(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="full")
    parser.add_argument("--quick", action="store_const", const="quick", dest="size", help="same as --size quick")
    parser.add_argument("--runs", type=Path, default=None, help="run folders (default: runs/reproduce-<size>)")
    parser.add_argument("--report", type=Path, default=None,
                        help="default: docs/results.md, docs/results-quick.md for --quick")
    parser.add_argument("--seeds", default=None,
                        help="run only these seeds of the size (comma-separated), e.g. to share the work "
                             "between processes; the report covers every finished run")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")
    parser.add_argument("--parts", default="robust,standard,retrain", help="which parts to run (comma-separated)")
    parser.add_argument("--report-only", action="store_true", help="run nothing; rebuild the report from --runs")
    args = parser.parse_args(argv)
    size = SIZES[args.size]
    report = args.report or Path("docs/results-quick.md" if size.name == "quick" else "docs/results.md")
    if args.seeds is not None:
        try:
            seeds = tuple(int(s) for s in args.seeds.split(",") if s.strip())
        except ValueError:
            parser.error(f"--seeds must be comma-separated integers, got {args.seeds!r}")
        size = dataclasses.replace(size, seeds=seeds, standard_seeds=tuple(s for s in size.standard_seeds if s in seeds),
                                   retrain_seeds=tuple(s for s in size.retrain_seeds if s in seeds))
    runs = args.runs or Path("runs") / f"reproduce-{size.name}"
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    unknown = parts - {"robust", "standard", "retrain"}
    if unknown:
        parser.error(f"unknown part(s) {', '.join(sorted(unknown))}; choose from robust, standard, retrain")
    device = default_device(args.device)
    started = time.perf_counter()
    try:
        if not args.report_only:
            runs.mkdir(parents=True, exist_ok=True)
            write_json(runs / "reproduce.json", {"command": "reproduce", "dltest_version": __version__,
                                                 "size": dataclasses.asdict(SIZES[args.size])})
            for dataset in size.datasets:
                if "robust" in parts:
                    for seed in size.seeds:
                        run_active_learning(size, dataset, seed, False, runs, device)
                        for sampled in size.sampled:
                            run_active_learning(size, dataset, seed, False, runs, device, sampled)
                if "standard" in parts:
                    for seed in size.standard_seeds:
                        run_active_learning(size, dataset, seed, True, runs, device)
                if "retrain" in parts:
                    for seed in size.retrain_seeds:
                        for budget in size.retrain_budgets:
                            for metric in size.retrain_metrics:
                                run_retrain(size, dataset, metric, budget, seed, runs, device)
        command = "python benchmarks/reproduce.py " + " ".join(argv if argv is not None else sys.argv[1:])
        write_report(SIZES[args.size], runs, report, command.strip(), device, time.perf_counter() - started)
    except DltestError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    say(f"wrote {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
