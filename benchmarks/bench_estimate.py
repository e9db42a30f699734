"""Operational accuracy estimation: coverage, bias, width and labels saved per design and budget.

For MNIST and Fashion-MNIST, two pools each: the ``holdout`` split (5000 inputs) and a
deliberately shifted pool (3000 inputs of the holdout drawn with class weights 1:2:...:10 and
Gaussian pixel noise of sd 0.15, so the model is less accurate and less calibrated there).
ONE inference pass per pool and model is cached (confidence, entropy, right or wrong); robust
flags come from ONE run of the ``pgd`` evaluation preset over the whole pool. Then, per design
and budget (50, 100, 200, 500 labels), 1000 seeded draws, each estimated as ``dltest estimate``
does: the empirical coverage of the 95% interval, the bias, the mean width, and the labels a
simple random sample needs for the same mean width (the exact expected Clopper-Pearson width
under binomial sampling at the pool's true accuracy, solved for n).

Clean accuracy uses the bundled standard models; robust accuracy the bundled robust models
(the standard ones are near 0% under PGD, where there is nothing to estimate). Robust cells are
also measured with the plan-time surrogate of ``dltest estimate plan --attacks pgd
--attack-restarts K`` for each K of ``--restarts`` (the predicted-label PGD run K times with the
seeds 0..K-1; ``g = f * s``, ``s`` the share of runs survived).

    DLTEST_DATA=../shared/datasets OMP_NUM_THREADS=1 python benchmarks/bench_estimate.py \\
        --out docs/bench-estimate.json --cache /tmp/bench-estimate-cache
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import beta, binom

from dltest import infer, load_dataset, load_model
from dltest.data import ImageDataset
from dltest.estimation import DESIGNS, get_design, pool_scores
from dltest.estimation.estimating import estimate_outcome
from dltest.robustness import evaluate_robustness
from machine import machine  # benchmarks/machine.py (this script's folder is on sys.path)

BUDGETS = (50, 100, 200, 500)
DATASETS = ("mnist", "fashion-mnist")
SHIFT_SIZE, SHIFT_NOISE = 3000, 0.15


def shifted_pool(data: ImageDataset, seed: int = 0) -> ImageDataset:
    """A class-imbalanced (weights 1..C), noisier subset of ``data``: a pool unlike the test set."""
    gen = torch.Generator().manual_seed(seed)
    weights = (data.y + 1).double()
    positions = torch.multinomial(weights, SHIFT_SIZE, replacement=False, generator=gen).sort().values
    part = data.subset(positions, split=f"{data.split}-shifted")
    noisy = part.images() + SHIFT_NOISE * torch.randn(part.x.shape, generator=gen)
    part.x = (noisy.clamp(0, 1) * 255).round().to(torch.uint8)
    return part


def cache_pool(model, data: ImageDataset, robust: bool, path: Path | None = None, restarts: int = 1) -> dict:
    """The one inference pass (confidence, entropy, right or wrong) and, for ``robust``, PGD flags
    with the true labels (the outcomes) and with the predicted labels (the plan-time surrogate's
    flags, as ``dltest estimate plan --attacks pgd`` computes them: ``survived`` with seed 0,
    ``survived_<r>`` with seed r for r < ``restarts``); kept in ``path`` (an .npz) when given, so
    that a rerun skips the attacks. A cache lacking some of them gets them added."""
    cached = {}
    if path is not None and path.is_file():
        with np.load(path, allow_pickle=False) as f:
            cached = {k: f[k] for k in f.files if k != "pgd_settings"}
            if "pgd_settings" in f.files:
                cached["pgd_settings"] = json.loads(str(f["pgd_settings"]))
    if not cached:
        cached = _compute_pool(model, data, robust)
    missing = False
    for run in range(restarts if robust else 0):
        if _run_key(run) not in cached:
            missing = True
            flags = _plan_time_flags(model, data, seed=run)
            cached.update({key.replace("survived", _run_key(run)): value for key, value in flags.items()})
    if path is not None and (missing or not path.is_file()):
        np.savez(path, **{k: (json.dumps(v) if k == "pgd_settings" else v) for k, v in cached.items()})
    return cached


def _run_key(run: int) -> str:
    """The cache key of the plan-time run with seed ``run`` (seed 0: ``survived``, as before)."""
    return "survived" if run == 0 else f"survived_{run}"


def _plan_time_flags(model, data: ImageDataset, seed: int = 0) -> dict:
    """What one run of ``dltest estimate plan --attacks pgd`` computes: the pgd preset over the whole
    pool with the model's predicted labels (no labels), timed."""
    from dltest.estimation.planning import predicted_label_survival

    started = time.perf_counter()
    outputs = infer(model, data, embeddings=False)
    inferred = time.perf_counter()
    runs, _ = predicted_label_survival(model, data, outputs, list(data.classes), ["pgd"], seed=seed, batch_size=256,
                                       device=None, progress=False)
    return {"survived": runs[0]["pgd"].astype(float), "survived_seconds": time.perf_counter() - inferred,
            "survived_inference_seconds": inferred - started}


def survival_share(cached: dict, restarts: int) -> np.ndarray:
    """The share of the first ``restarts`` plan-time runs each prediction survived."""
    return np.mean([cached[_run_key(run)] for run in range(restarts)], axis=0)


def restart_stats(cached: dict, restarts: int) -> dict:
    """How the share of ``restarts`` plan-time runs relates to the true labels' PGD run, over the right
    predictions: how many are split (0 < s < 1), and the robust share where all runs spared /
    none spared / some spared the prediction; and what the runs cost."""
    share, right, robust = survival_share(cached, restarts), cached["clean"] > 0, cached["robust"] > 0
    groups = {"all": share == 1, "none": share == 0, "split": (share > 0) & (share < 1)}
    return {"restarts": restarts, "split_share": float(groups["split"][right].mean()),
            **{f"robust_share_{name}": float(robust[right & where].mean()) if (right & where).any() else None
               for name, where in groups.items()},
            "seconds": round(sum(float(cached[_run_key(run) + "_seconds"]) for run in range(restarts)), 1)}


def inference_seconds(model, data: ImageDataset) -> float:
    """One plain inference pass over the pool, timed (the cost the plan-time attack adds to)."""
    started = time.perf_counter()
    infer(model, data, embeddings=False)
    return time.perf_counter() - started


def _compute_pool(model, data: ImageDataset, robust: bool) -> dict:
    outputs = infer(model, data, embeddings=False)
    scores = pool_scores(outputs, "entropy")
    correct = (outputs.predictions == data.y).numpy().astype(float)
    cached = {"confidence": scores.confidence, "score": scores.score, "clean": correct}
    if robust:
        started = time.perf_counter()
        report = evaluate_robustness(model, data, ["pgd"], seed=0)
        cached["robust"] = np.asarray([c == "1" for c in report.attacks[0].robust_inputs], dtype=float)
        cached["pgd_seconds"] = time.perf_counter() - started
        cached["pgd_settings"] = report.attacks[0].settings
    return cached


def expected_cp_width(n: int, share: float) -> float:
    """E[width of the exact 95% interval] of k / n with k ~ Binomial(n, share)."""
    k = np.arange(n + 1)
    pmf = binom.pmf(k, n, share)
    keep = pmf > 1e-12
    k, pmf = k[keep], pmf[keep]
    low = np.where(k > 0, beta.ppf(0.025, np.maximum(k, 1e-9), n - k + 1), 0.0)
    high = np.where(k < n, beta.ppf(0.975, k + 1, np.maximum(n - k, 1e-9)), 1.0)
    return float((pmf * (high - low)).sum() / pmf.sum())


def srs_labels_for_mean_width(width: float, share: float) -> int:
    """The smallest n whose expected Clopper-Pearson width at ``share`` is at most ``width``."""
    low, high = 1, 2
    while expected_cp_width(high, share) > width:
        low, high = high, high * 2
        if high > 2**22:
            return high
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (low, middle) if expected_cp_width(middle, share) <= width else (middle, high)
    return high


def repeat(design_name: str, cached: dict, figure: str, budget: int, draws: int, seed: int,
           restarts: int = 0) -> dict:
    """``draws`` seeded draws of one design at one budget, estimated as dltest estimate does.

    ``restarts`` (robust figures; 0: none): the plan holds the share ``s`` of that many
    predicted-label PGD runs each prediction survived, so the weighted draws aim at both figures
    and the robust estimator predicts with the calibrated surrogate built on ``g = f * s``. Robust cells
    also estimate, from the same draws, the same model's clean accuracy (``clean_*`` keys): what
    the shared draw gives the clean figure."""
    from dltest.estimation import PoolScores
    from dltest.estimation.designs import robust_surrogate
    from dltest.estimation.planning import surrogate_moments as pool_sums

    plan_time = restarts > 0
    share = survival_share(cached, restarts) if plan_time else None
    g = robust_surrogate(cached["confidence"], share) if plan_time else None
    pool = PoolScores(cached["confidence"], cached["score"], robust=g)
    design = get_design(design_name)
    surrogate_moments = pool_sums(design, pool, share, budget) if plan_time else None
    rng = np.random.default_rng(seed)
    figures = [figure] + (["clean"] if figure == "robust" else [])
    estimates, lows, highs = ({f: np.empty(draws) for f in figures} for _ in range(3))
    labels = np.empty(draws)
    for r in range(draws):
        sample = design.draw(pool, budget, rng)
        clean = cached["clean"][sample.positions]
        for f in figures:
            surrogate = (g[sample.positions], surrogate_moments) if plan_time and f == "robust" else None
            result = estimate_outcome(design, sample, cached[f][sample.positions], clean, f == "clean", 0.95, surrogate)
            estimates[f][r], lows[f][r], highs[f][r] = result.estimate, result.low, result.high
        labels[r] = sample.labels_needed
    row = {"design": design_name, "budget": budget, "draws": draws, "plan_time_attack": plan_time,
           "attack_restarts": restarts,
           **summary(estimates[figure], lows[figure], highs[figure], labels, float(cached[figure].mean())),
           "valid": design.invalid_reason(budget) is None}  # below the design's minimum its output says "not valid"
    if figure == "robust":
        clean = summary(estimates["clean"], lows["clean"], highs["clean"], labels, float(cached["clean"].mean()))
        row.update({f"clean_{k}": clean[k] for k in ("truth", "coverage", "mean_width", "label_ratio_vs_srs")})
    return row


def summary(estimates: np.ndarray, lows: np.ndarray, highs: np.ndarray, labels: np.ndarray, truth: float) -> dict:
    """Coverage, bias, width and labels vs SRS at the same mean width, of one figure's draws."""
    widths = highs - lows
    covered = (lows <= truth) & (truth <= highs)
    srs_labels = srs_labels_for_mean_width(float(widths.mean()), truth)
    return {
        "truth": truth, "coverage": float(covered.mean()), "bias": float(estimates.mean() - truth),
        "rmse": float(np.sqrt(((estimates - truth) ** 2).mean())), "mean_width": float(widths.mean()),
        "mean_labels": float(labels.mean()), "srs_labels_same_width": srs_labels,
        "label_ratio_vs_srs": float(labels.mean() / srs_labels),
        "misses_low": int((highs < truth).sum()), "misses_high": int((lows > truth).sum()),
    }


def run(draws: int, budgets: tuple[int, ...], datasets: tuple[str, ...], cache: Path | None = None,
        seed_offset: int = 0, restarts: tuple[int, ...] = (1,)) -> dict:
    rows, pools = [], []
    for name in datasets:
        holdout = load_dataset(name, "holdout")
        for pool_name, data in (("holdout", holdout), ("shifted", shifted_pool(holdout))):
            for figure, robust_model in (("clean", False), ("robust", True)):
                model, info = load_model(dataset=name, robust=robust_model)
                started = time.perf_counter()
                where = cache / f"{name}-{pool_name}-{figure}.npz" if cache else None
                cached = cache_pool(model, data, robust=figure == "robust", path=where, restarts=max(restarts))
                entry = {"dataset": name, "pool": pool_name, "figure": figure, "model": info.source,
                         "size": len(data), "truth": float(cached[figure].mean()),
                         "mean_confidence": float(cached["confidence"].mean()),
                         "cache_seconds": round(time.perf_counter() - started, 1),
                         "pgd": cached.get("pgd_settings"),
                         "pgd_seconds": round(float(cached["pgd_seconds"]), 1) if "pgd_seconds" in cached else None}
                if figure == "robust":
                    right, survived, robust = (cached[k] > 0 for k in ("clean", "survived", "robust"))
                    entry.update(plan_time_survived=float(survived.mean()),
                                 # where the prediction is right both runs are the same attack (other random starts)
                                 flags_agree_right=float((survived == robust)[right].mean()),
                                 robust_share_survived=float(robust[right & survived].mean()),
                                 robust_share_broken=float(robust[right & ~survived].mean()),
                                 clean_truth=float(cached["clean"].mean()),
                                 plan_time_pgd_seconds=round(float(cached["survived_seconds"]), 1),
                                 # the inference pass timed just before that attack (same process, same load)
                                 plan_time_inference_seconds=round(float(cached["survived_inference_seconds"]), 2),
                                 inference_seconds=round(inference_seconds(model, data), 2),
                                 restarts=[restart_stats(cached, k) for k in restarts])
                pools.append(entry)
                print(f"{name}/{pool_name} {figure}: {len(data)} inputs, truth {cached[figure].mean():.4f}, "
                      f"mean confidence {cached['confidence'].mean():.4f}", flush=True)
                for runs in (0, *restarts) if figure == "robust" else (0,):
                    for budget in budgets:
                        for design in DESIGNS:
                            started = time.perf_counter()
                            row = repeat(design, cached, figure, budget, draws, seed=seed_offset + budget,
                                         restarts=runs)
                            row.update(dataset=name, pool=pool_name, figure=figure,
                                       seconds=round(time.perf_counter() - started, 1))
                            rows.append(row)
                            print(f"  {f'g{runs}' if runs else 'f'} n={budget:3d} {design:10s} coverage "
                                  f"{row['coverage']:.3f} bias {row['bias']:+.4f} width {row['mean_width']:.4f} "
                                  f"labels/SRS {row['label_ratio_vs_srs']:.2f}", flush=True)
    return {"pools": pools, "rows": rows}


def _runs(row: dict) -> int:
    """The plan-time runs of a row (0: no plan-time attack; rows from before restarts: 1)."""
    return int(row.get("attack_restarts", 1 if row.get("plan_time_attack") else 0))


def markdown(result: dict) -> str:
    """One table per pool and figure: per design and budget, coverage / mean width / labels vs SRS;
    for robust figures one more table per number of plan-time runs, their cost, and what the
    shared draw gives the model's clean accuracy; then the goals, checked without and with the option."""
    rows = result["rows"]
    restarts = sorted({_runs(r) for r in rows} - {0})
    lines = []
    for pool in result["pools"]:
        key = (pool["dataset"], pool["pool"], pool["figure"])
        mine = [r for r in rows if (r["dataset"], r["pool"], r["figure"]) == key]
        lines += [f"**{pool['dataset']} / {pool['pool']}, {pool['figure']} accuracy** ({pool['size']} inputs, "
                  f"true {100 * pool['truth']:.2f}%, mean confidence {100 * pool['mean_confidence']:.2f}%; "
                  f"{pool['model']})", ""]
        lines += _table([r for r in mine if not _runs(r)])
        if pool["figure"] == "robust":
            lines += [f"*with the plan-time surrogate* (`plan --attacks pgd`): the predicted labels' PGD over the pool "
                      f"took {pool['plan_time_pgd_seconds']:.0f} s against {pool['plan_time_inference_seconds']:.2f} s "
                      f"for the inference pass timed just before it; {100 * pool['plan_time_survived']:.1f}% of the "
                      f"predictions survived. Where the prediction is right (the same attack, other random starts) "
                      f"it agrees with the true labels' PGD run on {100 * pool['flags_agree_right']:.1f}% of the inputs: "
                      f"that run leaves {100 * pool['robust_share_survived']:.1f}% of the right survivors and "
                      f"{100 * pool['robust_share_broken']:.1f}% of the right broken predictions robust", ""]
            lines += _table([r for r in mine if _runs(r) == 1])
            for stats in pool.get("restarts", []):
                if stats["restarts"] == 1:
                    continue
                lines += [_restart_line(stats), ""] + _table([r for r in mine if _runs(r) == stats["restarts"]])
            lines += _clean_table(mine, pool)
    lines += ["Without plan-time attacks:"] + goals(rows, restarts=0)
    for runs in restarts:
        lines += ["", f"With `plan --attacks pgd --attack-restarts {runs}` (robust cells: the plan-time surrogate; "
                      "clean cells unchanged):"] + goals(rows, restarts=runs)
    return "\n".join(lines)


def _restart_line(stats: dict) -> str:
    def pct(value):
        return "-" if value is None else f"{100 * value:.1f}%"

    return (f"*with {stats['restarts']} plan-time runs* (`--attack-restarts {stats['restarts']}`, seeds 0-"
            f"{stats['restarts'] - 1}; {stats['seconds']:.0f} s of PGD in all): {pct(stats['split_share'])} of the right "
            f"predictions survived some runs but not all; the true labels' run leaves robust "
            f"{pct(stats['robust_share_all'])} of the right predictions that survived every run, "
            f"{pct(stats['robust_share_split'])} of the split ones, {pct(stats['robust_share_none'])} of those no run spared")


def _table(mine: list[dict]) -> list[str]:
    budgets = sorted({r["budget"] for r in mine})
    lines = ["| design | " + " | ".join(f"n={b}" for b in budgets) + " | max abs bias |", "|---|" + "---|" * (len(budgets) + 1)]
    for design in DESIGNS:
        cells = {r["budget"]: r for r in mine if r["design"] == design}
        text = [f"{100 * cells[b]['coverage']:.1f}% / {cells[b]['mean_width']:.4f} / {cells[b]['label_ratio_vs_srs']:.2f}"
                + ("" if cells[b].get("valid", True) else " (not valid)") for b in budgets]
        bias = max(abs(cells[b]["bias"]) for b in budgets)
        lines.append(f"| {design} | " + " | ".join(text) + f" | {bias:.4f} |")
    return lines + [""]


def _clean_table(mine: list[dict], pool: dict) -> list[str]:
    """The robust model's clean accuracy estimated from the robust cells' draws: coverage / labels
    vs SRS with the confidence-only draw, then with each plan-time draw (only the weighted
    designs' draws differ)."""
    budgets = sorted({r["budget"] for r in mine})
    runs = sorted({_runs(r) for r in mine})
    names = ["without"] + [f"{k} run{'s' if k > 1 else ''}" for k in runs if k]
    lines = [f"*the same model's clean accuracy (true {100 * pool['clean_truth']:.2f}%) from these draws*: coverage / "
             f"labels vs SRS, {' -> '.join(names)}", "",
             "| design | " + " | ".join(f"n={b}" for b in budgets) + " |", "|---|" + "---|" * len(budgets)]
    for design in ("importance", "active"):
        cells = {(r["budget"], _runs(r)): r for r in mine if r["design"] == design}
        text = [" -> ".join(f"{100 * cells[b, k]['clean_coverage']:.1f}% / {cells[b, k]['clean_label_ratio_vs_srs']:.2f}"
                            for k in runs) for b in budgets]
        lines.append(f"| {design} | " + " | ".join(text) + " |")
    return lines + [""]


def goals(rows: list[dict], restarts: int = 0) -> list[str]:
    """The issue's goals, checked on every cell whose design claims a valid interval at its budget;
    ``restarts``: robust cells measured with the plan-time surrogate of that many runs instead."""
    rows = [r for r in rows if _runs(r) == (restarts if r["figure"] == "robust" else 0)]
    valid_rows = [r for r in rows if r.get("valid", True)]
    under = [r for r in valid_rows if r["coverage"] < 0.94]
    lines = [f"- coverage >= 94%: {len(valid_rows) - len(under)} of {len(valid_rows)} cells that claim a valid interval "
             f"({len(rows) - len(valid_rows)} cells below their design's minimum budget say 'not valid'); below: "
             + (", ".join(f"{r['dataset']}/{r['pool']} {r['figure']} {r['design']} n={r['budget']} "
                          f"({100 * r['coverage']:.1f}%)" for r in under) or "none")]
    if restarts:
        clean_under = [r for r in valid_rows if "clean_coverage" in r and r["clean_coverage"] < 0.94]
        lines.append(f"- the robust models' clean accuracy from the plan-time draws: coverage >= 94% in "
                     f"{sum('clean_coverage' in r for r in valid_rows) - len(clean_under)} of "
                     f"{sum('clean_coverage' in r for r in valid_rows)} valid cells"
                     + ("; below: " + ", ".join(f"{r['dataset']}/{r['pool']} {r['design']} n={r['budget']} "
                                                 f"({100 * r['clean_coverage']:.1f}%)" for r in clean_under)
                        if clean_under else ""))
    cells = {}
    for r in rows:
        cells.setdefault((r["dataset"], r["pool"], r["figure"], r["budget"]), {})[r["design"]] = r
    best_ok = active_ok = 0
    for key, by_design in sorted(cells.items()):
        valid = [d for d in by_design.values() if d["coverage"] >= 0.94 and d.get("valid", True)]
        best = min(valid, key=lambda d: d["label_ratio_vs_srs"]) if valid else None
        best_ok += best is not None and best["label_ratio_vs_srs"] <= 0.5
        saving = 1 - by_design["active"]["label_ratio_vs_srs"] / by_design["ppi"]["label_ratio_vs_srs"]
        active_ok += by_design["active"].get("valid", True) and saving >= 0.2
    lines.append(f"- best design (of those valid and covering >= 94%) <= 50% of SRS labels: {best_ok} of {len(cells)} cells")
    lines.append(f"- active inference (where valid) >= 20% fewer labels than PPI++ (same width): {active_ok} of {len(cells)} cells")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draws", type=int, default=1000)
    parser.add_argument("--seed-offset", type=int, default=0,
                        help="Added to each budget's seed: another set of draws than the recorded one.")
    parser.add_argument("--budgets", default=",".join(map(str, BUDGETS)))
    parser.add_argument("--datasets", default=",".join(DATASETS))
    parser.add_argument("--out", type=Path, default=Path("docs/bench-estimate.json"))
    parser.add_argument("--cache", type=Path, help="Folder that keeps each pool's outputs and PGD flags between runs.")
    parser.add_argument("--restarts", default="1,3,5",
                        help="Plan-time runs per surrogate to measure (robust cells), comma-separated.")
    parser.add_argument("--table", type=Path, help="Print the Markdown tables of this result JSON and exit.")
    args = parser.parse_args()
    if args.table:
        print(markdown(json.loads(args.table.read_text())))
        return
    torch.set_num_threads(1)
    started = time.perf_counter()
    if args.cache:
        args.cache.mkdir(parents=True, exist_ok=True)
    restarts = tuple(int(k) for k in args.restarts.split(","))
    result = run(args.draws, tuple(int(b) for b in args.budgets.split(",")), tuple(args.datasets.split(",")), args.cache,
                 args.seed_offset, restarts)
    result.update(machine=machine(), seconds=round(time.perf_counter() - started, 1), draws=args.draws,
                  seed_offset=args.seed_offset, restarts=list(restarts),
                  command="python benchmarks/bench_estimate.py --out " + str(args.out)
                  + (f" --seed-offset {args.seed_offset}" if args.seed_offset else "")
                  + f" --restarts {args.restarts}")
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out} in {result['seconds']:.0f} s")


if __name__ == "__main__":
    main()
