"""dltest gate: bars decided on exact bounds, baselines, worst case, warnings, outputs, exit codes."""

from __future__ import annotations

import copy
import json
import xml.etree.ElementTree as ET

import pytest
import torch
from torch import nn

from dltest.analysis.intervals import lower_bound
from dltest.checkpoint import load_model, save_checkpoint
from dltest.errors import DltestError
from dltest.gate import GatePolicy, decide_bars, load_baseline, parse_bars, read_config, run_gate
from dltest.robustness import RobustnessReport, evaluate_robustness
from tests.client_nets import NoisyLogits
from tests.cli_runner import run_cli

# Small and fast: 300 holdout inputs, PGD with 5 steps at eps 0.1 (a few seconds on one CPU thread).
N = 300
PGD = ["--eps", "0.1", "--steps", "5", "--alpha", "0.03"]

@pytest.fixture(scope="module")
def holdout():
    from dltest.data import load_dataset

    return load_dataset("mnist", "holdout")


@pytest.fixture(scope="module")
def bundled():
    return load_model(dataset="mnist")[0]


@pytest.fixture(scope="module")
def measured(bundled, holdout):
    """The bundled model's figures on the gate's inputs (bars below are set around them)."""
    return evaluate_robustness(bundled, holdout, ["pgd"], n=N, seed=0, eps=0.1, steps=5, alpha=0.03)


def _report(correct: int, n: int) -> RobustnessReport:
    flags = "1" * correct + "0" * (n - correct)
    return RobustnessReport(dataset="mnist", split="holdout", n=n, pool_size=5000, seed=0,
                            clean_accuracy=correct / n, clean_correct=correct, clean_inputs=flags)


def test_a_minimum_is_decided_on_the_exact_lower_bound():
    report = _report(297, 300)  # 99.0%, one-sided 95% lower bound 97.44%
    [bar] = decide_bars(report, GatePolicy(min_accuracy=0.97))
    assert bar.passed and bar.bound == pytest.approx(lower_bound(297, 300)) and bar.estimate == 0.99
    [bar] = decide_bars(report, GatePolicy(min_accuracy=0.98))
    assert not bar.passed  # the point estimate clears 0.98, the interval does not: evaluate more inputs
    assert "Clopper-Pearson" in bar.rule and bar.interval[0] < bar.bound < 0.99 < bar.interval[1]
    [bar] = decide_bars(_report(2970, 3000), GatePolicy(min_accuracy=0.98))
    assert bar.passed  # the same 99.0% on ten times the inputs shows it


@pytest.mark.slow
def test_bars_just_below_and_above_the_bundled_models_figures(bundled, holdout, measured):
    acc_bound = lower_bound(measured.clean_correct, N)
    pgd_bound = lower_bound(measured.attacks[0].robust_correct, N)
    assert 0.1 < measured.robust_accuracy("pgd") < measured.clean_accuracy  # a real, non-trivial figure
    below = GatePolicy(min_accuracy=acc_bound - 0.002, min_robust={"pgd": pgd_bound - 0.002})
    result = run_gate(bundled, holdout, below, n=N, eps=0.1, steps=5, alpha=0.03)
    assert result.passed and [b.passed for b in result.bars] == [True, True]
    assert result.report.clean_correct == measured.clean_correct  # same inputs, same figures
    above = GatePolicy(min_accuracy=measured.clean_accuracy + 0.002, min_robust={"pgd": pgd_bound - 0.002})
    result = run_gate(bundled, holdout, above, n=N, eps=0.1, steps=5, alpha=0.03)
    assert not result.passed and [b.passed for b in result.bars] == [False, True]
    # between the bound and the estimate: the interval decides, and fails it
    between = GatePolicy(min_robust={"pgd": (pgd_bound + measured.robust_accuracy("pgd")) / 2})
    result = run_gate(bundled, holdout, between, n=N, eps=0.1, steps=5, alpha=0.03)
    assert not result.passed and result.bars[0].estimate > result.bars[0].threshold
    assert "pgd" in result.summary() and "lower bound" in result.summary()


def test_worst_case_row_is_robust_only_against_every_attack(bundled, holdout):
    report = evaluate_robustness(bundled, holdout, ["pgd", "fgsm"], n=200, seed=1, eps=0.1, steps=5, alpha=0.03)
    pgd, fgsm, worst = report.outcome("pgd").flags, report.outcome("fgsm").flags, report.worst_case.flags
    assert torch.equal(worst, pgd & fgsm)
    assert report.worst_case.robust_correct == int((pgd & fgsm).sum())
    assert report.worst_case.robust_correct <= min(o.robust_correct for o in report.attacks)
    assert len(report.clean_inputs) == 200 and report.clean_inputs.count("1") == report.clean_correct
    assert not (pgd & ~report.outcome("pgd").flags).any()
    assert not (pgd & ~torch.tensor([c == "1" for c in report.clean_inputs])).any()  # robust implies correct
    assert report.worst_case.label == "worst-case of " + ", ".join(o.label for o in report.attacks)
    assert evaluate_robustness(bundled, holdout, ["fgsm"], n=20).worst_case is None


def _weakened(model: nn.Module, scale: float) -> nn.Module:
    """The bundled model with noise on its last layer: it loses accuracy."""
    worse = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        weight = worse.head.weight
        weight.add_(scale * weight.std() * torch.randn(weight.shape, generator=generator))
    return worse


@pytest.mark.slow
def test_a_paired_drop_against_a_baseline(bundled, holdout, tmp_path):
    first = run_gate(bundled, holdout, GatePolicy(min_accuracy=0.5), n=N, seed=3, eps=0.1, steps=5, alpha=0.03,
                     attacks=["pgd"])
    path = tmp_path / "base.json"
    path.write_text(json.dumps(first.to_dict()))
    baseline = load_baseline(path)
    assert baseline.indices == first.report.indices and baseline.clean_inputs == first.report.clean_inputs
    # the same model: no drop, nothing discordant; the baseline's inputs, seed and attack settings are reused
    same = run_gate(bundled, holdout, GatePolicy(max_drop=0.0), baseline=path)
    assert same.passed and {b.figure for b in same.bars} == {"accuracy", "pgd"}
    assert all(b.lost == 0 and b.gained == 0 and b.p_value == 1.0 for b in same.bars)
    assert same.report.indices == first.report.indices and same.report.seed == 3
    # a damaged model loses clearly more than 2 points: the paired test shows it
    worse = run_gate(_weakened(bundled, 3.0), holdout, GatePolicy(max_drop={"accuracy": 0.02}), baseline=baseline)
    [bar] = worse.bars
    assert not worse.passed and bar.drop > 0.02 and bar.p_value < 0.05 and "McNemar" in bar.rule
    assert bar.lost - bar.gained == round(bar.drop * N)
    assert bar.baseline == first.report.clean_accuracy
    # relative tolerance: a share of the baseline's figure
    rel = run_gate(bundled, holdout, GatePolicy(max_relative_drop={"pgd": 0.1}), baseline=baseline)
    assert rel.bars[0].tolerance == pytest.approx(0.1 * first.report.robust_accuracy("pgd"))
    # a slightly damaged model whose small drop is within noise passes a 2-point tolerance
    slight = run_gate(_weakened(bundled, 0.3), holdout, GatePolicy(max_drop={"accuracy": 0.02}), baseline=baseline)
    assert slight.bars[0].drop < 0.02 and slight.passed


@pytest.mark.slow
def test_baseline_mismatches_are_refused(bundled, holdout, tmp_path):
    first = run_gate(bundled, holdout, GatePolicy(min_accuracy=0.5), n=50, eps=0.1, steps=5, alpha=0.03,
                     attacks=["pgd"])
    with pytest.raises(DltestError, match="differs from the baseline's seed"):
        run_gate(bundled, holdout, GatePolicy(max_drop=0.01), baseline=first.report, seed=1)
    with pytest.raises(DltestError, match="other settings"):
        run_gate(bundled, holdout, GatePolicy(max_drop=0.01), baseline=first.report, steps=7)
    from dltest.data import load_dataset

    with pytest.raises(DltestError, match="evaluated on mnist/holdout"):
        run_gate(bundled, load_dataset("mnist", "val"), GatePolicy(max_drop=0.01), baseline=first.report)
    with pytest.raises(DltestError, match="not in both"):
        run_gate(bundled, holdout, GatePolicy(max_drop={"square": 0.01}), baseline=first.report)
    with pytest.raises(DltestError, match="needs a baseline"):
        run_gate(bundled, holdout, GatePolicy(max_drop=0.01))




def test_a_model_randomised_at_eval_time_is_refused_unless_asked(bundled, holdout):
    with pytest.raises(DltestError, match="allow-randomised"):
        run_gate(NoisyLogits(bundled).eval(), holdout, GatePolicy(min_accuracy=0.5), n=20)
    result = run_gate(NoisyLogits(bundled).eval(), holdout, GatePolicy(min_accuracy=0.5), n=20, allow_randomised=True)
    assert any("randomised" in w for w in result.warnings)


class _Quantised(nn.Module):
    """Rounds its inputs to 2 grey levels first: the gradient is zero, PGD and FGSM cannot move."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(torch.round(x))


@pytest.mark.slow
def test_gradient_masking_warning_when_square_beats_pgd(bundled, holdout):
    result = run_gate(_Quantised(bundled).eval(), holdout, GatePolicy(min_robust={"pgd": 0.0, "square": 0.0}), n=60,
                      eps=0.3, steps=5, alpha=0.1, queries=300)
    pgd, square = result.report.outcome("pgd"), result.report.outcome("square")
    assert pgd.robust_accuracy > square.robust_accuracy + 0.1
    assert any("gradients may be masked" in w and "pgd" in w for w in result.warnings)
    # an honest model: no warning
    honest = evaluate_robustness(bundled, holdout, ["fgsm", "square"], n=60, eps=0.3, queries=300)
    assert not any("masked" in w for w in honest.warnings)


def test_bar_parsing():
    assert parse_bars("pgd=0.8, square=0.85", "min robust", "worst-case") == {"pgd": 0.8, "square": 0.85}
    assert parse_bars("0.8", "min robust", "worst-case") == {"worst-case": 0.8}
    assert parse_bars({"accuracy": 0.01}, "max drop", "*") == {"accuracy": 0.01}
    for bad, match in (("pgd=1.2", r"in \[0, 1\]"), ("pgd=x", "number"), ("foo=0.5", "unknown figure 'foo'"),
                       ("pgd=0.5,pgd=0.6", "twice")):
        with pytest.raises(DltestError, match=match):
            parse_bars(bad, "min robust", "worst-case")
    with pytest.raises(DltestError, match="confidence"):
        GatePolicy(min_accuracy=0.9, confidence=95)
    with pytest.raises(DltestError, match=r"\[0, 1\)"):
        GatePolicy(max_drop=1.0)


# --- the command -------------------------------------------------------------------------------


def _gate(tmp_path, *args, env=None):
    out = tmp_path / "gate.json"
    result = run_cli("gate", "--n", str(N), *PGD, "--out", str(out), *args, env=env)
    return result, out


@pytest.mark.slow
def test_cli_exit_codes_junit_markdown_and_step_summary(tmp_path, measured):
    pgd_bound = lower_bound(measured.attacks[0].robust_correct, N)
    summary = tmp_path / "summary.md"
    summary.write_text("earlier step\n")
    junit, md = tmp_path / "gate.xml", tmp_path / "gate.md"
    ok, out = _gate(tmp_path, "--min-accuracy", "0.9", "--min-robust", f"pgd={pgd_bound - 0.002:.4f}",
                    "--junit", str(junit), "--markdown", str(md), env={"GITHUB_STEP_SUMMARY": str(summary)})
    assert ok.exit_code == 0, ok.output
    report = json.loads(out.read_text())
    assert report["command"] == "dltest gate" and report["passed"] and report["seed"] == 0
    assert report["dltest_version"] and len(report["bars"]) == 2 and report["n"] == N
    assert len(report["evaluation"]["clean_inputs"]) == N
    suite = ET.parse(junit).getroot().find("testsuite")
    assert suite.get("tests") == "2" and suite.get("failures") == "0" and len(suite.findall("testcase")) == 2
    table = md.read_text()
    assert "| `accuracy >= 0.9` |" in table and "pass" in table
    assert summary.read_text().startswith("earlier step\n") and "dltest gate: passed" in summary.read_text()

    failing, out = _gate(tmp_path, "--min-accuracy", "0.9", "--min-robust", f"pgd={measured.robust_accuracy('pgd') + 0.01:.4f}",
                         "--junit", str(junit))
    assert failing.exit_code == 1, failing.output
    assert json.loads(out.read_text())["passed"] is False
    suite = ET.parse(junit).getroot().find("testsuite")
    assert suite.get("tests") == "2" and suite.get("failures") == "1"
    [failure] = [c for c in suite.findall("testcase") if c.find("failure") is not None]
    assert failure.get("name").startswith("pgd >=") and "lower bound" in failure.find("failure").get("message")


@pytest.mark.slow
def test_cli_baseline_round_trip(tmp_path):
    first, out = _gate(tmp_path, "--min-accuracy", "0.5", "--attacks", "pgd")
    assert first.exit_code == 0, first.output
    second = run_cli("gate", "--baseline", str(out), "--max-drop", "0.01", "--out", str(tmp_path / "b.json"))
    assert second.exit_code == 0, second.output
    bars = json.loads((tmp_path / "b.json").read_text())["bars"]
    assert [b["figure"] for b in bars] == ["accuracy", "pgd"] and all(b["drop"] == 0 for b in bars)
    # a dltest evaluate report is a baseline too
    evaluated = tmp_path / "ev.json"
    result = run_cli("evaluate", "--attacks", "pgd,fgsm", "--n", "100", *PGD, "--out", str(evaluated))
    assert result.exit_code == 0, result.output
    third = run_cli("gate", "--baseline", str(evaluated), "--max-drop", "0", "--min-robust", "worst-case=0.01",
                    "--out", str(tmp_path / "c.json"))
    assert third.exit_code == 0, third.output
    bars = json.loads((tmp_path / "c.json").read_text())["bars"]
    assert [b["figure"] for b in bars] == ["worst-case", "accuracy", "pgd", "fgsm", "worst-case"]


@pytest.mark.parametrize("args, message", [
    (["--min-accuracy", "1.5"], "min accuracy must be in [0, 1]"),
    (["--min-accuracy", "-0.1"], "must be in [0, 1]"),
    (["--min-robust", "pgdx=0.5"], "unknown figure 'pgdx'"),
    (["--max-drop", "0.01"], "needs a baseline"),
    (["--confidence", "1.5", "--min-accuracy", "0.5"], "confidence must be in (0, 1)"),
    ([], "the gate has no bars"),
    (["--min-accuracy", "0.5", "--device", "tpu"], "device"),
    (["--min-accuracy", "0.5", "--baseline", "missing.json", "--max-drop", "0.1"], "file not found"),
])
def test_cli_bad_usage_exits_2_and_writes_nothing(tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "never.json"
    result = run_cli("gate", "--out", str(out), *args)
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert not out.exists()


@pytest.mark.parametrize("content", ['[1, 2]', '{"metric": "dre", "indices": [1, 2]}', '{"evaluation": {"n": 3}}'])
def test_a_baseline_that_is_no_report_exits_2(tmp_path, content):
    path = tmp_path / "base.json"
    path.write_text(content)
    result = run_cli("gate", "--baseline", str(path), "--max-drop", "0.01", "--out", str(tmp_path / "x.json"))
    assert result.exit_code == 2 and "is not a dltest gate or evaluate report" in result.output
    assert not (tmp_path / "x.json").exists()


def test_cli_baseline_from_another_dataset_exits_2(tmp_path):
    first, out = _gate(tmp_path, "--min-accuracy", "0.5", "--attacks", "pgd")
    assert first.exit_code == 0
    result = run_cli("gate", "-d", "fashion-mnist", "--baseline", str(out), "--max-drop", "0.01",
                     "--out", str(tmp_path / "x.json"))
    assert result.exit_code == 2 and "compare like with like" in result.output
    assert not (tmp_path / "x.json").exists()


def test_config_from_pyproject_and_dltest_toml(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "pyproject.toml").write_text(
        '[project]\nname = "x"\n\n[tool.dltest.gate]\nmin-accuracy = 0.9\nmin-robust = { fgsm = 0.0 }\nn = 100\n'
        'eps = "0.1"\n'
    )
    settings, source = read_config()
    assert settings["min-robust"] == {"fgsm": 0.0} and source.endswith("pyproject.toml")
    result = run_cli("gate", "--out", "g.json")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "g.json").read_text())
    assert [b["name"] for b in report["bars"]] == ["accuracy >= 0.9", "fgsm >= 0"] and report["n"] == 100
    # the command line wins over the file
    result = run_cli("gate", "--out", "g.json", "--min-accuracy", "0.999", "--n", "100")
    assert result.exit_code == 1
    # dltest.toml comes first; an unknown key is bad usage
    (tmp_path / "dltest.toml").write_text("[gate]\nmin-acuracy = 0.9\n")
    result = run_cli("gate", "--out", "g2.json")
    assert result.exit_code == 2 and "unknown key 'min-acuracy'" in result.output
    (tmp_path / "dltest.toml").write_text("[gate\n")
    result = run_cli("gate", "--out", "g2.json")
    assert result.exit_code == 2 and "not valid TOML" in result.output
    assert not (tmp_path / "g2.json").exists()
