"""How far robust active learning's per-stage attack is from standard AutoAttack (issue 17).

    DLTEST_DATA=/work/shared/datasets OMP_NUM_THREADS=1 python benchmarks/bench_stage_attack.py \
        --dataset fashion-mnist --n 1000 --out docs/stage-attack-fashion-mnist.json

On the same ``--n`` seeded inputs of the **val** half (holdout stays untouched) and the dataset's
bundled adversarially trained model, runs each component attack on every correctly classified
input and keeps its per-input robust flags: PGD-50 (SPEC §2), APGD-CE at 100/50/25 steps,
APGD-T (DLR, 100 steps), Square (1000 queries), the standard ``autoattack``, and the
``apgd-square`` preset itself (APGD-CE, then Square on the inputs still robust). A sequence of
attacks leaves robust exactly the inputs that every one of them leaves robust, so the robust
accuracy of any combination follows from the flags; ``summary`` prints them with their gap to
AutoAttack. Seconds are CPU seconds of this process (``time.process_time``), one thread.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
from machine import machine  # benchmarks/machine.py (this script's folder is on sys.path)

EPS = 0.3  # SPEC §2, grey images
COMBINATIONS = (("apgd-ce-100", "apgd-t-100"), ("apgd-ce-100", "square-1000"), ("apgd-ce-25", "square-1000"),
                ("apgd-ce-100", "apgd-t-100", "square-1000"))


def components(model, dataset: str) -> dict:
    """Name -> builder of each attack measured."""
    import torchattacks as ta

    from dltest.attacks import build_attack

    attacks = {"pgd50": lambda: ta.PGD(model, eps=EPS, alpha=0.01, steps=50)}
    for steps in (100, 50, 25):
        attacks[f"apgd-ce-{steps}"] = lambda s=steps: ta.APGD(model, eps=EPS, steps=s, loss="ce", seed=0)
    attacks["square-1000"] = lambda: ta.Square(model, norm="Linf", eps=EPS, n_queries=1000, n_restarts=1, seed=0)
    attacks["apgd-t-100"] = lambda: ta.APGDT(model, eps=EPS, steps=100, seed=0, n_classes=10)
    attacks["autoattack"] = lambda: build_attack("autoattack", model, dataset)
    attacks["apgd-square"] = lambda: build_attack("apgd-square", model, dataset)
    return attacks


def measure(dataset: str, n: int, out: str | None, only: list[str] | None = None) -> dict:
    from dltest.checkpoint import load_model
    from dltest.data import load_dataset

    torch.set_num_threads(1)
    model, info = load_model(dataset=dataset, robust=True)
    model.eval()
    val = load_dataset(dataset, "val")
    positions = val.sample_positions(n, 0)
    x, y = val.images(positions), val.y[positions]
    with torch.no_grad():
        correct = model(x).argmax(1) == y
    x, y = x[correct], y[correct]
    record = {"command": "python benchmarks/bench_stage_attack.py " + " ".join(sys.argv[1:]),
              "dataset": dataset, "split": "val", "n": n, "model": info.source, "model_digest": info.digest,
              "clean_correct": int(correct.sum()), "positions": positions.tolist(), "machine": machine(),
              "attacks": {}}
    print(dataset, "clean", int(correct.sum()), "of", n, flush=True)
    for name, make in components(model, dataset).items():
        if only and name not in only:
            continue
        torch.manual_seed(0)
        attack, flags, seconds = make(), [], 0.0
        for s in range(0, len(y), 256):
            started = time.process_time()
            adv = attack(x[s : s + 256], y[s : s + 256])
            seconds += time.process_time() - started
            with torch.no_grad():
                flags.append(model(adv).argmax(1) == y[s : s + 256])
        robust = torch.cat(flags)
        record["attacks"][name] = {"robust": int(robust.sum()), "cpu_seconds": round(seconds, 1),
                                   "flags": "".join("1" if v else "0" for v in robust.tolist())}
        print(f"{name:15s} {int(robust.sum())} of {n}  {seconds:.1f} cpu-s", flush=True)
        if out:  # one line per key: the flags and positions stay one line each
            with open(out, "w") as f:
                f.write("{\n" + ",\n".join(f" {json.dumps(k)}: {json.dumps(v)}" for k, v in record.items()) + "\n}\n")
    return record


def summary(record: dict) -> list[dict]:
    """Robust accuracy, gap to AutoAttack (points), and CPU seconds of every attack and combination."""
    attacks, n = record["attacks"], record["n"]
    flags = {k: [c == "1" for c in v["flags"]] for k, v in attacks.items()}
    aa = attacks.get("autoattack")
    rows = []
    for names in [(k,) for k in attacks] + [c for c in COMBINATIONS if all(k in flags for k in c)]:
        robust = sum(all(flags[k][i] for k in names) for i in range(record["clean_correct"]))
        row = {"attack": " then ".join(names), "robust_accuracy": robust / n,
               "gap_points": None if aa is None else round(100 * (robust - aa["robust"]) / n, 1)}
        if len(names) == 1:
            row["cpu_seconds"] = attacks[names[0]]["cpu_seconds"]
        rows.append(row)
    print(f"{record['dataset']}, {n} val inputs, clean {100 * record['clean_correct'] / n:.1f}%\n")
    print("| attack | robust accuracy | minus AutoAttack (points) | CPU seconds |\n|---|---|---|---|")
    for row in rows:
        print(f"| {row['attack']} | {100 * row['robust_accuracy']:.1f}% | {row['gap_points']} | "
              f"{row.get('cpu_seconds', '')} |", flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--only", default=None, help="comma-separated attack names (default: all)")
    parser.add_argument("--out", default=None, help="JSON record (per-input flags of every attack)")
    parser.add_argument("--summary", default=None, help="print the table of an earlier --out record and stop")
    args = parser.parse_args(argv)
    if args.summary:
        with open(args.summary) as f:
            summary(json.load(f))
        return
    record = measure(args.dataset, args.n, args.out, args.only.split(",") if args.only else None)
    summary(record)


if __name__ == "__main__":
    main()
