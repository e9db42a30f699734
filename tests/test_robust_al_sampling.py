"""robust-al with stochastic sampling (issue 17): ``metric_options={"sampling": "power"}`` applies to
every metric of the run, is checked before any work, names the metric ``entropy+power``, and
resumes run folders written before it existed."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from dltest.analysis.compare import compare_functions
from dltest.analysis.runs import all_records, load_runs
from dltest.data import load_dataset
from dltest.errors import DltestError
from dltest.workflows.robust_al import RobustALConfig, _prepare_folder, _run_id, robust_active_learning
from tests.cli_runner import run_cli as cli
from tests.conftest import REPO


def tiny(**overrides) -> RobustALConfig:
    settings = dict(dataset="mnist", metrics=("entropy",), budget=240, initial=200, per_stage=20, epochs=1,
                    initial_epochs=2, at="fgsm-rs", eval_attacks=("fgsm",), eval_n=50, val_n=50, check_steps=1,
                    seed=0)
    settings.update(overrides)
    return RobustALConfig(**settings)


def test_sampling_applies_to_every_metric_and_names_it():
    config = tiny(metrics=("entropy", "bald"), metric_options={"sampling": "power", "samples": 5})
    assert config.options_for("entropy") == {"sampling": "power"}
    assert config.options_for("bald") == {"sampling": "power", "samples": 5}
    assert [config.label(m) for m in config.metrics] == ["entropy+power", "bald+power"]
    cooler = tiny(metric_options={"sampling": "softmax", "temperature": 0.5})
    assert cooler.label("entropy") == "entropy+softmax(T=0.5)"
    assert tiny().label("entropy") == "entropy" and tiny().options_for("entropy") == {}


@pytest.mark.parametrize("overrides, message", [
    (dict(metrics=("entropy", "dre"), metric_options={"sampling": "power"}),
     "metric 'dre' does not rank scores, so sampling does not apply to it"),
    (dict(metrics=("margin",), metric_options={"sampling": "power"}),
     "power sampling needs scores where higher is better; 'margin' ranks its lowest scores first"),
    (dict(metric_options={"temperature": 2.0}), "temperature applies only with sampling"),
    (dict(metric_options={"sampling": "boltzmann"}), "sampling must be one of power, softmax, rank, not 'boltzmann'"),
])
def test_a_metric_sampling_does_not_apply_to_is_refused_before_any_work(overrides, message):
    with pytest.raises(DltestError, match=message):
        tiny(**overrides)


def tuples(settings: dict) -> dict:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in settings.items()}


def test_run_folders_written_before_sampling_still_resume(tmp_path):
    """A config.json written by the code before issue 17's sampling (metric_options {}) compares equal."""
    written = REPO / "docs" / "results" / "runs" / "cpu" / "robust-al" / "mnist-seed1" / "config.json"
    found = json.loads(written.read_text())
    settings = tuples({k: v for k, v in found.items() if k not in ("command", "dltest_version")})
    config = RobustALConfig(**settings)
    assert config.metric_options == {} and [config.label(m) for m in config.metrics] == ["random", "deepgini", "dre"]
    folder = tmp_path / "run"
    folder.mkdir()
    shutil.copy(written, folder / "config.json")
    _prepare_folder(folder, config, resume=True)  # accepted: nothing differs
    sampled = RobustALConfig(**{**settings, "metrics": ("deepgini",), "metric_options": {"sampling": "power"}})
    again = RobustALConfig(**tuples(json.loads(json.dumps(sampled.to_dict()))))  # round-trips through JSON
    assert again == sampled and _run_id(again) == _run_id(sampled) and again.label("deepgini") == "deepgini+power"
    with pytest.raises(DltestError, match=r"other settings \(metric_options, metrics\)"):
        _prepare_folder(folder, sampled, resume=True)


@pytest.fixture(scope="module")
def splits(mnist_train_slice):
    val = load_dataset("mnist", "val").subset(torch.arange(100))
    holdout = load_dataset("mnist", "holdout").subset(torch.arange(100))
    return mnist_train_slice.subset(torch.arange(1500)), val, holdout


def run(config, splits, folder=None):
    train, val, holdout = splits
    return robust_active_learning(config, train_data=train, val_data=val, holdout=holdout, run_dir=folder,
                                  device="cpu")


@pytest.mark.slow
def test_power_sampling_selects_differently_from_entropy_but_reproducibly(splits, tmp_path):
    plain = run(tiny(), splits, tmp_path / "entropy")
    power = run(tiny(metric_options={"sampling": "power"}), splits, tmp_path / "entropy-power")
    again = run(tiny(metric_options={"sampling": "power"}), splits)
    assert list(plain.records) == ["entropy"] and list(power.records) == ["entropy+power"]
    first, second = power.records["entropy+power"][1].selected, again.records["entropy+power"][1].selected
    assert first == second and len(set(first)) == 20  # the same seed draws the same batch
    assert set(first) != set(plain.records["entropy"][1].selected)  # a draw, not the top-20 entropy
    stage0 = lambda r: (r.labeled, r.clean_accuracy, r.robust_accuracy)  # one initial model: a paired comparison
    assert stage0(power.records["entropy+power"][0]) == stage0(plain.records["entropy"][0])

    folder = tmp_path / "entropy-power"
    assert sorted(json.loads((folder / "summary.json").read_text())["final"]) == ["entropy+power"]
    assert (folder / "entropy+power.pt").is_file() and (folder / "state" / "entropy+power.pt").is_file()
    records = all_records(load_runs([tmp_path / "entropy", folder]))  # both folders, one analysis
    assert sorted({r["metric"] for r in records}) == ["entropy", "entropy+power"]
    (test,) = compare_functions(records, ["entropy", "entropy+power"])
    assert (test.metric_a, test.metric_b, test.pairs) == ("entropy", "entropy+power", 2)  # stages 1 and 2
    resumed = robust_active_learning(tiny(metric_options={"sampling": "power"}), train_data=splits[0],
                                     val_data=splits[1], holdout=splits[2], run_dir=folder, resume=True, device="cpu")
    assert resumed.records["entropy+power"][1].selected == first  # resumed from its state, nothing redone


def test_cli_takes_sampling_and_refuses_a_metric_it_does_not_apply_to(tmp_path):
    out = tmp_path / "run"
    result = cli("robust-al", "--metric", "entropy,dre", "--sampling", "power", "--out", out)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert lines[-1].startswith("error: ") and "metric 'dre' does not rank scores" in lines[-1]
    assert "Traceback" not in result.output and not out.exists()
    result = cli("robust-al", "--metric", "entropy", "--temperature", "2", "--out", out)
    assert result.exit_code == 2 and "temperature applies only with sampling" in result.output
