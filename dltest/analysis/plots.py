"""Figures of the analyses, as PNG files: the bias-robustness correlation heat map (the paper's
Figure 3), the bias of each function per stage, and accuracy and robustness per stage (Figure 2).

matplotlib is an optional extra (``pip install 'dltest[plots]'``); it is imported only when a
figure is drawn, with a one-line error when it is missing.
"""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable, Sequence

from dltest.analysis.compare import Correlation, mean_of_keys, ordered_characteristics, stage_means
from dltest.errors import DltestError
from dltest.io import atomic_path


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend, or a one-line error naming the extra."""
    try:
        import matplotlib
    except ImportError:
        raise DltestError("plots need matplotlib: pip install 'dltest[plots]' (or pip install matplotlib)") from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def correlation_heatmap(correlations: Sequence[Correlation], path: str | os.PathLike, title: str | None = None) -> Path:
    """One panel per attack: characteristics (rows) by stages (columns), each square coloured by r
    and sized by |r|, as in the paper's Figure 3; a cross marks an undefined r."""
    if not correlations:
        raise DltestError("no correlations to plot")
    plt = pyplot()
    attacks = list(dict.fromkeys(c.attack for c in correlations))
    characteristics = ordered_characteristics({c.characteristic for c in correlations})
    stages = sorted({c.stage for c in correlations})
    column = {s: i for i, s in enumerate(stages)}
    row = {c: i for i, c in enumerate(characteristics)}
    width = min(2.0 + 0.45 * len(stages), 24.0)
    fig, axes = plt.subplots(len(attacks), 1, figsize=(width, 0.55 * len(characteristics) * len(attacks) + 1.6),
                             squeeze=False, layout="constrained")
    scatter = None
    for ax, attack in zip(axes[:, 0], attacks):
        cells = [c for c in correlations if c.attack == attack]
        defined = [c for c in cells if c.r is not None]
        if defined:
            scatter = ax.scatter([column[c.stage] for c in defined], [row[c.characteristic] for c in defined],
                                 c=[c.r for c in defined], s=[30 + 370 * abs(c.r) for c in defined],
                                 marker="s", cmap="RdBu_r", vmin=-1, vmax=1, edgecolors="grey", linewidths=0.5)
            if len(stages) <= 12:
                for c in defined:
                    ax.text(column[c.stage], row[c.characteristic], f"{c.r:.2f}", ha="center", va="center",
                            fontsize=5.5, color="white" if abs(c.r) > 0.6 else "black")
        undefined = [c for c in cells if c.r is None]
        if undefined:
            ax.scatter([column[c.stage] for c in undefined], [row[c.characteristic] for c in undefined],
                       marker="x", color="grey", s=20)
        ax.set_xticks(range(len(stages)), [str(s) for s in stages], fontsize=7)
        ax.set_yticks(range(len(characteristics)), characteristics)
        ax.set_xlim(-0.6, len(stages) - 0.4)
        ax.set_ylim(len(characteristics) - 0.5, -0.5)
        ax.set_xlabel("stage")
        ax.set_title(f"Pearson r: bias vs robust accuracy ({attack})", fontsize=9)
    if scatter is not None:
        fig.colorbar(scatter, ax=axes[:, 0].tolist(), label="r", shrink=0.8)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, plt, path)


def bias_by_stage(records: Iterable[dict[str, Any]], path: str | os.PathLike, title: str | None = None) -> Path:
    """One panel per characteristic: each function's selection bias (JSD, mean over seeds) per stage."""
    means = stage_means(records)
    if not means:
        raise DltestError("the runs hold no selection stage with a bias: nothing to plot")
    plt = pyplot()
    characteristics = ordered_characteristics({c for per_metric in means.values() for m in per_metric.values() for c in m["bias"]})
    lines: dict[str, dict[str, list[tuple[int, float]]]] = defaultdict(lambda: defaultdict(list))
    for stage, per_metric in sorted(means.items()):
        for metric, m in per_metric.items():
            for c, value in m["bias"].items():
                lines[c][metric].append((stage, value))
    fig, axes = plt.subplots(1, len(characteristics), figsize=(3.2 * len(characteristics), 3.2), squeeze=False,
                             sharey=True, layout="constrained")
    for ax, c in zip(axes[0], characteristics):
        for metric, points in sorted(lines[c].items()):
            ax.plot([s for s, _ in points], [v for _, v in points], marker=".", label=metric)
        ax.set_title(c, fontsize=9)
        ax.set_xlabel("stage")
        ax.set_ylim(0, 1)
    axes[0][0].set_ylabel("bias (JSD, base 2)")
    axes[0][-1].legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, plt, path)


def accuracy_by_stage(records: Iterable[dict[str, Any]], path: str | os.PathLike, title: str | None = None) -> Path:
    """Clean accuracy and robust accuracy per attack against the labeled-pool size, one line per
    function (the paper's Figure 2); ``records`` are robust-al log records of one run, or of
    several seeds' runs (then each point is the mean over the seeds)."""
    grouped: dict[tuple[str, int], list[dict[str, Any]]] = defaultdict(list)
    for record in records:
        grouped[(record["metric"], record["stage"])].append(record)
    if not grouped:
        raise DltestError("no stage records to plot")
    by_metric: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for (metric, _), rows in sorted(grouped.items(), key=lambda item: item[0][1]):
        by_metric[metric].append({"labeled": rows[0]["labeled"],
                                  "clean_accuracy": sum(r["clean_accuracy"] for r in rows) / len(rows),
                                  "robust_accuracy": mean_of_keys(r["robust_accuracy"] for r in rows)})
    attacks = list(dict.fromkeys(a for rs in by_metric.values() for r in rs for a in r["robust_accuracy"]))
    panels = ["clean"] + attacks
    plt = pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False, layout="constrained")
    for ax, panel in zip(axes[0], panels):
        for metric, rs in by_metric.items():
            ys = [100 * (r["clean_accuracy"] if panel == "clean" else r["robust_accuracy"].get(panel, float("nan")))
                  for r in rs]
            ax.plot([r["labeled"] for r in rs], ys, marker=".", label=metric)
        ax.set_title("clean accuracy" if panel == "clean" else f"robust accuracy ({panel})", fontsize=9)
        ax.set_xlabel("labeled inputs")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("%")
    axes[0][0].legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, plt, path)


def _save(fig, plt, path: str | os.PathLike) -> Path:
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    finally:
        plt.close(fig)
    return Path(path)
