"""Selection cost relative to a bare forward pass, over the whole MNIST training set (60k).

For each output-based selector: the wall time of ``dltest.select`` (the one inference pass with
logits, probabilities and embeddings, then the selector) divided by the wall time of a bare
forward pass of the same model over the same pool, with the images already as float tensors
(so the bare pass pays nothing that dltest pays). Both are measured in the same run,
interleaved: every selection is divided by the mean of the bare passes just before and just after
it, and the headline is the median of these bracketed ratios over ``--repeats`` rounds (this VM's
speed drifts by up to 30% between runs, so unpaired timings are not comparable). Beside it: the
fastest selection over the fastest bare pass, and the selector alone on the cached outputs.
Goal: <= 1.05.

    DLTEST_DATA=../shared/datasets python benchmarks/bench_selection.py --out docs/bench-selection.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from dltest import infer, load_dataset, load_model, select
from dltest.data import to_float_images
from dltest.inference import INFERENCE_BATCH
from dltest.runtime import resolve_device
from machine import machine  # benchmarks/machine.py (this script's folder is on sys.path)

SELECTORS = ["random", "entropy", "deepgini", "lc", "margin", "mcp", "dre"]


def bare_forward(model, images: torch.Tensor, batch_size: int, device) -> float:
    started = time.perf_counter()
    with torch.inference_mode():
        for xb in images.split(batch_size):
            model(xb.to(device))
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started


def timed_select(metric: str, model, data, batch_size: int, device) -> float:
    started = time.perf_counter()
    select(metric, "4%", model=model, data=data, seed=0, batch_size=batch_size, device=device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started


def selector_only(metric: str, outputs, data, repeats: int = 20) -> float:
    """Median seconds of the selection alone, on the cached outputs of the one inference pass."""
    runs = []
    for _ in range(repeats):
        started = time.perf_counter()
        select(metric, "4%", outputs=outputs, data=data, seed=0)
        runs.append(time.perf_counter() - started)
    return statistics.median(runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=INFERENCE_BATCH)
    parser.add_argument("--out", default=None, help="write the results as JSON")
    args = parser.parse_args()

    device = resolve_device()
    data = load_dataset("mnist", "train")
    model, info = load_model(dataset="mnist")
    model = model.to(device).eval()
    images = to_float_images(data.x)  # the bare pass gets its floats for free
    timed_select("random", model, data, args.batch_size, device)  # warm-up
    bare_forward(model, images, args.batch_size, device)

    # bare, s1, bare, s2, ..., s7, bare: each selection is divided by the mean of the bare passes
    # just before and just after it, which cancels the drift of a shared VM's speed.
    bare: list[float] = []
    times: dict[str, list[float]] = {m: [] for m in SELECTORS}
    ratios: dict[str, list[float]] = {m: [] for m in SELECTORS}
    for _ in range(args.repeats):
        before = bare_forward(model, images, args.batch_size, device)
        bare.append(before)
        for metric in SELECTORS:
            took = timed_select(metric, model, data, args.batch_size, device)
            after = bare_forward(model, images, args.batch_size, device)
            bare.append(after)
            times[metric].append(took)
            ratios[metric].append(took / ((before + after) / 2))
            before = after

    bare_s = statistics.median(bare)
    bare_min = min(bare)
    outputs = infer(model, data, batch_size=args.batch_size, device=device)
    results = {m: {"seconds_min": min(times[m]), "ratio": statistics.median(ratios[m]),
                   "fastest_ratio": min(times[m]) / bare_min, "bracketed_ratios": ratios[m],
                   "selector_only_ms": 1000 * selector_only(m, outputs, data)}
               for m in SELECTORS}
    report = {"pool": "mnist/train", "pool_size": len(data), "model": info.source, "budget": "4%",
              "batch_size": args.batch_size, "repeats": args.repeats, "bare_forward_seconds_min": bare_min,
              "bare_forward_seconds_median": bare_s,
              "selectors": results, "machine": machine()}
    print(f"bare forward pass over {len(data)} inputs: fastest {bare_min:.3f} s, median {bare_s:.3f} s ({len(bare)} runs)")
    pooled = statistics.median(r for m in SELECTORS for r in ratios[m])
    report["pooled_median_ratio"] = pooled
    print(f"{'selector':<10} {'ratio (median bracketed)':>25} {'fastest/fastest':>16} {'selector alone ms':>18}")
    for metric, r in results.items():
        print(f"{metric:<10} {r['ratio']:>25.3f} {r['fastest_ratio']:>16.3f} {r['selector_only_ms']:>18.1f}")
    print(f"all selections pooled: median bracketed ratio {pooled:.3f} ({len(SELECTORS) * args.repeats} selections)")
    print(f"machine: {report['machine']}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
