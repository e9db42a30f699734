"""Adversarial-examples files from elsewhere (issue 16): uint8 pixels are scaled to [0, 1] as every
loader does, and a small file declaring a huge array is refused from its headers, in bounded memory.
"""

from __future__ import annotations

import io
import json
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from dltest.attacks import AdversarialExamples, load_adversarial, with_examples
from dltest.errors import DltestError
from tests.cli_runner import run_cli

META = {"dataset": "mnist", "split": "val", "attack": {"name": "fgsm"}, "seed": 0}


@pytest.fixture(scope="module")
def pool():
    from dltest.data import load_dataset

    return load_dataset("mnist", "val")


def _examples_file(path: Path, x: np.ndarray, n: int, meta: dict = META) -> Path:
    np.savez(path, x=x, y=np.arange(n) % 10, indices=np.arange(n), meta=np.array(json.dumps(meta)))
    return path


def _declaring(path: Path, shape: tuple[int, ...], zeros: int = 2**20) -> Path:
    """A compressed .npz whose x header declares ``shape`` (uint8) but holds ``zeros`` bytes of
    zeros (a few KiB on disk), beside real y, indices and meta for ``shape[0]`` images."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "|u1", "fortran_order": False, "shape": shape})
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("x.npy", header.getvalue() + bytes(zeros))  # the header starts with the magic
        for name, array in (("y", np.zeros(shape[0], np.int64)), ("indices", np.arange(shape[0])),
                            ("meta", np.array(json.dumps(META)))):
            buffer = io.BytesIO()
            np.save(buffer, array)
            archive.writestr(f"{name}.npy", buffer.getvalue())
    assert path.stat().st_size < 100_000
    return path


def test_uint8_examples_are_scaled_to_the_unit_range(pool, tmp_path):
    positions = torch.arange(12)
    raw = pool.x[positions].permute(0, 2, 3, 1).numpy()  # uint8 0..255, as a user's tool saves it
    assert raw.dtype == np.uint8 and raw.max() == 255
    examples = load_adversarial(_examples_file(tmp_path / "u8.npz", raw, 12), pool)
    assert examples.x.dtype == torch.float32 and float(examples.x.max()) == 1.0 and float(examples.x.min()) == 0.0
    assert torch.allclose(examples.x, pool.images(positions), atol=1e-6)  # the same pixels as the pool's

    mixed = with_examples(pool.subset(torch.arange(5)), examples)  # what retrain trains on
    assert len(mixed) == 17 and float(mixed.x.max()) == 1.0


def test_with_examples_scales_uint8_images_given_directly(pool):
    images = pool.x[:3]
    examples = AdversarialExamples(images, pool.y[:3], torch.arange(3), torch.arange(3), pool.y[:3], pool.y[:3],
                                   "mnist", "val", {}, 0)
    mixed = with_examples(pool.subset(torch.arange(2)), examples)
    assert torch.allclose(mixed.x[2:], images.float() / 255, atol=1e-6)


def _refused_in_bounded_memory(path: Path, data, message: str) -> int:
    """Load ``path`` under tracemalloc (numpy reports its buffers there); the refusal's peak in bytes."""
    tracemalloc.start()
    try:
        with pytest.raises(DltestError, match=message) as err:
            load_adversarial(path, data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert "\n" not in str(err.value)
    return peak


@pytest.mark.parametrize("shape, message", [
    ((2500, 1000, 1000, 1), r"holds inputs of shape \(1, 1000, 1000\), but mnist has \(1, 28, 28\)"),
    ((2500, 1000, 1000), r"x must have shape \(N, H, W, C\) with C 1 or 3, not \(2500, 1000, 1000\)"),
])
def test_a_huge_declared_shape_is_refused_before_any_array_is_read(pool, tmp_path, monkeypatch, shape, message):
    monkeypatch.setenv("DLTEST_MAX_BYTES", str(64 * 2**30))  # the size would pass: the shape refuses it
    path = _declaring(tmp_path / "declared.npz", shape)  # 2.5 GB declared, 10 GB as float32
    assert _refused_in_bounded_memory(path, pool, message) < 16 * 2**20


def test_the_size_check_counts_the_float32_images(pool, tmp_path, monkeypatch):
    monkeypatch.setenv("DLTEST_MAX_BYTES", str(4 * 10**9))  # the uint8 file (2.5 GB) fits, its float32 images do not
    path = _declaring(tmp_path / "declared.npz", (2500, 1000, 1000, 1))
    peak = _refused_in_bounded_memory(path, None, r"needs 9.3 GiB as float32 images, more than the 3.7 GiB allowed")
    assert peak < 16 * 2**20


def test_retrain_refuses_the_declared_file_in_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = _declaring(tmp_path / "declared.npz", (2500, 1000, 1000, 1))
    result = run_cli("retrain", "--examples", str(path), "--out", str(tmp_path / "r.pt"))
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert "holds inputs of shape (1, 1000, 1000), but mnist has (1, 28, 28)" in lines[0]
    assert not (tmp_path / "r.pt").exists()


@pytest.mark.parametrize("seed", ["abc", 1.5, None, True])
def test_a_seed_that_is_not_an_integer_is_one_line(pool, tmp_path, seed):
    path = _examples_file(tmp_path / "seed.npz", pool.x[:2].permute(0, 2, 3, 1).numpy(), 2, {**META, "seed": seed})
    with pytest.raises(DltestError, match=f"meta 'seed' must be an integer, got {seed!r}"):
        load_adversarial(path, pool)
