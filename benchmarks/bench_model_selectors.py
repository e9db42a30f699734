"""Benchmarks of the model-dependent selectors (issue 4), each part in one run on one pool and model.

    DLTEST_DATA=/work/shared/datasets .venv/bin/python benchmarks/bench_model_selectors.py --part all

- bald:    BALD (T=10) end to end (one inference pass + head-only sampling + ranking) divided by one
           bare forward pass over the same pool; also T full passes with dropout, the usual way.
- dfal:    batched DeepFool vs torchattacks' per-image DeepFool(steps=50, overshoot=0.02) on the same
           seeded candidates, with how far the norms agree.
- coreset: k-center greedy on 60k x 512 random embeddings, budget 5000: time and peak memory
           (growth of the process's peak RSS) against the n x n matrix it avoids.
Prints the machine (CPU model, cores, threads, torch version) and a JSON line per part.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import statistics
import time

import torch
from machine import machine  # benchmarks/machine.py (this script's folder is on sys.path)


def timed_pair(first, second, repeat: int = 5) -> tuple[float, float, float]:
    """Median times of two functions and the median of their per-round ratio second / first, run
    alternately (round after round), so that a shared machine's changing load hits both alike."""
    first(), second()
    a, b = [], []
    for _ in range(repeat):
        for fn, store in ((first, a), (second, b)):
            start = time.perf_counter()
            fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            store.append(time.perf_counter() - start)
    return statistics.median(a), statistics.median(b), statistics.median(y / x for x, y in zip(a, b))


def lenet_and_pool(pool_size: int | None):
    from dltest.checkpoint import load_model
    from dltest.data import load_dataset
    from dltest.errors import DltestError

    data = load_dataset("mnist", "test")
    if pool_size:
        data = data.subset(torch.arange(pool_size))
    try:
        model, info = load_model(None, dataset="mnist")
        source = info.source
    except DltestError:  # no bundled model yet: timings of BALD do not depend on the weights
        from dltest.zoo import model_for_dataset

        torch.manual_seed(0)
        model, source = model_for_dataset("mnist").eval(), "untrained zoo lenet5"
    return model.eval(), data, source


def bench_bald(device: torch.device) -> dict:
    from dltest.selection import select
    from dltest.inference import dropout_masks

    model, data, source = lenet_and_pool(None)
    model.to(device)

    @torch.inference_mode()
    def bare_forward():
        for s in range(0, len(data), 1024):
            model(data.images(slice(s, s + 1024), device))

    def bald():
        select("bald", 100, model=model, data=data, seed=0, device=device, samples=10)

    @torch.inference_mode()
    def full_passes():  # the usual implementation: T passes through the whole model
        g = torch.Generator().manual_seed(0)
        for s in range(0, len(data), 1024):
            x = data.images(slice(s, s + 1024), device)
            for _ in range(10):
                z = model.embed(x)
                model.head(z * dropout_masks(*z.shape, 0.1, g).to(device))

    forward, t_bald, ratio = timed_pair(bare_forward, bald)
    forward2, t_full, ratio_full = timed_pair(bare_forward, full_passes, repeat=2)
    return {
        "part": "bald", "model": source, "pool": f"mnist test, {len(data)} inputs", "T": 10,
        "forward_s": round(forward, 4), "bald_s": round(t_bald, 4), "bald_over_forward": round(ratio, 2),
        "goal": "<= 1.5", "t_full_passes_s": round(t_full, 4), "full_passes_over_forward": round(ratio_full, 2),
    }


def bench_dfal(device: torch.device, candidates: int) -> dict:
    import torchattacks

    from dltest.attacks.kernels import deepfool_l2
    from dltest.selectors.dfal import DFAL

    model, data, source = lenet_and_pool(None)
    model.to(device)
    budget = candidates // 10
    chosen = DFAL().candidates(len(data), budget, torch.Generator().manual_seed(0))
    x = data.images(chosen, device)

    start = time.perf_counter()
    result = deepfool_l2(model, x)
    norms, iterations = result.norms, result.iterations
    t_batched = time.perf_counter() - start

    with torch.no_grad():
        labels = model(x).argmax(1)
    attack = torchattacks.DeepFool(model, steps=50, overshoot=0.02)
    start = time.perf_counter()
    adv = attack(x, labels)
    t_ta = time.perf_counter() - start
    with torch.no_grad():
        flipped = model(adv).argmax(1) != labels
    final = (adv - x).flatten(1).norm(dim=1).double().cpu()
    ref = torch.where(flipped.cpu(), final, torch.tensor(math.inf, dtype=torch.float64))

    both = torch.isfinite(norms) & torch.isfinite(ref)
    rel = ((norms - ref).abs() / ref.clamp_min(1e-12))[both]
    same = (torch.isinf(norms) & torch.isinf(ref)) | (both & ((norms - ref).abs() <= 1e-4 * ref + 1e-6))
    final_rel = (result.final_norms - final).abs() / final.clamp_min(1e-12)
    disagree = torch.isinf(norms) != torch.isinf(ref)
    return {
        "part": "dfal", "model": source, "candidates": len(chosen), "budget": budget,
        "batched_s": round(t_batched, 3), "torchattacks_s": round(t_ta, 3), "speedup": round(t_ta / t_batched, 1),
        "goal": ">= 20", "mean_iterations": round(float(iterations.float().mean()), 2),
        "never_flipped_batched": int(torch.isinf(norms).sum()), "never_flipped_torchattacks": int(torch.isinf(ref).sum()),
        "agree_rtol_1e-4": f"{int(same.sum())}/{len(chosen)}",
        "median_rel_diff_both_finite": float(rel.median()) if len(rel) else None,
        "max_rel_diff_both_finite": float(rel.max()) if len(rel) else None,
        "max_rel_diff_last_iterate_norms_all": float(final_rel.max()),
        "flip_decision_differs": int(disagree.sum()),
        "max_abs_logit_margin_where_flip_differs": float(result.margins[disagree].abs().max()) if disagree.any() else None,
    }


def bench_coreset(device: torch.device, n: int, d: int, budget: int) -> dict:
    from dltest.selectors.coreset import k_center_greedy

    embeddings = torch.randn(n, d, generator=torch.Generator().manual_seed(0))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB, peak so far
    start = time.perf_counter()
    picked, scores = k_center_greedy(embeddings, budget, torch.Generator().manual_seed(0), device=device)
    seconds = time.perf_counter() - start
    rss_peak_growth = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    out = {
        "part": "coreset", "n": n, "d": d, "budget": budget, "seconds": round(seconds, 2),
        "ms_per_center": round(1000 * seconds / budget, 3),
        "peak_rss_growth_MiB": round(rss_peak_growth, 1),
        "embeddings_MiB": round(n * d * 4 / 2**20, 1), "n_by_n_matrix_MiB": round(n * n * 4 / 2**20, 1),
        "distinct": len(set(picked.tolist())) == budget,
    }
    if device.type == "cuda":
        out["cuda_peak_MiB"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--part", choices=["bald", "dfal", "coreset", "all"], default="all")
    parser.add_argument("--device", default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--dfal-candidates", type=int, default=200)
    parser.add_argument("--coreset-n", type=int, default=60000)
    parser.add_argument("--coreset-d", type=int, default=512)
    parser.add_argument("--coreset-budget", type=int, default=5000)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from dltest.runtime import resolve_device

    device = resolve_device(args.device)
    print(json.dumps({"machine": machine(), "device": str(device)}))
    parts = ["bald", "dfal", "coreset"] if args.part == "all" else [args.part]
    for part in parts:
        if part == "bald":
            result = bench_bald(device)
        elif part == "dfal":
            result = bench_dfal(device, args.dfal_candidates)
        else:
            result = bench_coreset(device, args.coreset_n, args.coreset_d, args.coreset_budget)
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
