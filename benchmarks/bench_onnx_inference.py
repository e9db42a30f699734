"""CPU inference: onnxruntime against torch, for the bundled LeNet-5 models (MNIST, Fashion-MNIST).

Each model is exported with ``dltest.export.export_onnx`` (parity checked on real inputs) and both
engines classify the same float images, already in memory, one thread each (torch's intra-op
threads and onnxruntime's ``intra_op_num_threads``). Per round, torch runs, then onnxruntime,
then torch again; the round's ratio is onnxruntime's time over the mean of the two torch runs
around it (this VM's speed drifts between runs, so only bracketed ratios are compared). The
headline is the median ratio over ``--rounds``; below 1 means onnxruntime is faster.

Two workloads: batches of 256 over ``--n`` test images (a dltest pass), and batch 1 over
``--n-single`` images (a deployed model answering single requests).

    OMP_NUM_THREADS=1 DLTEST_DATA=../shared/datasets python benchmarks/bench_onnx_inference.py \
        --out docs/bench-onnx-inference.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from dltest import load_dataset, load_model
from dltest.export import OnnxClassifier, export_onnx
from machine import machine  # benchmarks/machine.py (this script's folder is on sys.path)


def run(model, batches: list[torch.Tensor]) -> float:
    started = time.perf_counter()
    with torch.inference_mode():
        for xb in batches:
            model(xb)
    return time.perf_counter() - started


def bracketed(torch_model, onnx_model, batches: list[torch.Tensor], rounds: int) -> dict:
    run(torch_model, batches[:4]), run(onnx_model, batches[:4])  # warm-up
    ratios, torch_times, onnx_times = [], [], []
    for _ in range(rounds):
        before = run(torch_model, batches)
        ort = run(onnx_model, batches)
        after = run(torch_model, batches)
        ratios.append(ort / ((before + after) / 2))
        torch_times += [before, after]
        onnx_times.append(ort)
    images = sum(len(b) for b in batches)
    return {
        "images": images, "batch_size": len(batches[0]),
        "ratio_median": round(statistics.median(ratios), 3),
        "ratio_min": round(min(ratios), 3), "ratio_max": round(max(ratios), 3),
        "torch_images_per_s": round(images / statistics.median(torch_times)),
        "onnxruntime_images_per_s": round(images / statistics.median(onnx_times)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", default="mnist,fashion-mnist")
    parser.add_argument("--n", type=int, default=10000, help="images for the batched workload")
    parser.add_argument("--n-single", type=int, default=1000, help="images for the batch-1 workload")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    threads = 1
    torch.set_num_threads(threads)
    results = []
    for name in args.datasets.split(","):
        torch_model, _ = load_model(dataset=name)
        torch_model.eval()
        data = load_dataset(name, "test")
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / f"lenet5-{name}.onnx"
            export = export_onnx(torch_model, path, data, n_check=1000)
            onnx_model = OnnxClassifier(path, threads=threads).eval()
            images = data.images(slice(0, args.n))
            batched = list(images.split(256))
            single = list(images[: args.n_single].split(1))
            row = {
                "dataset": name, "max_abs_logit_diff": export.max_abs_diff, "parity_inputs": export.n_checked,
                "batch_256": bracketed(torch_model, onnx_model, batched, args.rounds),
                "batch_1": bracketed(torch_model, onnx_model, single, args.rounds),
            }
        results.append(row)
        for key in ("batch_256", "batch_1"):
            r = row[key]
            print(f"{name:14s} {key:9s} onnxruntime/torch time {r['ratio_median']:.3f} "
                  f"(rounds {r['ratio_min']:.3f}-{r['ratio_max']:.3f}); torch {r['torch_images_per_s']} img/s, "
                  f"onnxruntime {r['onnxruntime_images_per_s']} img/s")

    record = {
        "command": "OMP_NUM_THREADS=1 DLTEST_DATA=../shared/datasets python benchmarks/bench_onnx_inference.py "
                   + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "out"),
        "machine": {**machine(), "threads": threads},
        "rounds": args.rounds, "results": results,
    }
    if args.out:
        args.out.write_text(json.dumps(record, indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
