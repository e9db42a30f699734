"""benchmarks/reproduce.py at its smallest size: every part runs, the report is complete, and a
rerun reuses finished runs, resumes an unfinished one and keeps the hand-written notes."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest

from tests.conftest import REPO


def load_reproduce():
    spec = importlib.util.spec_from_file_location("reproduce", REPO / "benchmarks" / "reproduce.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["reproduce"] = module  # its dataclasses look their module up while it loads
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_smoke_size_runs_every_part_and_resumes(tmp_path):
    reproduce = load_reproduce()
    runs, report = tmp_path / "runs", tmp_path / "docs" / "results.md"
    assert reproduce.main(["--size", "smoke", "--runs", str(runs), "--report", str(report), "--device", "cpu"]) == 0

    size = reproduce.SIZES["smoke"]
    robust = runs / "robust-al" / "mnist-seed0"
    summary = json.loads((robust / "summary.json").read_text())
    assert sorted(summary["final"]) == sorted(size.metrics)
    log = [json.loads(line) for line in (robust / "log.jsonl").read_text().splitlines()]
    assert {(r["metric"], r["stage"]) for r in log} == {(m, s) for m in size.metrics for s in (0, 1, 2)}
    standard = json.loads((runs / "standard-al" / "mnist-seed0" / "config.json").read_text())
    assert standard["at"] is None and standard["metrics"] == list(size.standard_metrics)
    assert json.loads((robust / "config.json").read_text())["at"] is not None
    retrained = sorted(p.name for p in (runs / "retrain").glob("*.json"))
    assert retrained == ["mnist-dre-1pct-seed0.json", "mnist-random-1pct-seed0.json"]
    # deepgini with power sampling: a run folder of its own, the same initial model (paired stage 0)
    assert size.sampled == (("deepgini", "power"),)
    sampled = runs / "robust-al" / "mnist-seed0-deepgini-power"
    sampled_summary = json.loads((sampled / "summary.json").read_text())
    assert list(sampled_summary["final"]) == ["deepgini+power"]
    assert sampled_summary["config"]["metric_options"] == {"sampling": "power"}
    stage0 = [json.loads(line) for line in (sampled / "log.jsonl").read_text().splitlines()][0]
    assert (stage0["metric"], stage0["clean_accuracy"]) == ("deepgini+power", log[0]["clean_accuracy"])

    text = report.read_text()
    for heading in ("## mnist: robust active learning (Table 5)", "## mnist: standard active learning (Table 1)",
                    "## Test selection and retraining (Section 8)", "Wilcoxon signed-rank tests",
                    "Selection bias (JSD base 2", "Pearson r across functions", "The shape the paper reports"):
        assert heading in text, heading
    assert "| dre | " in text and "67.69" in text  # the measured row beside the paper's figure
    assert "| deepgini+power | " in text and "| deepgini | deepgini+power | 2 | " in text  # its row, its test
    assert "mean ± sd over 1 seed(s)" in text  # the sampled run is not another seed
    figures = sorted(p.name for p in (report.parent / "results").glob("*.png"))
    assert figures == ["smoke-mnist-robust-accuracy.png", "smoke-mnist-robust-bias.png",
                       "smoke-mnist-robust-correlation.png"]

    # A rerun reuses finished runs; an unfinished one (no summary yet) resumes to the same end;
    # notes written by hand below the marker survive.
    log_before = (robust / "log.jsonl").read_text()
    retrain_stamp = (runs / "retrain" / "mnist-dre-1pct-seed0.json").stat().st_mtime_ns
    (robust / "summary.json").unlink()
    report.write_text(text.split(reproduce.NOTES_MARKER)[0] + reproduce.NOTES_MARKER + "\n\n## Notes\n\nby hand\n")
    assert reproduce.main(["--size", "smoke", "--runs", str(runs), "--report", str(report), "--device", "cpu"]) == 0
    assert (robust / "log.jsonl").read_text() == log_before
    assert json.loads((robust / "summary.json").read_text())["final"] == summary["final"]
    assert (runs / "retrain" / "mnist-dre-1pct-seed0.json").stat().st_mtime_ns == retrain_stamp
    assert report.read_text().endswith("## Notes\n\nby hand\n")


def test_seeds_share_the_work_between_processes(tmp_path, capsys):
    reproduce = load_reproduce()
    with pytest.raises(SystemExit) as exit_info:
        reproduce.main(["--size", "smoke", "--seeds", "one", "--runs", str(tmp_path)])
    assert exit_info.value.code == 2 and "--seeds must be comma-separated integers, got 'one'" in capsys.readouterr().err
    # a seed the size does not run is simply not run; the report is written from what is there
    report = tmp_path / "results.md"
    assert reproduce.main(["--size", "smoke", "--parts", "robust", "--seeds", "", "--runs", str(tmp_path / "runs"),
                           "--report", str(report), "--device", "cpu"]) == 0
    assert not (tmp_path / "runs" / "robust-al").exists() and "(no function has finished its last stage yet)" in report.read_text()


def test_the_cpu_sizes_follow_the_papers_schedule_where_they_say_so():
    sizes = load_reproduce().SIZES
    assert sizes["cpu"].schedule is None and sizes["cpu"].epochs == 10 == sizes["quick"].epochs
    assert (sizes["cpu"].at, sizes["cpu"].at_steps, sizes["cpu"].final_attacks) == ("pgd", 5, ("autoattack",))
    assert sizes["full"].at_steps is None and sizes["full"].final_attacks == ("autoattack",)


def test_the_final_table_counts_seeds_per_function_and_shows_the_per_stage_attacks_gap():
    reproduce = load_reproduce()
    rows = {"random": {"clean": [98.0, 97.0], "pgd": [90.0, 88.0], "autoattack": [81.0, 80.0]},
            "dre": {"clean": [97.5], "pgd": [91.0], "autoattack": [83.5]},
            "lc": {"clean": [96.0], "pgd": [70.0]}}  # finished, not yet attacked with AutoAttack
    table = reproduce.final_table(rows, "mnist", paper=True)
    assert table[0] == ("| function | seeds | clean acc. % | robust acc. % (autoattack) | robust acc. % (pgd) | "
                        "pgd - autoattack (points) | paper acc. % | paper rob. % (autoattack) |")
    assert "| dre | 1 | 97.50 | 83.50 | 91.00 | 7.50 | 98.59 | 67.69 |" in table
    assert "| random | 2 | 97.50 ± 0.71 | 80.50 ± 0.71 | 89.00 ± 1.41 | 8.50 ± 0.71 | 98.30 | 63.85 |" in table
    assert "| lc | 1 | 96.00 | - | 70.00 | - | - | - |" in table
    assert table[-1].count("|") == table[0].count("|")


def test_the_fashion_size_runs_the_papers_fashion_schedule_with_its_per_stage_attack():
    reproduce = load_reproduce()
    size = reproduce.SIZES["cpu-fashion"]
    assert size.datasets == ("fashion-mnist",) and size.metrics == ("random", "deepgini", "dre")
    assert size.seeds == (0, 1, 2) and size.final_attacks == ("autoattack",) and size.eval_attacks is None
    config = reproduce.robust_al_config(size, "fashion-mnist", 1, standard=False)
    assert (config.budget, config.initial, config.per_stage, config.stages) == (6000, 200, 200, 29)
    assert config.eval_attacks == ("apgd-square",) and config.seed == 1
