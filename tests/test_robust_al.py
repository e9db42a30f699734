"""Robust active learning: stages, the run folder, resume, standard vs adversarial, bad input."""

from __future__ import annotations

import json

import pytest
import torch

from dltest.data import load_dataset
from dltest.errors import DltestError
from dltest.workflows.robust_al import RobustALConfig, read_log, robust_active_learning
from tests.cli_runner import run_cli as cli


@pytest.fixture(scope="module")
def splits(mnist_train_slice):
    val = load_dataset("mnist", "val").subset(torch.arange(300))
    holdout = load_dataset("mnist", "holdout").subset(torch.arange(300))
    return mnist_train_slice.subset(torch.arange(3000)), val, holdout


def tiny(**overrides) -> RobustALConfig:
    settings = dict(dataset="mnist", metrics=("entropy",), budget=260, initial=200, per_stage=20, epochs=1,
                    initial_epochs=3, at="fgsm-rs", eval_n=100, val_n=100, check_steps=2, seed=0)
    settings.update(overrides)
    return RobustALConfig(**settings)


def run(config, splits, folder=None, **kwargs):
    train, val, holdout = splits
    return robust_active_learning(config, train_data=train, val_data=val, holdout=holdout, run_dir=folder,
                                  device="cpu", **kwargs)


@pytest.mark.slow
def test_three_stages_grow_the_pool_and_the_files_agree(splits, tmp_path):
    config = tiny(metrics=("entropy", "random"))
    result = run(config, splits, tmp_path / "run")
    assert config.stages == 3
    for metric in ("entropy", "random"):
        records = result.records[metric]
        assert [r.stage for r in records] == [0, 1, 2, 3]
        assert [r.labeled for r in records] == [200, 220, 240, 260]
        chosen = [i for r in records for i in r.selected]
        assert len(chosen) == 60 and len(set(chosen)) == 60
        assert all(len(r.selected) == 20 for r in records[1:])
        assert records[0].bias is None and set(records[1].bias) == {"entropy", "gini", "lc", "margin", "label"}
        assert all(r.attacks == ["pgd eps=0.3 alpha=0.01 steps=50"] for r in records)  # MNIST's per-stage attack
        assert all(0 <= v <= 1 for r in records[1:] for v in r.bias.values())
    # one initial model, shared: stage 0 is identical across metrics
    e0, r0 = result.records["entropy"][0], result.records["random"][0]
    assert (e0.clean_accuracy, e0.robust_accuracy) == (r0.clean_accuracy, r0.robust_accuracy)
    # the entropy selection is more biased towards high entropy than the random one
    assert result.records["entropy"][1].bias["entropy"] > result.records["random"][1].bias["entropy"]

    folder = tmp_path / "run"
    log = read_log(folder)
    assert len(log) == 8 and [r.metric for r in log] == ["entropy"] * 4 + ["random"] * 4
    assert all(r.attacks == ["pgd eps=0.3 alpha=0.01 steps=50"] and list(r.robust_accuracy) == ["pgd"] for r in log)
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["command"] == "dltest robust-al" and summary["seed"] == 0
    for metric in ("entropy", "random"):
        last = [r for r in log if r.metric == metric][-1]
        assert summary["final"][metric]["labeled"] == 260
        assert summary["final"][metric]["clean_accuracy"] == last.clean_accuracy
        assert summary["final"][metric]["robust_accuracy"] == last.robust_accuracy
        assert (folder / f"{metric}.pt").is_file()
    config_file = json.loads((folder / "config.json").read_text())
    assert config_file["metrics"] == ["entropy", "random"] and config_file["at"] == "fgsm-rs"


class Killed(Exception):
    pass


@pytest.mark.slow
def test_resume_after_a_kill_reproduces_the_uninterrupted_run(splits, tmp_path):
    config = tiny()
    whole = run(config, splits, tmp_path / "whole")

    def die_after_stage_2(record):
        if record.stage == 2:
            raise Killed

    with pytest.raises(Killed):
        run(config, splits, tmp_path / "cut", on_stage=die_after_stage_2)
    assert not (tmp_path / "cut" / "summary.json").exists()
    with pytest.raises(DltestError, match="already holds a run"):
        run(config, splits, tmp_path / "cut")
    resumed = run(config, splits, tmp_path / "cut", resume=True)
    strip = lambda rs: [(r.stage, r.labeled, r.selected, r.clean_accuracy, r.robust_accuracy, r.bias) for r in rs]
    assert strip(resumed.records["entropy"]) == strip(whole.records["entropy"])
    assert (tmp_path / "cut" / "log.jsonl").read_text().count("\n") == 4
    with pytest.raises(DltestError, match=r"other settings \(budget\)"):
        run(tiny(budget=280), splits, tmp_path / "cut", resume=True)


@pytest.mark.slow
def test_standard_and_robust_runs_differ_only_in_training(splits):
    robust = run(tiny(budget=240, epochs=3), splits).records["entropy"]
    standard = run(tiny(budget=240, epochs=3, at=None), splits).records["entropy"]
    same = lambda r: (r.labeled, r.clean_accuracy, r.robust_accuracy, r.best_epoch)
    assert same(robust[0]) == same(standard[0])  # the same initial model and figures
    assert robust[1].selected == standard[1].selected  # stage 1 selects with that initial model
    assert robust[1].best_epoch >= 0 and standard[1].best_epoch >= 0  # both kept a trained epoch
    assert robust[1].clean_accuracy != standard[1].clean_accuracy


@pytest.mark.parametrize("overrides, message", [
    (dict(budget=150), "must exceed the initial labeled pool"),
    (dict(per_stage=0), "per_stage must be >= 1"),
    (dict(at="free"), "unknown adversarial training method 'free'"),
    (dict(metrics=("nope",)), "unknown metric 'nope'"),
    (dict(metrics=("dre", "dre")), "name a metric twice"),
])
def test_bad_settings_are_refused(overrides, message):
    with pytest.raises(DltestError, match=message):
        tiny(**overrides)


def test_budget_larger_than_the_pool_is_refused(splits):
    with pytest.raises(DltestError, match="exceeds the training pool of 3000"):
        run(tiny(budget=4000), splits)


@pytest.mark.parametrize("args, message", [
    (["--budget", "100"], "budget (100) must exceed the initial labeled pool (200)"),
    (["--per-stage", "0"], "per_stage must be >= 1, got 0"),
    (["--budget", "70000"], "budget (70000) exceeds the training pool of 60000 inputs"),
    (["--at", "free"], "unknown adversarial training method 'free'"),
    (["--arch", "vgg16"], "cannot take"),
])
def test_cli_bad_input_is_one_line_and_writes_nothing(tmp_path, args, message):
    out = tmp_path / "run"
    result = cli("robust-al", "--out", out, *args)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert lines[-1].startswith("error: ") and message in lines[-1]
    assert "Traceback" not in result.output
    assert not (out / "log.jsonl").exists()


@pytest.mark.slow
def test_cli_runs_and_resumes(tmp_path):
    out = tmp_path / "run"
    args = ["robust-al", "--metric", "margin,random", "--budget", "240", "--initial", "200", "--per-stage", "20",
            "--epochs", "1", "--initial-epochs", "2", "--eval-n", "50", "--val-n", "50", "--train-size", "2000",
            "--out", out]
    result = cli(*args)
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["final"]) == {"margin", "random"}
    assert all(f["labeled"] == 240 for f in summary["final"].values())
    log = read_log(out)
    assert max(i for r in log for i in r.selected) >= 2000  # positions in the training split, not the subset
    assert "margin stage 2: 240 labeled" in result.output
    analysis = cli("analyze", "bias", out, "--out", tmp_path / "bias.json")  # the analyses read the run folder
    assert analysis.exit_code == 0, analysis.output
    assert "margin" in (tmp_path / "bias.json").read_text()
    again = cli(*args)
    assert again.exit_code == 2 and "already holds a run" in again.output
    resumed = cli(*args, "--resume")  # nothing left to do: the same summary
    assert resumed.exit_code == 0, resumed.output
    assert json.loads((out / "summary.json").read_text())["final"] == summary["final"]


@pytest.mark.slow
def test_sigkill_then_resume_gives_the_uninterrupted_log(tmp_path):
    """A real SIGKILL of the command mid-run; --resume ends with the log of a run never killed."""
    import os
    import signal
    import subprocess
    import sys
    import time

    args = ["robust-al", "--metric", "entropy", "--budget", "280", "--initial", "200", "--per-stage", "20",
            "--epochs", "1", "--initial-epochs", "2", "--eval-n", "50", "--val-n", "50", "--train-size", "2000"]
    command = [sys.executable, "-c", "from dltest.cli import main; main()"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    whole = subprocess.run([*command, *args, "--out", str(tmp_path / "whole")], env=env, capture_output=True,
                           text=True, timeout=600)
    assert whole.returncode == 0, whole.stderr
    cut = tmp_path / "cut"
    process = subprocess.Popen([*command, *args, "--out", str(cut)], env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    state = cut / "state" / "entropy.pt"
    deadline = time.monotonic() + 300
    while not state.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (cut / "summary.json").exists()
    resumed = subprocess.run([*command, *args, "--out", str(cut), "--resume"], env=env, capture_output=True,
                             text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    figures = lambda rs: [(r.stage, r.labeled, r.selected, r.clean_accuracy, r.robust_accuracy, r.bias) for r in rs]
    assert figures(read_log(cut)) == figures(read_log(tmp_path / "whole"))
    assert not list(cut.rglob("*.tmp"))


@pytest.mark.slow
def test_run_folder_has_the_figure(splits, tmp_path):
    pytest.importorskip("matplotlib")
    run(tiny(budget=220, at=None), splits, tmp_path / "run")
    assert (tmp_path / "run" / "figure.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_default_is_the_papers_pgd_and_steps_are_checked():
    assert tiny(at="pgd").at == "pgd" and RobustALConfig(dataset="mnist").at == "pgd"
    with pytest.raises(DltestError, match="single-step method and takes no steps"):
        tiny(at="fgsm-rs", at_steps=3)


def test_preset_keeps_standard_active_learning_and_fills_the_schedule():
    from dltest.workflows.robust_al import preset

    assert preset("mnist", at=None).at is None  # --standard
    config = preset("mnist", budget=None, metrics=("dre",))
    assert (config.budget, config.initial, config.per_stage, config.stages) == (5000, 200, 200, 24)
    assert (preset("fashion-mnist").budget, preset("fashion-mnist").stages) == (6000, 29)


@pytest.mark.slow
def test_a_users_architecture_runs_robust_active_learning(splits, tmp_path):
    from pathlib import Path

    from dltest.checkpoint import load_model

    arch = f"{Path(__file__).with_name('client_nets.py')}:ClientLeNet"
    config = tiny(metrics=("entropy", "coreset"), budget=240, arch=arch, arch_kwargs={"num_classes": 10})
    result = run(config, splits, tmp_path / "run")
    for metric in ("entropy", "coreset"):
        assert [r.labeled for r in result.records[metric]] == [200, 220, 240]
        model, info = load_model(tmp_path / "run" / f"{metric}.pt", arch=arch)  # a module:Class must be named
        assert info.arch == arch and type(model).__name__ == "ClientLeNet"
    with pytest.raises(DltestError, match="arch_kwargs apply to a module:Class architecture"):
        tiny(arch="lenet5", arch_kwargs={"num_classes": 10})


def users_npz(path, train, test, colour: bool):
    """An .npz in the user's layout: uint8 HWC images, x_train/y_train beside x/y."""
    import numpy as np

    def arrays(data):
        x = (data.x.squeeze(1).numpy() * 255).round().astype(np.uint8)
        if colour:  # 32x32x3, channels last
            x = np.repeat(np.pad(x, ((0, 0), (2, 2), (2, 2)))[..., None], 3, axis=-1)
        return x, data.y.numpy().astype(np.int64)

    (x_train, y_train), (x, y) = arrays(train), arrays(test)
    np.savez(path, x_train=x_train, y_train=y_train, x=x, y=y)
    return path


@pytest.mark.slow
@pytest.mark.parametrize("colour", [False, True], ids=["grey", "colour"])
def test_cli_runs_on_a_users_npz_file(splits, tmp_path, colour):
    from pathlib import Path

    train, val, holdout = splits
    data = users_npz(tmp_path / "Pool.npz", train.subset(torch.arange(400)), val.subset(torch.arange(200)), colour)
    out = tmp_path / "run"
    common = ["robust-al", "-d", data, "--metric", "entropy,random", "--epochs", "1", "--initial-epochs", "2",
              "--at", "fgsm-rs", "--eval-n", "50", "--val-n", "50", "--out", out]
    if colour:
        common += ["--arch", f"{Path(__file__).with_name('client_nets.py')}:ColourNet"]
    missing = cli(*common)  # a user file has no Table 3 schedule
    assert missing.exit_code == 2 and "give budget, initial, per_stage" in missing.output.strip().splitlines()[-1]
    assert not out.exists()

    result = cli(*common, "--budget", "60", "--initial", "40", "--per-stage", "10")
    assert result.exit_code == 0, result.output
    config = json.loads((out / "config.json").read_text())
    assert config["eps"] is None and config["dataset"] == str(data)
    log = read_log(out)
    for metric in ("entropy", "random"):
        records = [r for r in log if r.metric == metric]
        assert [r.labeled for r in records] == [40, 50, 60]
        chosen = [i for r in records for i in r.selected]
        assert len(chosen) == len(set(chosen)) == 20 and all(0 <= i < 400 for i in chosen)
    summary = json.loads((out / "summary.json").read_text())
    assert {m: f["labeled"] for m, f in summary["final"].items()} == {"entropy": 60, "random": 60}
    from dltest.checkpoint import load_model

    arch = common[common.index("--arch") + 1] if colour else None  # a file names only zoo architectures by itself
    model, _ = load_model(out / "entropy.pt", arch=arch)
    expected = (1, 3, 32, 32) if colour else (1, 1, 28, 28)
    assert model.eval()(torch.zeros(expected)).shape == (1, 10)


@pytest.mark.slow
def test_fashion_stages_are_evaluated_with_the_profiles_attack_and_the_log_names_it(tmp_path):
    # issue 17: on Fashion-MNIST PGD-50 overstates robustness, so its profile's per-stage attack is
    # apgd-square; every stage record says which attack, with its settings, gave robust_accuracy
    train = load_dataset("fashion-mnist", "train").subset(torch.arange(1000))
    val = load_dataset("fashion-mnist", "val").subset(torch.arange(100))
    holdout = load_dataset("fashion-mnist", "holdout").subset(torch.arange(100))
    config = tiny(dataset="fashion-mnist", budget=220, eval_n=40, initial_epochs=2)
    assert config.eval_attacks == ("apgd-square",)
    result = run(config, (train, val, holdout), tmp_path / "run")
    for records in (result.records["entropy"], read_log(tmp_path / "run")):
        assert [r.stage for r in records] == [0, 1]
        assert all(r.attacks == ["apgd-square eps=0.3 steps=100 queries=1000"] for r in records)
        assert all(list(r.robust_accuracy) == ["apgd-square"] for r in records)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["eval_attacks"] == ["apgd-square"]


@pytest.mark.slow
def test_a_stage_whose_epochs_all_collapse_is_trained_again_with_the_eps_warm_up(splits, monkeypatch):
    import dltest.workflows.robust_al as workflow

    calls = []
    real_train = workflow.train

    def spy(model, data, val, config, *, adversary=None, **kwargs):
        result = real_train(model, data, val, config, adversary=adversary, **kwargs)
        calls.append((len(data), None if adversary is None else adversary.warmup_epochs, result.best_epoch))
        return result

    monkeypatch.setattr(workflow, "train", spy)
    records = run(tiny(budget=240), splits).records["entropy"]  # one epoch per stage on ~200 inputs: collapses
    later = [c for c in calls if c[0] == 240]  # stage 2 (stage 1 has the ramp already)
    assert later[0][1] == 0.0 and later[0][2] == -1  # at full eps every epoch collapsed...
    assert len(later) == 2 and later[1][1] > 0  # ...so the stage trained again with the ramp
    assert records[2].stopped_early.startswith("every epoch collapsed at full eps; trained again with the eps warm-up")


@pytest.mark.slow
def test_final_attacks_run_once_per_metric_and_a_resume_reuses_them(splits, tmp_path, monkeypatch):
    import dltest.workflows.robust_al as robust_al

    attacked: list[list[str]] = []
    real = robust_al.evaluate_robustness

    def counting(model, data, attacks, **kwargs):
        attacked.append([a.name for a in attacks])
        return real(model, data, attacks, **kwargs)

    monkeypatch.setattr(robust_al, "evaluate_robustness", counting)
    config = tiny(metrics=("entropy", "random"), budget=220, final_attacks=("pgd",), eval_attacks=("fgsm",),
                  eval_n=60)
    first = run(config, splits, tmp_path / "run")
    # stage 0 once, stage 1 per metric, each metric's final attack right after its last stage
    assert attacked == [["fgsm"], ["fgsm"], ["pgd"], ["fgsm"], ["pgd"]]
    kept = json.loads((tmp_path / "run" / "state" / "random.final.json").read_text())
    assert kept["robust_accuracy"] == first.final_attacks["random"] and kept["attacks"] == ["pgd"]

    attacked.clear()
    again = run(config, splits, tmp_path / "run", resume=True)
    assert attacked == []  # every stage and every final attack comes from the run folder
    assert again.final_attacks == first.final_attacks

    kept["digest"] = "0" * 64  # a result that does not belong to this state is computed again, not trusted
    (tmp_path / "run" / "state" / "random.final.json").write_text(json.dumps(kept))
    again = run(config, splits, tmp_path / "run", resume=True)
    assert attacked == [["pgd"]] and again.final_attacks == first.final_attacks


@pytest.mark.slow
def test_finished_metrics_of_a_run_still_going(splits, tmp_path):
    from dltest.workflows.robust_al import finished_metrics

    config = tiny(metrics=("entropy", "random"), budget=220, final_attacks=("fgsm",), eval_attacks=("fgsm",),
                  eval_n=60)
    result = run(config, splits, tmp_path / "run")
    folder = tmp_path / "run"
    complete = finished_metrics(folder)
    assert complete == json.loads((folder / "summary.json").read_text())["final"]
    # as if stopped during random's last stage: no summary, random's last record and final attack not written
    (folder / "summary.json").unlink()
    lines = (folder / "log.jsonl").read_text().splitlines()
    (folder / "log.jsonl").write_text("\n".join(line for line in lines if not ('"random"' in line and '"stage": 1' in line)) + "\n")
    (folder / "state" / "random.final.json").unlink()
    going = finished_metrics(folder)
    assert list(going) == ["entropy"] and going["entropy"] == complete["entropy"]
    assert going["entropy"]["robust_accuracy"]["fgsm"] == result.final_attacks["entropy"]["fgsm"]
