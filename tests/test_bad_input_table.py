"""Bad input and tampered state, as a table (issue 16): each case runs the CLI and must exit with
code 2 and one ``error: ...`` line naming the bad value, print no traceback, write nothing and
leave every file that existed before byte for byte the same (the style of test_bad_inputs.py).

The cases cover robust-al run folders (edited, truncated or foreign state, a full disk, a folder
that is not a run), analyses that would write into the runs they read, and input that used to
end in a traceback or after the expensive part: gate configurations, selection files, seeds,
adversarial-examples metadata, ONNX opsets, counts checked before any model pass.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import numpy as np
import pytest
import torch

from dltest.data import LabeledPool
from dltest.errors import DltestError
from dltest.workflows import robust_al as ral
from tests.test_bad_inputs import Case, check_refused, run

REPO = Path(__file__).resolve().parents[1]

# a robust-al run small enough for a test: 20 -> 40 labeled in two stages of 10
TINY_RUN = ["robust-al", "--metric", "random", "--budget", "40", "--initial", "20", "--per-stage", "10",
            "--epochs", "1", "--initial-epochs", "1", "--eval-n", "10", "--val-n", "10", "--train-size", "100",
            "--at", "fgsm-rs", "--eval-attacks", "fgsm"]
RETRAIN_FAST = ["--metric", "random", "-b", "5", "--attack", "fgsm", "--eval-attacks", "fgsm", "--eval-n", "10",
                "--val-n", "10", "--epochs", "1", "--train-size", "50"]


class _Interrupt(KeyboardInterrupt):
    pass


def _interrupted_run(folder: Path) -> None:
    """A tiny run stopped (like Ctrl-C) right after its first stage: state of stage 1, no summary."""
    def stop_after_stage_1(self, record):
        if record.stage == 1:
            raise _Interrupt

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("dltest.cli.robust_al.StageView.update", stop_after_stage_1)
        result = run(*TINY_RUN, "--out", folder)
    assert result.exit_code == 130, result.output
    assert (folder / "state" / "random.pt").is_file() and not (folder / "summary.json").exists()


def _examples(path: Path, meta: dict) -> Path:
    from dltest.data import load_dataset

    val = load_dataset("mnist", "val")
    x = val.images(slice(0, 8)).permute(0, 2, 3, 1).numpy()
    np.savez(path, x=x, y=val.y[:8].numpy(), indices=np.arange(8), source_index=np.arange(8),
             meta=np.array(json.dumps(meta)))
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory, lenet_checkpoint):
    d = tmp_path_factory.mktemp("table-inputs")
    f = SimpleNamespace(dir=d)
    f.model = d / "lenet.pt"
    shutil.copy(lenet_checkpoint, f.model)
    f.run = d / "run"
    _interrupted_run(f.run)
    f.sel_huge_index = d / "huge-index.json"
    f.sel_huge_index.write_text(json.dumps({"indices": [1, 10**23], "dataset": "mnist", "split": "val"}))
    f.sel_dataset_number = d / "dataset-number.json"
    f.sel_dataset_number.write_text(json.dumps({"indices": [1, 2], "dataset": 5, "split": "val"}))
    meta = {"dataset": "mnist", "split": "val", "attack": {"name": "fgsm"}}
    f.examples_seed_abc = _examples(d / "seed-abc.npz", {**meta, "seed": "abc"})
    f.examples_dataset_list = _examples(d / "dataset-list.npz", {**meta, "dataset": ["mnist"], "seed": 0})
    return f


# --- how each case changes the world before it runs -------------------------------------------


def copy_run(*tamper: Callable[[Path], None]):
    """Setup: the interrupted run copied to out/run, then changed by each of ``tamper``."""
    def setup(f, o):
        shutil.copytree(f.run, o / "run")
        for change in tamper:
            change(o / "run")
    return setup


def edit_labeled(run_dir: Path) -> None:
    """Edit the saved labeled pool as a hand would: load, change one position, save (digest kept)."""
    path = run_dir / "state" / "random.pt"
    state = torch.load(path, weights_only=True)
    state["labeled"] = state["labeled"].clone()
    state["labeled"][0] = 99
    torch.save(state, path)


def truncate_state(run_dir: Path) -> None:
    path = run_dir / "state" / "random.pt"
    path.write_bytes(path.read_bytes()[:2000])


def state_of_another_seed(run_dir: Path) -> None:
    """A state file written, digest and all, by a run with seed 1 (another run's file)."""
    saved = json.loads((run_dir / "config.json").read_text())
    fields = {k: v for k, v in saved.items() if k in ral.RobustALConfig.__dataclass_fields__}
    other = ral.RobustALConfig(**{**fields, "metrics": tuple(fields["metrics"]), "seed": 1})
    state = torch.load(run_dir / "state" / "random.pt", weights_only=True)
    records = [ral.StageRecord(**{**json.loads(r), "seed": 1}) for r in state["records"]]
    model = torch.nn.Module()
    model.state_dict = lambda: state["model"]  # _write_state only asks for the weights
    pool = LabeledPool.from_state_dict({k: state[k] for k in ("size", "labeled", "labels")})
    ral._write_state(run_dir / "state" / "random.pt", other, ral.MetricState("random", model, pool, records))


def write(name: str, text: str):
    return lambda run_dir: (run_dir / name).write_text(text)


def in_out(name: str, text: str):
    """Setup: a file in the case's folder (the working directory)."""
    return lambda f, o: (o / name).write_text(text)


def full_disk(monkeypatch):
    def no_space(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", no_space)


# --- the cases --------------------------------------------------------------------------------


def resume(*extra):
    return lambda f, o: [*TINY_RUN, "--out", o / "run", "--resume", *extra]


def gate(*extra):
    return lambda f, o: ["gate", "-m", f.model, *extra, "--out", o / "g.json"]


def retrain(*extra):
    return lambda f, o: ["retrain", "-m", f.model, *RETRAIN_FAST, "--out", o / "r.pt",
                         *[e(f, o) if callable(e) else e for e in extra]]


CASES = [
    # robust-al run folders
    Case("robust-al-state-edited", resume(), "contents do not match their digest (edited or damaged)",
         setup=copy_run(edit_labeled)),
    Case("robust-al-state-truncated", resume(), "unreadable, truncated or not a state file",
         setup=copy_run(truncate_state)),
    Case("robust-al-state-of-another-run", resume(), "it comes from another run or other settings",
         setup=copy_run(state_of_another_seed)),
    Case("robust-al-state-of-another-metric", resume(), "its records are not those of metric 'initial'",
         setup=copy_run(lambda r: shutil.copy(r / "state" / "random.pt", r / "state" / "initial.pt"))),
    Case("robust-al-state-missing-initial", resume(), "initial.pt is missing",
         setup=copy_run(lambda r: (r / "state" / "initial.pt").unlink())),
    Case("robust-al-config-not-an-object", resume(), "config.json does not hold a JSON object",
         setup=copy_run(write("config.json", "[1, 2]"))),
    Case("robust-al-config-deeply-nested", resume(), "nested 100000 levels deep",
         setup=copy_run(write("config.json", "[" * 100_000 + "]" * 100_000))),
    Case("robust-al-config-of-other-settings", lambda f, o: [*TINY_RUN[:-2], "--eval-attacks", "pgd", "--out",
                                                             o / "run", "--resume"],
         "it was run with other settings (eval_attacks)", setup=copy_run()),
    Case("robust-al-disk-full", resume(), "No space left on device; nothing was written",
         setup=copy_run(), patch=full_disk, started=True),
    Case("robust-al-out-is-not-a-run", lambda f, o: [*TINY_RUN, "--out", o / "mine"],
         "is not empty and holds no dltest run",
         setup=lambda f, o: ((o / "mine").mkdir(), (o / "mine" / "log.jsonl").write_text("my own log\n"))),
    Case("robust-al-seed-1e20", lambda f, o: [*TINY_RUN, "--seed", str(10**20), "--out", o / "run"],
         "Invalid value for '--seed'"),
    Case("robust-al-seed-not-an-integer", lambda f, o: [*TINY_RUN, "--seed", "1e20", "--out", o / "run"],
         "Invalid value for '--seed'"),
    # analyses never write into the runs they read
    Case("analyze-compare-out-into-the-run", lambda f, o: ["analyze", "compare", o / "run", "--metrics",
                                                           "random,dre", "--out", o / "run" / "log.jsonl"],
         "lies inside the input run folder", setup=copy_run()),
    Case("analyze-correlation-out-into-the-run", lambda f, o: ["analyze", "correlation", o / "run", "--out",
                                                               o / "run" / "summary.json"],
         "lies inside the input run folder", setup=copy_run()),
    Case("analyze-bias-deeply-nested-log", lambda f, o: ["analyze", "bias", o / "run", "--out", o / "b.json"],
         "nested 100000 levels deep",
         setup=copy_run(write("log.jsonl", "[" * 100_000 + "]" * 100_000 + "\n"))),
    Case("analyze-compare-log-not-text", lambda f, o: ["analyze", "compare", o / "run", "--out", o / "c.json"],
         "log.jsonl as text", setup=copy_run(lambda r: (r / "log.jsonl").write_bytes(b"\xff\xfe\x00bad"))),
    Case("analyze-compare-record-not-a-record", lambda f, o: ["analyze", "compare", o / "run", "--out",
                                                              o / "c.json"], "log.jsonl:1 lacks",
         setup=copy_run(write("log.jsonl", '{"metric": "random"}\n'))),
    # gate configuration
    Case("gate-pyproject-tool-is-a-number", gate("--min-accuracy", "0.5"), "[tool] must be a table, got 1",
         setup=in_out("pyproject.toml", "tool = 1\n")),
    Case("gate-dltest-toml-deeply-nested", gate("--min-accuracy", "0.5"), "is nested too deeply",
         setup=in_out("dltest.toml", "a = " + "[" * 100_000 + "]" * 100_000 + "\n")),
    Case("gate-allow-randomised-a-string", gate("--min-accuracy", "0.5"),
         "allow-randomised must be true or false (a TOML boolean, not a string), got 'no'",
         setup=in_out("dltest.toml", '[gate]\nallow-randomised = "no"\n')),
    Case("gate-step-summary-a-named-pipe", gate("--min-accuracy", "0.5"),
         "GITHUB_STEP_SUMMARY=summary.pipe is not a regular file",
         setup=lambda f, o: os.mkfifo(o / "summary.pipe"), env={"GITHUB_STEP_SUMMARY": "summary.pipe"}),
    Case("gate-max-drop-without-baseline", gate("--max-drop", "0.02"), "--max-drop needs a baseline report"),
    Case("gate-seed-too-large", gate("--min-accuracy", "0.5", "--seed", str(2**40)),
         f"seed must be an integer in [0, {2**32 - 1}], got {2**40}"),
    # selection files
    Case("selection-huge-index", lambda f, o: ["analyze", "bias", f.sel_huge_index, "--out", o / "b.json"],
         f"index {10**23} is not a pool position"),
    Case("selection-dataset-not-a-string", lambda f, o: ["analyze", "bias", f.sel_dataset_number,
                                                         "--out", o / "b.json"], "'dataset' must be a string, got 5"),
    Case("attack-selection-huge-index", lambda f, o: ["attack", "-m", f.model, "--selection", f.sel_huge_index,
                                                      "--out", o / "a.npz"], "is not a pool position"),
    # adversarial-examples metadata
    Case("retrain-examples-meta-seed-abc", retrain("--examples", lambda f, o: f.examples_seed_abc),
         "meta 'seed' must be an integer, got 'abc'"),
    Case("retrain-examples-meta-dataset-a-list", retrain("--examples", lambda f, o: f.examples_dataset_list),
         "meta 'dataset' must be a string"),
    # counts checked before any model pass
    Case("retrain-val-n-zero", retrain("--val-n", "0"), "--val-n must be >= 1, got 0"),
    Case("retrain-eval-n-zero", retrain("--eval-n", "0"), "--eval-n must be >= 1, got 0"),
    Case("train-eval-n-zero", lambda f, o: ["train", "--epochs", "1", "--train-size", "100", "--eval-n", "0",
                                            "--out", o / "m.pt"], "--eval-n must be >= 1, got 0"),
    Case("select-seed-negative", lambda f, o: ["select", "-m", f.model, "-b", "5", "--seed", "-1",
                                               "--out", o / "s.json"], "Invalid value for '--seed'"),
    # ONNX opsets
    Case("export-opset-too-new", lambda f, o: ["export", "-m", f.model, "--onnx", o / "m.onnx", "--opset", "99"],
         "--opset must be from 7 to"),
    Case("export-opset-zero", lambda f, o: ["export", "-m", f.model, "--onnx", o / "m.onnx", "--opset", "0"],
         "--opset must be from 7 to"),
]


def test_the_table_covers_every_command_it_names():
    assert len({c.id for c in CASES}) == len(CASES) >= 30
    commands = {c.args(SimpleNamespace(model="m", run="r", sel_huge_index="s", sel_dataset_number="s",
                                       examples_seed_abc="e", examples_dataset_list="e"), Path("o"))[0]
                for c in CASES}
    assert commands == {"robust-al", "analyze", "gate", "attack", "retrain", "train", "select", "export"}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case, files, tmp_path, monkeypatch):
    check_refused(case, files, tmp_path, monkeypatch)


# --- what the table cannot show -----------------------------------------------------------------


@pytest.mark.slow
def test_a_resumed_run_after_a_full_disk_finishes_like_an_uninterrupted_one(files, tmp_path):
    """The disk-full refusal kept the last good state: once there is space, --resume finishes."""
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert run(*TINY_RUN, "--out", whole).exit_code == 0
    shutil.copytree(files.run, cut)
    with pytest.MonkeyPatch.context() as mp:
        full_disk(mp)
        assert run(*TINY_RUN, "--out", cut, "--resume").exit_code == 2
    result = run(*TINY_RUN, "--out", cut, "--resume")
    assert result.exit_code == 0, result.output
    figures = lambda rs: [(r.stage, r.labeled, r.selected) for r in rs]
    assert figures(ral.read_log(cut)) == figures(ral.read_log(whole))
    assert [r.labeled for r in ral.read_log(cut)] == [20, 30, 40]


def test_an_empty_out_folder_is_fine_for_a_new_run(tmp_path):
    (tmp_path / "empty").mkdir()
    result = run(*TINY_RUN, "--out", tmp_path / "empty")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "empty" / "summary.json").read_text())["final"]["random"]["labeled"] == 40


def test_temporary_files_of_killed_writers_are_removed_by_the_next_write(tmp_path):
    """A process killed between writing and renaming leaves ``.<name>.dltest-<host>-<pid>.*.tmp``;
    the next write of that output removes those of dead processes of this host, and only those."""
    from dltest.io import _OWNER, _tmp_prefix, atomic_path

    host = _OWNER.rsplit("-", 1)[0]
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    prefix = _tmp_prefix("out.json")
    stale = tmp_path / f"{prefix}{host}-{dead.pid}.x1y2.tmp"
    live = tmp_path / f"{prefix}{host}-{os.getppid()}.x1y2.tmp"  # the parent process is running
    other_host = tmp_path / f"{prefix}elsewhere-{dead.pid}.x1y2.tmp"
    other_output = tmp_path / f"{_tmp_prefix('other.json')}{host}-{dead.pid}.x1y2.tmp"
    for path in (stale, live, other_host, other_output):
        path.write_text("half")
    with atomic_path(tmp_path / "out.json") as tmp:
        assert f"-{os.getpid()}." in tmp.name
        tmp.write_text("{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [live.name, other_host.name, other_output.name, "out.json"])


@pytest.mark.slow
def test_a_sigkill_at_the_rename_leaves_nothing_after_the_next_write(tmp_path):
    """A real SIGKILL while the temporary file is complete but not yet renamed."""
    script = (
        "import os, signal\n"
        "from dltest.io import atomic_path\n"
        f"with atomic_path({str(tmp_path / 'out.json')!r}) as tmp:\n"
        "    tmp.write_text('{}')\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    leftovers = []
    for _ in range(3):  # each kill leaves its own file; the next writer removes the earlier one
        proc = subprocess.run([sys.executable, "-c", script], env={**os.environ, "PYTHONPATH": str(REPO)})
        assert proc.returncode == -9
        leftovers.append(sorted(p.name for p in tmp_path.glob(".out.json.dltest-*.tmp")))
    assert [len(names) for names in leftovers] == [1, 1, 1] and len({n[0] for n in leftovers}) == 3
    from dltest.io import write_json

    write_json(tmp_path / "out.json", {"ok": True})
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_the_python_api_checks_its_arguments_before_any_work(files):
    from dltest.data import load_dataset
    from dltest.selection import select
    from dltest.training import TrainConfig
    from dltest.workflows.retrain import check_retrain_settings

    with pytest.raises(DltestError, match=r"seed must be an integer in \[0, 4294967295\], got 100000000000000000000"):
        ral.RobustALConfig(dataset="mnist", budget=40, initial=20, per_stage=10, seed=10**20)
    with pytest.raises(DltestError, match="seed must be an integer"):
        TrainConfig(seed=-1)
    with pytest.raises(DltestError, match="val_n must be an integer >= 1, got 0"):
        check_retrain_settings(val_n=0)
    pool = load_dataset("mnist", "val").subset(torch.arange(10))
    never = torch.nn.Module()  # never run: the budget fails first
    with pytest.raises(DltestError, match="exceeds the pool of 10 inputs"):
        select("entropy", 11, model=never, data=pool)


def test_gate_config_booleans_are_read_as_booleans(tmp_path):
    from dltest.gate import read_config

    (tmp_path / "dltest.toml").write_text("[gate]\nallow-randomised = true\nmin-accuracy = 0.5\n")
    settings, _ = read_config(folder=tmp_path)
    assert settings["allow-randomised"] is True
    (tmp_path / "dltest.toml").unlink()
    (tmp_path / "pyproject.toml").write_text("[tool.black]\nline-length = 100\n")  # no dltest table: no settings
    assert read_config(folder=tmp_path) == ({}, None)


def test_step_summary_is_appended_to_a_regular_file_only(tmp_path, capsys):
    from dltest.gate import append_step_summary

    summary = tmp_path / "summary.md"
    summary.write_text("earlier step\n")
    assert append_step_summary("| bar |", {"GITHUB_STEP_SUMMARY": str(summary)}) == summary
    assert summary.read_text() == "earlier step\n| bar |\n"
    os.mkfifo(tmp_path / "pipe")  # no reader: must neither block nor write
    assert append_step_summary("| bar |", {"GITHUB_STEP_SUMMARY": str(tmp_path / "pipe")}) is None
    assert "cannot append" in capsys.readouterr().err


@pytest.mark.slow
def test_export_honours_the_opset(files, tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    import onnx

    result = run("export", "-m", files.model, "--onnx", tmp_path / "m.onnx", "--n", "16", "--opset", "20")
    assert result.exit_code == 0, result.output
    versions = {o.domain: o.version for o in onnx.load(str(tmp_path / "m.onnx")).opset_import}
    assert versions.get("", versions.get("ai.onnx")) == 20


@pytest.mark.slow
def test_a_failed_torchrun_is_one_line_per_rank_at_most(tmp_path):
    """``python -m dltest.launch`` runs dltest under torchrun; a bad input gives rank 0's error line
    and the launcher's one line, exit code 2, and no traceback."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "DLTEST_DEVICE": "cpu"}
    proc = subprocess.run([sys.executable, "-m", "dltest.launch", "--standalone", "--nproc-per-node", "2",
                           "--monitor-interval", "0.1", "select", "--metric", "nope", "--out", "s.json"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr
    assert len(lines) <= 2 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith("error: unknown metric 'nope'")
    # torchrun may stop the second rank (SIGTERM) before it reports its own exit code 2: a race, not a defect
    assert re.fullmatch(r"error: dltest failed on [12] rank\(s\) \((rank \d: (exit code \d+|killed by SIG\w+)(, )?)+\); "
                        r"see the rank's error line above", lines[-1]) and "exit code 2" in lines[-1], lines[-1]
    assert list(tmp_path.iterdir()) == []
