"""Bad input across every command, as a table: each case must exit with code 2 and one line on
stderr (``error: ...`` naming the problem), print no traceback, write no file (no temporary one
either) and leave every file that existed before, inputs and old outputs, byte for byte the same.

The files the cases need are made once (module fixture ``files``); the outputs of each case go to
its own folder ``out``, which holds only what the case's ``setup`` put there.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import shutil
import stat
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import numpy as np
import pytest
import torch

from dltest.data import load_dataset
from tests.client_nets import ClientLeNet, client_state_dict
from tests.cli_runner import run_cli as run

NETS = Path(__file__).with_name("client_nets.py")
SHARED = Path(os.environ["DLTEST_DATA"])


# --- the files the cases use ------------------------------------------------------------------


def _npz(path: Path, **arrays) -> Path:
    np.savez(path, **arrays)
    return path


def _huge_npz(path: Path) -> Path:
    """An .npz whose x header claims 10^9 MNIST-sized images (the data is not there)."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "|u1", "fortran_order": False,
                                                  "shape": (10**9, 28, 28)})
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("x.npy", b"\x93NUMPY" + header.getvalue()[6:] + b"\x00" * 64)
        buf = io.BytesIO()
        np.save(buf, np.zeros(10**9 // 10**9, np.int64))
        z.writestr("y.npy", buf.getvalue())
    return path


def _examples(path: Path, x: np.ndarray, y: np.ndarray) -> Path:
    meta = {"dataset": "mnist", "split": "val", "attack": {"name": "fgsm"}, "seed": 0}
    np.savez(path, x=x, y=y, indices=np.arange(len(y)), source_index=np.arange(len(y)),
             meta=np.array(json.dumps(meta)))
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory, lenet_checkpoint, mnist_test, trained_lenet):
    d = tmp_path_factory.mktemp("inputs")
    f = SimpleNamespace(dir=d)
    f.model = d / "lenet.pt"
    shutil.copy(lenet_checkpoint, f.model)
    x, y = mnist_test.x[:40, 0].numpy(), mnist_test.y[:40].numpy()
    xf = x.astype(np.float32) / 255
    f.pool = _npz(d / "pool.npz", x=x, y=y)
    f.unlabeled = _npz(d / "unlabeled.npz", x=x)
    f.nan = _npz(d / "nan.npz", x=np.where(np.arange(28) == 3, np.nan, xf), y=y)
    f.inf = _npz(d / "inf.npz", x=np.where(np.arange(28) == 3, np.inf, xf), y=y)
    f.range = _npz(d / "range.npz", x=xf * 2, y=y)
    f.label_range = _npz(d / "label-range.npz", x=x, y=np.where(np.arange(40) == 5, 12, y),
                         classes=np.array([str(i) for i in range(10)]))
    f.label_1e9 = _npz(d / "label-1e9.npz", x=x, y=np.where(np.arange(40) == 5, 10**9, y))
    f.label_negative = _npz(d / "label-negative.npz", x=x, y=np.where(np.arange(40) == 5, -1, y))
    f.label_float = _npz(d / "label-float.npz", x=x, y=y.astype(np.float32))
    f.mismatch = _npz(d / "mismatch.npz", x=x, y=y[:39])
    f.empty = _npz(d / "empty.npz", x=np.zeros((0, 28, 28), np.uint8), y=np.zeros(0, np.int64))
    f.huge = _huge_npz(d / "huge.npz")
    f.int_pixels = _npz(d / "int-pixels.npz", x=x.astype(np.int64), y=y)
    f.flat = _npz(d / "flat.npz", x=x.reshape(40, -1), y=y)
    f.objects = d / "objects.npz"
    np.savez(f.objects, x=np.array([{"a": 1}] * 40, dtype=object), y=y)
    f.junk = d / "junk.npz"
    f.junk.write_bytes(b"not a zip file")

    f.pickled = d / "pickled.pt"
    torch.save(ClientLeNet(), f.pickled)
    f.corrupt = d / "corrupt.pt"
    f.corrupt.write_bytes(f.model.read_bytes()[:3000])
    state = torch.load(f.model, weights_only=True)
    state["state_dict"]["head.bias"] = state["state_dict"]["head.bias"] + 0.5  # digest left as it was
    f.altered = d / "altered.pt"
    torch.save(state, f.altered)
    weights = client_state_dict(trained_lenet)
    f.bare = d / "bare.pt"
    torch.save(weights, f.bare)
    f.nan_weights = d / "nan-weights.pt"
    torch.save({**weights, "fc3.bias": torch.full((10,), float("nan"))}, f.nan_weights)

    f.pipe = d / "pipe"
    os.mkfifo(f.pipe)
    f.sel_repeats = d / "repeats.json"
    f.sel_repeats.write_text(json.dumps({"indices": [1, 2, 2]}))
    f.sel_bools = d / "bools.json"
    f.sel_bools.write_text(json.dumps({"indices": [True, False, 3]}))
    f.sel_outside = d / "outside.json"
    f.sel_outside.write_text(json.dumps({"indices": [3, 40000], "dataset": "mnist", "split": "val"}))
    f.deep = d / "deep.json"
    f.deep.write_text("[" * 100_000 + "]" * 100_000)

    f.folder = d / "folder"
    from PIL import Image
    for label in ("a", "b"):
        (f.folder / label).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(x[i]).save(f.folder / label / f"{i}.png")
    (f.folder / "b" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")

    f.cifar_root = d / "cifar-root"
    batches = f.cifar_root / "cifar-10-batches-py"
    batches.mkdir(parents=True)

    class Trap:
        def __reduce__(self):
            return (os.system, (f"touch {d / 'PWNED'}",))

    with open(batches / "test_batch", "wb") as fh:
        pickle.dump({"data": np.zeros((2, 3072), np.uint8), "labels": [0, 1], "trap": Trap()}, fh)
    shutil.copy(SHARED / "cifar10-sample" / "batches.meta", batches / "batches.meta")

    val = load_dataset("mnist", "val")
    vx = val.images(slice(0, 8)).permute(0, 2, 3, 1).numpy()
    f.adv_nan = _examples(d / "adv-nan.npz", np.where(np.arange(28)[None, :, None] == 2, np.nan, vx), val.y[:8].numpy())
    f.adv_range = _examples(d / "adv-range.npz", vx + 0.5, val.y[:8].numpy())
    f.adv_labels = _examples(d / "adv-labels.npz", vx, np.full(8, 11))
    return f


# --- the cases --------------------------------------------------------------------------------


@dataclass
class Case:
    id: str
    args: Callable[[SimpleNamespace, Path], list]  # (files, out folder) -> command line
    message: str  # a part of the one error line
    setup: Callable[[SimpleNamespace, Path], None] | None = None  # extra files in the out folder
    patch: Callable[[pytest.MonkeyPatch], None] | None = None
    env: dict[str, str] | None = None  # set for the case (paths relative to the out folder)
    started: bool = False  # the failure comes once the work has begun: its progress lines come first


def sel(*extra):
    """dltest select on the small labeled pool with the test LeNet, output in the case's folder."""
    return lambda f, o: ["select", "-d", f.pool, "-m", f.model, "--metric", "margin", "-b", "5",
                         "--out", o / "sel.json", *[e(f, o) if callable(e) else e for e in extra]]


def on(pool_attr):
    return lambda f, o: ["select", "-d", getattr(f, pool_attr), "-m", f.model, "-b", "5", "--out", o / "s.json"]


def with_model(attr, *extra):
    return lambda f, o: ["select", "-d", f.pool, "-m", getattr(f, attr), *extra, "-b", "5", "--out", o / "s.json"]


RETRAIN_FAST = ["--metric", "random", "-b", "5", "--attack", "fgsm", "--eval-attacks", "fgsm", "--eval-n", "10",
                "--val-n", "10", "--epochs", "1", "--train-size", "50"]


def retrain(*extra):
    return lambda f, o: ["retrain", "-m", f.model, *RETRAIN_FAST, "--out", o / "r.pt",
                         *[e(f, o) if callable(e) else e for e in extra]]


def train(*extra):
    return lambda f, o: ["train", "--epochs", "1", "--train-size", "100", "--out", o / "m.pt", *extra]


def _write_partial(kind):
    def setup(f, o):
        path = o / "m.pt.partial"
        if kind == "empty":
            path.write_bytes(b"")
        elif kind == "truncated":
            path.write_bytes(f.model.read_bytes()[:5000])
        else:  # a real partial state from another configuration: 60 training inputs instead of 100
            from dltest.training import TrainConfig, train as fit
            from dltest.zoo import model_for_dataset

            data = load_dataset("mnist", "train").subset(torch.arange(60))
            fit(model_for_dataset("mnist"), data, None, TrainConfig(epochs=1, seed=0), state_path=path, progress=False)
    return setup


def _full_disk(monkeypatch):
    usage = shutil.disk_usage("/")
    monkeypatch.setattr("dltest.io.shutil.disk_usage", lambda _p: usage._replace(free=1024))


CASES = [
    # budgets and names
    Case("budget-not-a-number", sel("-b", "abc"), "budget 'abc' is neither a count"),
    Case("budget-over-100%", sel("-b", "120%"), "not a percentage in (0%, 100%]"),
    Case("budget-zero", sel("-b", "0"), "at least one input"),
    Case("budget-over-the-pool", sel("-b", "41"), "exceeds the pool of 40 inputs"),
    Case("unknown-metric", sel("--metric", "nope"), "unknown metric 'nope'"),
    Case("unknown-option", sel("--bogus", "1"), "No such option: --bogus"),
    Case("option-of-another-metric", sel("--mc-samples", "5"), "--mc-samples is not an option of metric 'margin'"),
    # .npz pools
    Case("npz-nan-pixels", on("nan"), "40 images hold NaN or infinite pixels (first: image 0)"),
    Case("npz-inf-pixels", on("inf"), "hold NaN or infinite pixels"),
    Case("npz-float-out-of-range", on("range"), "float x must lie in [0, 1]"),
    Case("npz-label-out-of-range", on("label_range"), "label 12 (y[5]) is out of range for the 10 class names"),
    Case("npz-label-1e9", on("label_1e9"), "label 1000000000 (y[5]) is out of range for at most 100000 classes"),
    Case("npz-negative-label", on("label_negative"), "labels must be >= 0, found -1 (y[5])"),
    Case("npz-float-labels", on("label_float"), "y must be integer class labels, not float32"),
    Case("npz-mismatched-lengths", on("mismatch"), "y must hold 40 labels, one per image, but has shape (39,)"),
    Case("npz-zero-inputs", on("empty"), "x holds no images"),
    Case("npz-oversized-array", on("huge"), "array 'x' of shape (1000000000, 28, 28) (uint8) needs 730.2 GiB"),
    Case("npz-integer-pixels", on("int_pixels"), "x must be uint8 (0..255) or float in [0, 1], not int64"),
    Case("npz-flat-images", on("flat"), "x must have shape (N, H, W), (N, H, W, C) or (N, C, H, W)"),
    Case("npz-object-array", on("objects"), "array 'x' holds Python objects"),
    Case("npz-not-a-zip", on("junk"), "cannot read"),
    Case("image-folder-corrupt-image", lambda f, o: ["select", "-d", f.folder, "-m", f.model, "-b", "1",
                                                      "--out", o / "s.json"], "broken.png"),
    Case("cifar10-booby-trapped-batch", lambda f, o: ["select", "-d", "cifar10", "--data-root", f.cifar_root,
                                                       "-b", "1", "--out", o / "s.json"],
         "is not torchvision's CIFAR-10 file (its MD5 differs)"),
    # models
    Case("model-pickled-without-trust", with_model("pickled"), "pass --trust-model"),
    Case("model-truncated", with_model("corrupt"), "cannot read"),
    Case("model-altered-weights", with_model("altered"), "do not match the digest stored in the checkpoint"),
    Case("model-bare-state-dict", with_model("bare"), "bare state_dict: pass its architecture with --arch"),
    Case("model-nan-outputs", with_model("nan_weights", "--arch", f"{NETS}:ClientLeNet"), "NaN or infinite outputs"),
    Case("arch-unknown-module", with_model("bare", "--arch", "no_such_module:Net"), "--arch no_such_module:Net: cannot import no_such_module"),
    Case("arch-missing-class", with_model("bare", "--arch", f"{NETS}:Nope"), "has no class or function 'Nope'"),
    Case("arch-kwargs-not-json", with_model("bare", "--arch", f"{NETS}:ClientLeNet", "--arch-kwargs", "{bad"),
         "--arch-kwargs is not valid JSON"),
    Case("arch-kwargs-deeply-nested", with_model("bare", "--arch", f"{NETS}:ClientLeNet", "--arch-kwargs",
                                                 "[" * 5000 + "]" * 5000), "nested 5000 levels deep"),
    Case("arch-kwargs-wrong-argument", with_model("bare", "--arch", f"{NETS}:ClientLeNet", "--arch-kwargs",
                                                  '{"depth": 3}'), "pass its arguments with --arch-kwargs"),
    Case("normalize-malformed", with_model("bare", "--arch", f"{NETS}:ClientLeNet", "--normalize", "0.5"),
         "needs as many means as standard deviations"),
    Case("normalize-zero-std", sel("--normalize", "0.5,0"), "positive standard deviations"),
    Case("normalize-a-zoo-model-twice", sel("--normalize", "0.5,0.5"), "normalises its inputs itself"),
    Case("retrain-examples-oversized", retrain("--examples", lambda f, o: f.huge), "needs 730.2 GiB"),
    # outputs
    Case("out-device-file", lambda f, o: ["select", "-d", f.pool, "-m", f.model, "--out", "/dev/null"],
         "/dev/null: it is a device file"),
    Case("out-named-pipe", lambda f, o: ["select", "-d", f.pool, "-m", f.model, "--out", f.pipe],
         "it is a named pipe"),
    Case("out-read-only-folder", lambda f, o: ["select", "-d", f.pool, "-m", f.model, "--out", "/proc/self/s.json"],
         "folder /proc/self is not writable"),
    Case("out-missing-folder", lambda f, o: ["select", "-d", f.pool, "-m", f.model, "--out", o / "no" / "s.json"],
         "does not exist"),
    Case("out-name-over-255-bytes", lambda f, o: ["select", "-d", f.pool, "-m", f.model, "--out", o / ("é" * 130)],
         "its name is 260 bytes long (at most 255)"),
    Case("model-name-over-255-bytes", lambda f, o: ["select", "-d", f.pool, "-m", o / ("m" * 300), "--out", o / "s.json"],
         "(file name of 300 bytes): File name too long"),
    Case("pool-name-over-255-bytes", lambda f, o: ["select", "-d", o / ("p" * 300 + ".npz"), "-m", f.model,
                                                   "--out", o / "s.json"], "(file name of 304 bytes): File name too long"),
    Case("selection-name-over-255-bytes", sel("--labeled", lambda f, o: o / ("s" * 300)), "File name too long"),
    Case("out-is-a-folder", lambda f, o: ["select", "-d", f.pool, "-m", f.model, "--out", o], "it is a folder"),
    Case("out-and-csv-the-same", sel("--csv", lambda f, o: o / "sel.json"), "--out and --csv are the same file"),
    Case("out-is-the-model", lambda f, o: ["select", "-d", f.pool, "-m", f.model, "--out", f.model],
         "is also the input --model"),
    Case("out-is-the-pool", lambda f, o: ["select", "-d", f.pool, "-m", f.model, "--out", f.pool],
         "is also the input --dataset"),
    Case("out-disk-full", sel(), "MiB needed; free some space first", patch=_full_disk),
    # selection files
    Case("selection-repeats-an-input", sel("--labeled", lambda f, o: f.sel_repeats), "repeats an input (2)"),
    Case("selection-boolean-indices", sel("--labeled", lambda f, o: f.sel_bools), "not booleans"),
    Case("selection-deeply-nested-json", sel("--labeled", lambda f, o: f.deep), "nested 100000 levels deep"),
    Case("attack-selection-outside-the-pool", lambda f, o: ["attack", "-m", f.model, "--selection", f.sel_outside,
                                                            "--out", o / "a.npz"], "indices outside the pool"),
    Case("attack-out-not-npz", lambda f, o: ["attack", "-m", f.model, "--out", o / "a.json"], "must end in .npz"),
    # labels needed
    Case("evaluate-unlabeled-pool", lambda f, o: ["evaluate", "-d", f.unlabeled, "-m", f.model, "--split", "all",
                                                  "--out", o / "e.json"], "has no labels (no 'y' array)"),
    Case("evaluate-eps-zero", lambda f, o: ["evaluate", "-m", f.model, "--eps", "0", "--out", o / "e.json"],
         "eps must be in (0, 1]"),
    # training
    Case("train-lr-inf", train("--lr", "inf"), "learning rate must be a finite number > 0, got inf"),
    Case("train-size-zero", train("--train-size", "0"), "Invalid value for '--train-size'"),
    Case("train-size-negative", train("--train-size", "-5"), "Invalid value for '--train-size'"),
    Case("train-file-without-training-data", lambda f, o: ["train", "-d", f.pool, "--out", o / "m.pt"],
         "has no training data: add arrays x_train and y_train"),
    Case("train-resume-empty-partial", train("--resume"), "cannot resume from", setup=_write_partial("empty")),
    Case("train-resume-truncated-partial", train("--resume"), "it is empty, truncated or not a dltest partial",
         setup=_write_partial("truncated")),
    Case("train-resume-other-configuration", train("--resume"), "was written by a run with other settings or data",
         setup=_write_partial("other")),
    Case("retrain-lr-inf", retrain("--lr", "inf"), "learning rate must be a finite number > 0"),
    Case("retrain-train-size-zero", retrain("--train-size", "0"), "Invalid value for '--train-size'"),
    Case("retrain-examples-nan", retrain("--examples", lambda f, o: f.adv_nan), "hold NaN or infinite pixels"),
    Case("retrain-examples-pixel-range", retrain("--examples", lambda f, o: f.adv_range), "must lie in [0, 1]"),
    Case("retrain-examples-labels", retrain("--examples", lambda f, o: f.adv_labels),
         "label 11 (y[0]) is out of range for the 10 class names"),
    Case("retrain-resume-truncated-partial", retrain("--resume"), "it is empty, truncated or not a dltest partial",
         setup=lambda f, o: (o / "r.pt.partial").write_bytes(f.model.read_bytes()[:4000])),
    Case("metrics-out-device-file", lambda f, o: ["metrics", "--out", "/dev/null"], "it is a device file"),
    Case("retrain-out-equals-report", retrain("--report", lambda f, o: o / "r.pt"), "are the same file"),
    Case("gate-out-is-the-model", lambda f, o: ["gate", "-m", f.model, "--min-accuracy", "0.5", "--out", f.model],
         "is also the input --model"),
    Case("gate-junit-equals-out", lambda f, o: ["gate", "-m", f.model, "--min-accuracy", "0.5", "--out", o / "g.xml",
                                                "--junit", o / "g.xml"], "--out and --junit are the same file"),
    Case("export-out-equals-onnx", lambda f, o: ["export", "-m", f.model, "--onnx", o / "m.onnx", "--out", o / "m.onnx"],
         "--onnx and --out are the same file"),
    Case("analyze-bias-out-is-the-selection", lambda f, o: ["analyze", "bias", f.sel_outside, "--out", f.sel_outside],
         "is also the input SOURCE"),
]


def _snapshot(*folders: Path) -> dict[str, object]:
    """Every entry under ``folders``: regular files by content digest, others by their kind."""
    state = {}
    for folder in folders:
        for path in sorted(folder.rglob("*")):
            mode = path.lstat().st_mode
            if stat.S_ISREG(mode):
                state[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
            else:
                state[str(path)] = stat.S_IFMT(mode)
    return state


def test_the_table_covers_forty_bad_inputs():
    class AnyFile:
        def __getattr__(self, name):
            return Path(name)

    assert len(CASES) >= 40 and len({c.id for c in CASES}) == len(CASES)
    assert {c.args(AnyFile(), Path("o"))[0] for c in CASES} == {"select", "train", "retrain", "attack", "evaluate",
                                                           "metrics", "gate", "export", "analyze"}


def check_refused(case: Case, files: SimpleNamespace, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Run ``case``'s command: exit 2, one error line with its message, no traceback, nothing written."""
    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.chdir(out)  # default outputs, and the gate's dltest.toml / pyproject.toml, land here
    for name, value in (case.env or {}).items():
        monkeypatch.setenv(name, value)
    if case.setup:
        case.setup(files, out)
    if case.patch:
        case.patch(monkeypatch)
    before = _snapshot(files.dir, out)
    result = run(*case.args(files, out))
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2, (result.exit_code, result.stdout, result.stderr, result.exception)
    if case.started:
        lines = lines[-1:]
        assert sum(line.startswith("error: ") for line in result.stderr.splitlines()) == 1, result.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert case.message in lines[0], lines[0]
    assert "Traceback" not in result.output
    assert _snapshot(files.dir, out) == before  # nothing written, nothing changed, no temporary file
    return result


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case, files, tmp_path, monkeypatch):
    result = check_refused(case, files, tmp_path, monkeypatch)
    assert not result.stdout.strip()
    assert not (files.dir / "PWNED").exists()


# --- what used to fail and must work ----------------------------------------------------------


def test_budget_of_100_percent(files, tmp_path):
    result = run("select", "-d", files.pool, "-m", files.model, "--metric", "entropy", "-b", "100%",
                 "--out", tmp_path / "all.json")
    assert result.exit_code == 0, result.output
    assert sorted(json.loads((tmp_path / "all.json").read_text())["indices"]) == list(range(40))


def test_grey_npz_layouts_load_alike(files, tmp_path, mnist_test):
    x = mnist_test.x[:40, 0].numpy()
    ref = load_dataset(str(files.pool))
    for name, arr in (("nhw1", x[..., None]), ("float", x.astype(np.float32) / 255), ("nchw", x[:, None])):
        data = load_dataset(str(_npz(tmp_path / f"{name}.npz", x=arr, y=mnist_test.y[:40].numpy())))
        assert data.x.shape == (40, 1, 28, 28) and data.x.stride() == (784, 784, 28, 1), name
        assert torch.allclose(data.images(), ref.images(), atol=1e-6), name


def test_attack_then_select_on_its_examples(files, tmp_path):
    """``dltest attack`` writes (N, H, W, 1) float examples; ``select`` reads them back as a pool."""
    sel_path = tmp_path / "sel.json"
    sel_path.write_text(json.dumps({"indices": list(range(12)), "dataset": "mnist", "split": "val"}))
    assert run("attack", "-m", files.model, "--selection", sel_path, "--attack", "fgsm",
               "--out", tmp_path / "adv.npz").exit_code == 0
    result = run("select", "-d", tmp_path / "adv.npz", "-m", files.model, "--metric", "coreset", "-b", "4",
                 "--out", tmp_path / "s.json")
    assert result.exit_code == 0, result.output
    assert len(json.loads((tmp_path / "s.json").read_text())["indices"]) == 4


def test_select_on_an_unlabeled_pool(files, tmp_path):
    result = run("select", "-d", files.unlabeled, "-m", files.model, "--metric", "dre", "-b", "5",
                 "--out", tmp_path / "s.json")
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "s.json").read_text())
    labeled = json.loads(run("select", "-d", files.pool, "-m", files.model, "--metric", "dre", "-b", "5",
                             "--out", tmp_path / "l.json").stdout and (tmp_path / "l.json").read_text())
    assert data["indices"] == labeled["indices"] and data["label_counts"] == {}


@pytest.mark.slow
def test_train_and_retrain_on_user_files(tmp_path, mnist_test):
    train_part = load_dataset("mnist", "train").subset(torch.arange(1000))
    path = _npz(tmp_path / "user.npz", x=mnist_test.x[:200, 0].numpy(), y=mnist_test.y[:200].numpy(),
                x_train=train_part.x[:, 0].numpy(), y_train=train_part.y.numpy())
    result = run("train", "-d", path, "--epochs", "2", "--batch-size", "32", "--out", tmp_path / "m.pt")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "m.json").read_text())
    assert report["dataset"] == str(path) and report["holdout_accuracy"] > 0.5
    result = run("retrain", "-d", path, "-m", tmp_path / "m.pt", *RETRAIN_FAST, "--out", tmp_path / "r.pt")
    assert result.exit_code == 0, result.output
    settings = json.loads((tmp_path / "r.json").read_text())["settings"]
    assert settings["pool_size"] == 100 and settings["train_size"] == 50


def test_grey_image_folders_load_as_one_channel(tmp_path, files):
    from PIL import Image

    x = load_dataset(str(files.pool)).x[:4, 0].numpy()
    for mode in ("L", "RGB"):  # grey PNGs, and grey images saved as RGB
        root = tmp_path / mode
        for i, label in enumerate("aabb"):
            (root / label).mkdir(parents=True, exist_ok=True)
            Image.fromarray(x[i]).convert(mode).save(root / label / f"{i}.png")
        result = run("select", "-d", root, "-m", files.model, "--metric", "margin", "-b", "2",
                     "--out", tmp_path / f"{mode}.json")
        assert result.exit_code == 0, (mode, result.output)
    assert load_dataset(str(tmp_path / "L")).x.shape == (4, 1, 28, 28)


def test_image_folder_with_train_and_test_subfolders(tmp_path, files):
    from PIL import Image

    x = load_dataset(str(files.pool)).x[:, 0].numpy()
    for part, count in (("train", 6), ("test", 4)):
        for i in range(count):
            folder = tmp_path / part / "ab"[i % 2]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(x[i]).save(folder / f"{i}.png")
    train, pool = load_dataset(str(tmp_path), "train"), load_dataset(str(tmp_path))
    assert train.x.shape == (6, 1, 28, 28) and pool.x.shape == (4, 1, 28, 28)
    assert train.name == pool.name == str(tmp_path) and train.split == "train" and pool.split == "all"
    assert len(load_dataset(str(tmp_path), "val")) + len(load_dataset(str(tmp_path), "holdout")) == 4


@pytest.mark.slow
def test_interrupted_writes_leave_no_temporary_file(tmp_path):
    """A SIGTERM in the middle of a write unwinds like Ctrl-C: no output, no stray temporary file."""
    script = (
        "import os, signal, sys\n"
        "from dltest.cli.app import _interrupt\n"
        "from dltest.io import atomic_path\n"
        "signal.signal(signal.SIGTERM, _interrupt)\n"
        f"with atomic_path({str(tmp_path / 'out.json')!r}) as tmp:\n"
        "    tmp.write_text('half')\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    assert proc.returncode != 0 and "KeyboardInterrupt" in proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_old_checkpoints_without_a_digest_still_load(files, tmp_path):
    from dltest.checkpoint import load_model

    state = torch.load(files.model, weights_only=True)
    assert state["digest"].startswith("sha256:")
    del state["digest"]
    torch.save(state, tmp_path / "old.pt")
    _, info = load_model(tmp_path / "old.pt")
    assert info.digest is None
    _, info = load_model(files.model)
    assert info.digest == state_digest_of(files.model)


def state_digest_of(path: Path) -> str:
    return torch.load(path, weights_only=True)["digest"]
