"""Selection cost relative to a bare forward pass, over the whole MNIST training set (60k).

For each output-based selector: the wall time of ``dltest.select`` (the one inference pass with
logits, probabilities and embeddings, then the selector) divided by the wall time of a bare
forward pass of the same model over the same pool, with the images already as float tensors
(so the bare pass pays nothing that dltest pays). Both are measured in the same run,
interleaved: every selection is paired with the bare pass just before it. The headline ratio is
the fastest selection over the fastest bare pass (this VM's noise only ever slows a run down, by
up to 30% at random, so the minimum is the stable estimate); the median of the paired ratios is
reported beside it. Goal: <= 1.05.

    DLTEST_DATA=../shared/datasets python benchmarks/bench_selection.py --out docs/bench-selection.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from dltest import load_dataset, load_model, select
from dltest.data import to_float_images
from dltest.settings import default_device

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


def machine() -> dict:
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": torch.get_num_threads(), "torch": torch.__version__,
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--out", default=None, help="write the results as JSON")
    args = parser.parse_args()

    device = default_device()
    data = load_dataset("mnist", "train")
    model, info = load_model(dataset="mnist")
    model = model.to(device).eval()
    images = to_float_images(data.x)  # the bare pass gets its floats for free
    timed_select("random", model, data, args.batch_size, device)  # warm-up
    bare_forward(model, images, args.batch_size, device)

    bare: list[float] = []
    times: dict[str, list[float]] = {m: [] for m in SELECTORS}
    ratios: dict[str, list[float]] = {m: [] for m in SELECTORS}
    for _ in range(args.repeats):
        for metric in SELECTORS:
            bare.append(bare_forward(model, images, args.batch_size, device))
            times[metric].append(timed_select(metric, model, data, args.batch_size, device))
            ratios[metric].append(times[metric][-1] / bare[-1])

    bare_s = statistics.median(bare)
    bare_min = min(bare)
    results = {m: {"seconds_min": min(times[m]), "ratio": min(times[m]) / bare_min,
                   "median_paired_ratio": statistics.median(ratios[m]), "paired_ratios": ratios[m]}
               for m in SELECTORS}
    report = {"pool": "mnist/train", "pool_size": len(data), "model": info.source, "budget": "4%",
              "batch_size": args.batch_size, "repeats": args.repeats, "bare_forward_seconds_min": bare_min,
              "bare_forward_seconds_median": bare_s,
              "selectors": results, "machine": machine()}
    print(f"bare forward pass over {len(data)} inputs: fastest {bare_min:.3f} s, median {bare_s:.3f} s ({len(bare)} runs)")
    print(f"{'selector':<10} {'fastest s':>9} {'ratio':>7} {'median paired ratio':>20}")
    for metric, r in results.items():
        print(f"{metric:<10} {r['seconds_min']:>9.3f} {r['ratio']:>7.3f} {r['median_paired_ratio']:>20.3f}")
    print(f"machine: {report['machine']}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
