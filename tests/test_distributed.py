"""Sharded scoring under torch.distributed: 2 CPU processes (gloo) give what one process gives.

The multi-process tests launch real ``torchrun`` runs (``python -m torch.distributed.run``) on a
700-image MNIST pool; with batches of 256 its shards are unequal (256 and 444 images).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dltest import runtime
from dltest.selection import select
from dltest.selectors import REGISTRY

REPO = Path(__file__).resolve().parents[1]
POOL_SIZE = 700
CACHE_METRICS = sorted(name for name, cls in REGISTRY.items() if not cls.needs_model)  # the output-based ones
MC_METRICS = ["bald", "dropout-entropy"]


def torchrun(*args: str, cwd: Path, timeout: float = 120, monitor: float = 0.1) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1", "DLTEST_DEVICE": "cpu"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "--monitor-interval", str(monitor), *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def dltest(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "DLTEST_DEVICE": "cpu"}
    return subprocess.run([sys.executable, "-m", "dltest", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=120)


def without_timing(path: Path) -> dict:
    record = json.loads(path.read_text())
    record.pop("seconds")
    return record


@pytest.fixture(scope="module")
def pool_file(mnist_test, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("dist") / "pool.npz"
    np.savez(path, x=mnist_test.x[:POOL_SIZE, 0].numpy(), y=mnist_test.y[:POOL_SIZE].numpy())
    return path


# --- shard arithmetic, one process ---------------------------------------------------------------


@pytest.mark.parametrize("n, block, size", [(700, 256, 2), (10, 1, 3), (5, 4, 4), (0, 8, 2), (1000, 1, 1)])
def test_shards_are_contiguous_whole_blocks_covering_the_pool_once(monkeypatch, n, block, size):
    shards = []
    for r in range(size):
        monkeypatch.setattr(runtime, "rank", lambda r=r: r)
        monkeypatch.setattr(runtime, "world_size", lambda: size)
        shards.append(runtime.shard_positions(n, block))
    assert [i for shard in shards for i in shard] == list(range(n))  # pool order, no padding, no repeats
    assert all(s.start % block == 0 for s in shards if len(s))
    assert max(map(len, shards)) - min(map(len, shards)) <= block


def test_alone_every_helper_is_the_identity():
    x = torch.arange(6.0).reshape(3, 2)
    assert runtime.rank() == 0 and runtime.world_size() == 1 and runtime.is_main()
    assert runtime.shard_positions(7, 3) == range(7)
    assert runtime.gather(x) is x and runtime.broadcast_object({"a": 1}) == {"a": 1}


def _gather_worker(r: int, init: str, results) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=r, world_size=2)
    rows = [torch.arange(6.0).reshape(3, 2), None][r]  # rank 1's shard is empty
    results[r] = runtime.gather(rows).tolist(), runtime.gather(torch.full((r + 1, 2), float(r))).tolist()
    dist.destroy_process_group()


@pytest.mark.slow
def test_gather_concatenates_unequal_and_empty_shards_in_rank_order(tmp_path):
    import torch.multiprocessing as mp

    results = mp.Manager().dict()
    mp.spawn(_gather_worker, args=(f"file://{tmp_path / 'rendezvous'}", results), nprocs=2)
    for r in range(2):  # every rank gets the whole result
        assert results[r][0] == torch.arange(6.0).reshape(3, 2).tolist()
        assert results[r][1] == [[0.0, 0.0], [1.0, 1.0], [1.0, 1.0]]


# --- select under torchrun -----------------------------------------------------------------------


@pytest.mark.slow
def test_every_output_metric_and_mc_dropout_select_the_same_under_two_processes(pool_file, lenet_checkpoint, tmp_path):
    from dltest.checkpoint import load_model
    from dltest.data import load_dataset

    metrics = CACHE_METRICS + MC_METRICS
    out = tmp_path / "two.json"
    run = torchrun(str(REPO / "tests" / "dist_helpers.py"), str(pool_file), str(lenet_checkpoint), "40", str(out),
                   json.dumps(metrics), cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    two = json.loads(out.read_text())
    data = load_dataset(str(pool_file), "all")
    net, _ = load_model(lenet_checkpoint)
    for metric in metrics:
        one = select(metric, 40, model=net, data=data, seed=5, device="cpu").indices
        assert two[metric] == one, metric
    assert "coreset" in two and "entropy" in two and "badge" in two


@pytest.mark.slow
def test_cli_select_json_is_byte_identical_apart_from_timing(pool_file, trained_lenet, tmp_path):
    """bald on a TorchScript model with its own dropout: T full passes sharded across ranks."""
    scripted = tmp_path / "lenet.ts"
    torch.jit.save(torch.jit.script(torch.nn.Sequential(torch.nn.Dropout(0.2), trained_lenet).eval()), str(scripted))
    args = ["select", "--metric", "bald", "--budget", "5%", "--mc-samples", "3", "--dataset", str(pool_file),
            "--split", "all", "--model", str(scripted), "--seed", "7", "--csv"]
    one = dltest(*args, "one.csv", "--out", "one.json", cwd=tmp_path)
    assert one.returncode == 0, one.stderr
    two = torchrun("-m", "dltest", *args, "two.csv", "--out", "two.json", cwd=tmp_path)
    assert two.returncode == 0, two.stderr[-3000:]
    assert without_timing(tmp_path / "two.json") == without_timing(tmp_path / "one.json")
    assert json.loads((tmp_path / "two.json").read_text())["options"]["dropout_placement"] == "model"
    assert (tmp_path / "two.csv").read_bytes() == (tmp_path / "one.csv").read_bytes()
    assert two.stdout.count("wrote two.json") == 1  # only rank 0 prints
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lenet.ts", "one.csv", "one.json", "two.csv", "two.json"]


@pytest.mark.slow
def test_a_killed_rank_fails_the_run_with_one_line_and_writes_nothing(pool_file, trained_lenet, tmp_path):
    from tests.dist_helpers import DiesOnRank1

    torch.save(DiesOnRank1(trained_lenet), tmp_path / "dies.pt")
    # torchrun checks its workers every 2 s here, so rank 0 sees the lost peer before it is stopped
    run = torchrun("-m", "dltest", "select", "--metric", "entropy", "--budget", "10", "--dataset", str(pool_file),
                   "--split", "all", "--model", "dies.pt", "--trust-model", "--out", "sel.json", cwd=tmp_path,
                   monitor=2)
    assert run.returncode != 0
    ours = [line for line in run.stderr.splitlines() if line.startswith("error: ")]
    assert len(ours) == 1 and ours[0].startswith("error: rank 0 of 2: another rank failed or left the run"), run.stderr
    assert not (tmp_path / "sel.json").exists()


# --- training under torchrun ---------------------------------------------------------------------

TRAIN = ["train", "--dataset", "mnist", "--train-size", "1000", "--epochs", "1", "--batch-size", "64", "--seed", "3"]


@pytest.mark.slow
@pytest.mark.parametrize("kind, tolerance", [("standard", 0.005), ("adversarial", 0.03)])
def test_one_epoch_of_ddp_training_matches_one_process(kind, tolerance, tmp_path):
    """Same global batches, augmentation and mean-loss gradient on any rank count; what differs:
    float summation order (standard training of LeNet-5, which has no dropout or BatchNorm) and,
    in adversarial training, the PGD random starts each rank draws. Stated tolerance: 0.5 points
    of holdout accuracy (standard; weights within 1e-4), 3 points (adversarial)."""
    from tests.dist_helpers import train_small

    run = torchrun(str(REPO / "tests" / "dist_helpers.py"), "train", kind, str(tmp_path / "two.json"), cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    two = json.loads((tmp_path / "two.json").read_text())
    one = train_small(kind == "adversarial")
    assert abs(one["holdout_accuracy"] - two["holdout_accuracy"]) <= tolerance
    assert two["history"][0]["train_accuracy"] > 0 and len(two["history"]) == 1
    if kind == "standard":
        assert abs(one["history"][0]["loss"] - two["history"][0]["loss"]) <= 1e-5
        assert one["history"][0]["train_accuracy"] == two["history"][0]["train_accuracy"]  # totals over both ranks
        for name, weights in one["state_dict"].items():
            assert torch.allclose(torch.tensor(weights), torch.tensor(two["state_dict"][name]), atol=1e-4), name


@pytest.mark.slow
def test_resume_under_torchrun_after_a_failed_run(tmp_path):
    """A run that dies after its first epoch leaves <out>.partial; torchrun ... --resume continues
    from it on 2 processes and finishes the second epoch only."""
    args = [*TRAIN[:6], "2", *TRAIN[7:], "--out", "model.pt"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "DLTEST_DEVICE": "cpu"}
    first = subprocess.Popen([sys.executable, "-m", "dltest", *args], cwd=tmp_path, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    partial = tmp_path / "model.pt.partial"
    try:
        while first.poll() is None and not partial.exists():
            import time

            time.sleep(0.05)
    finally:
        first.kill()
        first.wait()
    assert partial.exists() and not (tmp_path / "model.pt").exists(), "the run finished before it could be killed"
    saved = torch.load(partial, weights_only=True)
    assert saved["epoch"] == 0
    resumed = torchrun("-m", "dltest", *args, "--resume", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    report = json.loads((tmp_path / "model.json").read_text())
    assert [h["epoch"] for h in report["history"]] == [0, 1]
    assert report["history"][0] == saved["history"][0]  # epoch 0 was not run again
    assert not partial.exists()
