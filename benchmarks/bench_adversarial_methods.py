"""Benchmark the adversarial-training methods (issue 8): time per epoch and AutoAttack robustness.

Every method trains the same LeNet-5 (same initial weights) on the same MNIST training inputs
for the same epochs, with dltest's trainer and its defaults for grey images (Adam, one-cycle
peak 5e-3, eps 0.3 ramped up over ``--warmup`` epochs, best epoch by a 10-step PGD check on
1000 val inputs). Then each model is evaluated on the same seeded holdout inputs with PGD-50
and the standard AutoAttack (APGD-CE, APGD-T, FAB-T with 100 steps, Square 5000 queries).

Reported per method: seconds per training epoch (the mean over the epochs, robustness checks
excluded), that time divided by PGD-40's in the same run, clean accuracy, PGD-50 and
AutoAttack robust accuracy. ``--time-batches`` also times training batches of every method and of
PGD-40 interleaved, round after round, in this one process (the median over rounds), so that the
time ratio holds whatever else the machine runs. Goal: a fast mode at <= 1/8 of PGD-40's time per epoch that loses
<= 3 AutoAttack points.

    DLTEST_DATA=../shared/datasets OMP_NUM_THREADS=1 python benchmarks/bench_adversarial_methods.py \
        --n 10000 --epochs 8 --eval-n 500 --out bench-at-methods.json
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from dltest.adversarial_training import adversarial_training  # noqa: E402
from dltest.data import load_dataset  # noqa: E402
from dltest.robustness import evaluate_robustness  # noqa: E402
from dltest.training import TrainConfig, train  # noqa: E402
from dltest.zoo import model_for_dataset  # noqa: E402

from machine import machine  # noqa: E402  (benchmarks/machine.py)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default="pgd,fgsm-rs,n-fgsm,trades,pgd:5",
                        help="comma-separated; NAME:K runs K inner steps of 2.5 eps / K (e.g. pgd:5)")
    parser.add_argument("--n", type=int, default=10000, help="training inputs (a seeded subset of MNIST train)")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--eval-n", type=int, default=500)
    parser.add_argument("--attacks", default="pgd,autoattack")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="bench-at-methods.json")
    parser.add_argument("--time-batches", type=int, default=0,
                        help="also time this many training batches per method and PGD-40, interleaved")
    parser.add_argument("--time-only", action="store_true", help="only the interleaved batch timing (no training)")
    parser.add_argument("--baseline-json", help="merge the rows of an earlier run of this script (e.g. its pgd row)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    train_data = load_dataset("mnist", "train").sample(args.n, args.seed)
    val = load_dataset("mnist", "val").sample(1000, args.seed)
    holdout = load_dataset("mnist", "holdout")
    torch.manual_seed(args.seed)
    init = model_for_dataset("mnist")
    config = TrainConfig(epochs=args.epochs, optimizer="adam", lr=5e-3, weight_decay=0.0, seed=args.seed)
    rows = {}
    for name in [] if args.time_only else args.methods.split(","):
        method = _method(name, args.warmup)
        result = train(copy.deepcopy(init), train_data, val, config, adversary=method, device="cpu", progress=False)
        report = evaluate_robustness(result.model, holdout, args.attacks.split(","), n=args.eval_n, seed=args.seed,
                                     device="cpu")
        rows[name] = {
            "method": method.to_dict(), "gradient_evaluations_per_batch": method.gradient_evaluations,
            "seconds_per_epoch": result.seconds_per_epoch, "best_epoch": result.best_epoch,
            "stopped_early": result.stopped_early, "clean_accuracy": report.clean_accuracy,
            "robust_accuracy": {o.attack: o.robust_accuracy for o in report.attacks},
            "evaluation_seconds": report.seconds,
        }
        print(json.dumps({name: rows[name]}), flush=True)
    if args.baseline_json:  # rows measured earlier in the same set-up (same n, epochs, seed, eval)
        rows = {**json.loads(Path(args.baseline_json).read_text())["results"], **rows}
    if "pgd" in rows:
        base = rows["pgd"]
        for row in rows.values():
            row["time_vs_pgd"] = row["seconds_per_epoch"] / base["seconds_per_epoch"]
            row["autoattack_points_vs_pgd"] = (
                100 * (row["robust_accuracy"].get("autoattack", float("nan"))
                       - base["robust_accuracy"].get("autoattack", float("nan"))))
    out = {"benchmark": "adversarial training methods", "machine": machine(),
           "args": vars(args), "results": rows}
    if args.time_batches:
        out["interleaved_batch_seconds"] = interleaved_batch_times(
            ["pgd", *(n for n in args.methods.split(",") if n != "pgd")], init, train_data, args.time_batches)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


def _method(name: str, warmup: float = 0.0):
    method_name, _, k = name.partition(":")
    steps = {"steps": int(k), "alpha": 2.5 * 0.3 / int(k)} if k else {}
    return adversarial_training(method_name, "grey", warmup_epochs=warmup, **steps)


def interleaved_batch_times(names: list[str], init, data, batches: int, rounds: int = 5,
                            batch_size: int = 128) -> dict[str, dict[str, float]]:
    """Seconds per training batch (loss at eps 0.3, backward, Adam step) of each method, the
    methods interleaved round after round; the median over rounds and its ratio to PGD-40's."""
    import statistics
    import time

    x, y = data.images(slice(0, batch_size)), data.y[:batch_size]
    times: dict[str, list[float]] = {n: [] for n in names}
    models = {n: copy.deepcopy(init) for n in names}
    optimisers = {n: torch.optim.Adam(models[n].parameters(), lr=1e-4) for n in names}
    for _ in range(rounds + 1):  # the first round warms up
        for name in names:
            method, model, opt = _method(name), models[name], optimisers[name]
            started = time.perf_counter()
            for _ in range(batches):
                loss, _ = method.loss(model, x, y, 0.3)
                opt.zero_grad()
                loss.backward()
                opt.step()
            times[name].append((time.perf_counter() - started) / batches)
    medians = {n: statistics.median(t[1:]) for n, t in times.items()}
    return {n: {"seconds_per_batch": round(m, 5), "vs_pgd": round(m / medians["pgd"], 4)} for n, m in medians.items()}


if __name__ == "__main__":
    main()
