"""Scaling of pool scoring across processes: ``select("entropy")`` (one sharded inference pass,
the gather, the selector on rank 0) with 1 process and with N under torchrun.

Scaling efficiency = t(1) / (N * t(N)); 1.0 is perfect. Pools: the MNIST training set (60k) and
a synthetic pool of random 28x28 grey images (default 1M; generated from a seed on every rank).
Model: the bundled LeNet-5. Each process uses one thread (OMP_NUM_THREADS=1). The driver runs the
process counts in the order 1, N, 1 for every pool (the 1M pool: 1, N only, to keep the CPU cost
down) and records the load average, since the machine may be shared.

    DLTEST_DATA=../shared/datasets python benchmarks/bench_distributed_scoring.py --out docs/bench-distributed-scoring.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def worker(pool: str, size: int) -> None:
    """Under torchrun (or alone): score the pool once, print rank 0's timing as one JSON line."""
    import torch.distributed as dist

    from dltest import load_dataset, load_model, select
    from dltest.data import ImageDataset
    from dltest.runtime import distributed, is_main, world_size

    torch.set_num_threads(1)
    with distributed():
        if pool == "mnist":
            data = load_dataset("mnist", "train")
        else:
            x = torch.randint(0, 256, (size, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
            data = ImageDataset("synthetic", "all", x, torch.zeros(size, dtype=torch.long), [str(i) for i in range(10)],
                                torch.arange(size))
        model, _ = load_model(None, dataset="mnist")
        if world_size() > 1:
            dist.barrier()
        started = time.perf_counter()
        result = select("entropy", "1%", model=model, data=data, seed=0, device="cpu")
        seconds = time.perf_counter() - started
        if is_main():
            print(json.dumps({"pool": pool, "size": len(data), "processes": world_size(), "seconds": round(seconds, 3),
                              "first_indices": result.indices[:5]}))


def run(pool: str, size: int, processes: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DLTEST_DEVICE": "cpu",
           "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    script = [str(Path(__file__).resolve()), "--worker", pool, "--size", str(size)]
    command = ([sys.executable, *script] if processes == 1 else
               [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes), *script])
    load_before = os.getloadavg()[0]
    out = subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout
    record = json.loads(out.strip().splitlines()[-1])
    record["load_average_1min_before"] = round(load_before, 2)
    print(json.dumps(record), flush=True)
    return record


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", choices=["mnist", "synthetic"])
    parser.add_argument("--size", type=int, default=1_000_000)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--pools", default="mnist,synthetic")
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.size)
        return
    n = args.processes
    results = []
    for pool in args.pools.split(","):
        order = [1, n, 1] if pool == "mnist" else [1, n]
        runs = [run(pool, args.size, p) for p in order]
        one = min(r["seconds"] for r in runs if r["processes"] == 1)
        many = next(r["seconds"] for r in runs if r["processes"] == n)
        assert all(r["first_indices"] == runs[0]["first_indices"] for r in runs), "selections differ"
        results.append({"pool": pool, "size": runs[0]["size"], "runs": runs, "speedup": round(one / many, 3),
                        "efficiency": round(one / (n * many), 3)})
        print(json.dumps(results[-1]), flush=True)
    record = {"benchmark": "distributed pool scoring (select entropy, LeNet-5)", "machine": platform.node(),
              "cpus": os.cpu_count(), "torch": torch.__version__, "processes": n,
              "load_average_after": [round(v, 2) for v in os.getloadavg()], "results": results}
    if args.out:
        Path(args.out).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
