"""Cost of the issue-10 metrics on the whole MNIST training set (60k), relative to a bare forward pass.

Part ``ratios``: for badge, ats, entropy with --sampling power, dsa, mdsa and lsa, the wall time of
a whole ``dltest.select`` (the one inference pass, the reference activations for dsa/mdsa/lsa, the
metric, the bookkeeping) divided by the wall time of a bare forward pass of the same model over the
same pool with the images already as floats, measured in the same run and bracketed as in
``bench_selection.py``: bare, s1, bare, s2, ..., each selection divided by the mean of the bare
passes just before and after it; the headline is the median over ``--repeats`` rounds, in wall
time and in this process's CPU time (one thread: CPU time is the work done, and varies far less
than wall time on a machine shared with other jobs). "alone" is the metric on cached outputs. The
reference of the surprise metrics is the training set itself, subsampled to 10,000 (the default).

Part ``batchbald``: time and peak memory of ``select("batchbald")`` at T = 10 for the given
budgets, each in a fresh process (peak resident memory reset before the selection through
/proc/self/clear_refs, read from VmHWM after it, minus the resident memory before it).

    DLTEST_DATA=../shared/datasets python benchmarks/bench_new_selectors.py --part ratios --repeats 3 --out docs/bench-new-selectors.json
    DLTEST_DATA=../shared/datasets python benchmarks/bench_new_selectors.py --part batchbald --budgets 100 1000
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from dltest import infer, load_dataset, load_model, select
from dltest.data import to_float_images
from dltest.inference import INFERENCE_BATCH
from dltest.runtime import resolve_device

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_selection import bare_forward  # noqa: E402
from machine import machine  # noqa: E402

SPECS = {
    "badge": ("badge", {}),
    "ats": ("ats", {}),
    "entropy+power": ("entropy", {"sampling": "power"}),
    "dsa": ("dsa", {}),
    "mdsa": ("mdsa", {}),
    "lsa": ("lsa", {}),
}


def timed(spec: str, model, data, device, outputs=None) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one whole selection."""
    metric, options = SPECS[spec]
    extra = {"reference": data} if metric in ("dsa", "mdsa", "lsa") else {}
    started, cpu = time.perf_counter(), time.process_time()
    select(metric, "4%", model=model, data=data, seed=0, device=device, outputs=outputs, **extra, **options)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started, time.process_time() - cpu


def bare(model, images, device) -> tuple[float, float]:
    cpu = time.process_time()
    wall = bare_forward(model, images, INFERENCE_BATCH, device)
    return wall, time.process_time() - cpu


def ratios(repeats: int) -> dict:
    device = resolve_device(None)
    data = load_dataset("mnist", "train")
    model, info = load_model(dataset="mnist")
    model = model.to(device).eval()
    images = to_float_images(data.x)
    bare(model, images, device)  # warm-up
    walls, cpus = [], []
    times = {s: [] for s in SPECS}
    rat = {s: [] for s in SPECS}
    cpu_rat = {s: [] for s in SPECS}
    for _ in range(repeats):
        before = bare(model, images, device)
        walls.append(before[0]), cpus.append(before[1])
        for spec in SPECS:
            took = timed(spec, model, data, device)
            after = bare(model, images, device)
            walls.append(after[0]), cpus.append(after[1])
            times[spec].append(took[0])
            rat[spec].append(took[0] / ((before[0] + after[0]) / 2))
            cpu_rat[spec].append(took[1] / ((before[1] + after[1]) / 2))
            before = after
            print(f"{spec:<14} {took[0]:7.2f} s  ratio {rat[spec][-1]:.2f}  CPU ratio {cpu_rat[spec][-1]:.2f}", flush=True)
    outputs = infer(model, data, device=device)
    alone = {}
    for spec in ("badge", "ats", "entropy+power"):  # the metric alone, on the cached outputs (median of 3, CPU s)
        alone[spec] = statistics.median(timed(spec, model, data, device, outputs)[1] for _ in range(3))
    results = {s: {"ratio": statistics.median(rat[s]), "cpu_ratio": statistics.median(cpu_rat[s]),
                   "bracketed_ratios": rat[s], "bracketed_cpu_ratios": cpu_rat[s], "seconds": times[s],
                   "metric_alone_cpu_seconds": alone.get(s)} for s in SPECS}
    return {"part": "ratios", "pool": "mnist/train", "pool_size": len(data), "model": info.source, "budget": "4%",
            "repeats": repeats, "bare_forward_seconds": walls, "bare_forward_cpu_seconds": cpus,
            "selectors": results, "machine": machine()}


CHILD = """
import json, sys, time
from dltest import load_dataset, load_model, infer, select
budget, factor = int(sys.argv[1]), float(sys.argv[2])
data = load_dataset("mnist", "train")
model, _ = load_model(dataset="mnist")
outputs = infer(model, data)
def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key)) / 1024
before = status("VmRSS:")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak resident set size
started = time.perf_counter()
result = select("batchbald", budget, model=model, data=data, outputs=outputs, seed=0, candidate_factor=factor)
took = time.perf_counter() - started
print(json.dumps({"budget": budget, "seconds": took, "peak_mb_above_start": status("VmHWM:") - before,
                  "options": result.options}))
"""


def batchbald_part(budgets: list[int], factors: list[float]) -> dict:
    rows = []
    for budget, factor in zip(budgets, factors):
        done = subprocess.run([sys.executable, "-c", CHILD, str(budget), str(factor)], capture_output=True, text=True, check=True)
        row = json.loads(done.stdout.strip().splitlines()[-1])
        print(row, flush=True)
        rows.append(row)
    return {"part": "batchbald", "pool": "mnist/train", "samples": 10, "runs": rows, "machine": machine()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["ratios", "batchbald"], default="ratios")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--budgets", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--candidate-factors", type=float, nargs="+", default=None,
                        help="batchbald's candidate_factor per budget (default 10 for each)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.part == "ratios":
        report = ratios(args.repeats)
    else:
        report = batchbald_part(args.budgets, args.candidate_factors or [10.0] * len(args.budgets))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
