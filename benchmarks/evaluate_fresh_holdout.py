"""A shipped model's figures on holdout inputs never used to choose anything (issue 17's rule).

    DLTEST_DATA=../shared/datasets OMP_NUM_THREADS=1 python benchmarks/evaluate_fresh_holdout.py \\
        -m models/lenet5-mnist-robust.pt -d mnist --start 1000 --stop 3000 --work runs/fresh-mnist \\
        --out docs/eval-lenet5-mnist-robust-fresh.json

The positions are ``torch.randperm(len(holdout), generator=torch.Generator().manual_seed(0))[start:stop]``:
earlier checks of the shipped models used the first 1000 of that permutation, so ``--start 1000``
keeps the report on inputs no choice has seen. Clean accuracy, PGD-50 and the standard AutoAttack
run in chunks of ``--chunk`` inputs, each kept in ``--work`` as it finishes: a cut run resumes
where it stopped. The report adds the 95% Clopper-Pearson interval of every figure.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from dltest import load_dataset, load_model
from dltest.analysis.intervals import clopper_pearson
from dltest.io import write_json
from dltest.robustness import evaluate_robustness

ATTACKS = ("pgd", "autoattack")


def positions(pool_size: int, start: int, stop: int) -> list[int]:
    """The report's holdout positions: a fixed seeded permutation's [start:stop]."""
    return torch.randperm(pool_size, generator=torch.Generator().manual_seed(0))[start:stop].tolist()


def run_chunk(model, data, model_path: str, start: int, stop: int, out: Path) -> dict:
    report = evaluate_robustness(model, data, ATTACKS, indices=positions(len(data), start, stop), seed=0,
                                 device="cpu", dataset=data.name)
    result = report.to_dict()
    result.update(model=model_path, start=start, stop=stop)
    write_json(out, result)
    return result


def _interval(k: int, n: int) -> list[float]:
    interval = clopper_pearson(k, n)
    return [round(interval.low, 4), round(interval.high, 4)]


def combine(chunks: list[dict], args: argparse.Namespace, seconds: float) -> dict:
    n = sum(c["n"] for c in chunks)
    clean = sum(c["clean_correct"] for c in chunks)
    figures = {"clean": (clean, n)}
    attack_seconds = {}
    for name in ATTACKS:
        outcomes = [a for c in chunks for a in c["attacks"] if a["attack"] == name]
        figures[name] = (sum(a["robust_correct"] for a in outcomes), n)
        attack_seconds[name] = round(sum(a["seconds"] for a in outcomes), 1)
    settings = {a["attack"]: a["settings"] for a in chunks[0]["attacks"]}
    return {
        "command": "benchmarks/evaluate_fresh_holdout.py", "seed": 0, "model": args.model, "dataset": args.dataset,
        "split": "holdout",
        "positions": f"torch.randperm({chunks[0]['pool_size']}, generator=torch.Generator().manual_seed(0))"
                     f"[{args.start}:{args.stop}]",
        "n": n,
        "figures": {name: {"correct": k, "n": total, "accuracy": k / total,
                           "ci95": _interval(k, total)}
                    for name, (k, total) in figures.items()},
        "attack_settings": settings, "attack_seconds": attack_seconds,
        "seconds_this_run": round(seconds, 1), "versions": chunks[0].get("versions"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-m", "--model", required=True)
    parser.add_argument("-d", "--dataset", required=True)
    parser.add_argument("--start", type=int, default=1000)
    parser.add_argument("--stop", type=int, default=3000)
    parser.add_argument("--chunk", type=int, default=250)
    parser.add_argument("--work", type=Path, required=True, help="folder for the finished chunks (resumable)")
    parser.add_argument("--tag", default=None, help="chunk file prefix (default: the dataset)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    args.work.mkdir(parents=True, exist_ok=True)
    tag = args.tag or args.dataset
    started = time.perf_counter()
    data = load_dataset(args.dataset, "holdout")
    model, _ = load_model(args.model)
    chunks = []
    for a in range(args.start, args.stop, args.chunk):
        b = min(a + args.chunk, args.stop)
        path = args.work / f"chunk-{tag}-{a}-{b}.json"
        chunks.append(json.loads(path.read_text()) if path.is_file()
                      else run_chunk(model, data, args.model, a, b, path))
        print(f"{path.name}: done", flush=True)
    result = combine(chunks, args, time.perf_counter() - started)
    write_json(args.out, result)
    for name, figure in result["figures"].items():
        lo, hi = figure["ci95"]
        print(f"{name:>10}: {100 * figure['accuracy']:.2f}% [{100 * lo:.1f}, {100 * hi:.1f}] of {figure['n']}")


if __name__ == "__main__":
    main()
