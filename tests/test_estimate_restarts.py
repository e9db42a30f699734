"""dltest estimate plan --attack-restarts (issue 18): the survival shares a plan stores over several
plan-time runs (a fake attack whose survival per run the test sets), the estimator with graded
shares against hand-computed values, the calibration shares in the output, and the CLI's refusals."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from dltest.errors import DltestError
from dltest.estimation import Sample, get_design
from tests.cli_runner import run_cli

CONFIDENCE = np.array([0.9, 0.6, 0.8, 0.7, 0.95, 0.5])
# per plan-time run (seed 0, 1, 2) and attack: did the prediction survive, per pool input
PLAN_RUNS = {0: {"pgd": "110100", "square": "111100", "fgsm": "101110"},
             1: {"pgd": "100110", "square": "100111", "fgsm": "000000"},
             2: {"pgd": "111100", "square": "011100", "fgsm": "000000"}}  # fgsm has no random start: runs once
PGD_COUNTS = "321310"  # the runs each input survived pgd
WORST_COUNTS = "221310"  # survived both attacks of a run: 110100, 100110, 011100


def _pool():
    from dltest.data import ImageDataset
    from dltest.inference import PoolOutputs

    confidence = torch.tensor(CONFIDENCE, dtype=torch.float64)
    logits = torch.stack([torch.log(confidence / (1 - confidence)), torch.zeros(6, dtype=torch.float64)], 1)
    data = ImageDataset("toy", "pool", torch.zeros(6, 1, 2, 2, dtype=torch.uint8), torch.full((6,), -1),
                        ["a", "b"], torch.arange(6), labeled=False)
    return data, PoolOutputs(logits.float())


def _fake_plan_attack(calls):
    """evaluate_robustness as the plan-time attack calls it: the flags of PLAN_RUNS[seed]."""
    def fake(model, data, attacks, seed=0, **_):
        calls.append(seed)
        calls.attacks.append(list(attacks))
        return SimpleNamespace(attacks=[SimpleNamespace(attack=a, settings=None, seconds=2.0,
                                                        robust_inputs=PLAN_RUNS[seed][a]) for a in attacks])
    return fake


class Calls(list):
    """The seeds of the plan-time runs; ``attacks``: the attacks each run ran."""

    def __init__(self):
        super().__init__()
        self.attacks: list[list[str]] = []


def _restart_plan(monkeypatch, attacks=("pgd", "square"), restarts=3, design="ppi", budget=6):
    import dltest.robustness
    from dltest.estimation import plan

    calls = Calls()
    monkeypatch.setattr(dltest.robustness, "evaluate_robustness", _fake_plan_attack(calls))
    data, outputs = _pool()
    drawn = plan(torch.nn.Identity(), data, design=design, budget=budget, seed=0, outputs=outputs,
                 attacks=list(attacks), attack_restarts=restarts)
    return drawn, calls, data


def test_the_plan_stores_the_share_of_runs_each_prediction_survived(monkeypatch, tmp_path):
    from dltest.estimation import load_plan

    drawn, calls, _ = _restart_plan(monkeypatch)
    assert calls == [0, 1, 2]  # one run per restart, seeds seed, seed + 1, seed + 2
    assert drawn.attack_restarts == 3
    assert drawn.survived == {"pgd": PGD_COUNTS, "square": "222311", "worst-case": WORST_COUNTS}
    assert drawn.attacks[0] == {"attack": "pgd", "settings": None, "seconds": 6.0,
                                "survived": pytest.approx(10 / 3), "restarts": 3}  # 3 + 3 + 4 per run
    share = np.array([3, 2, 1, 3, 1, 0]) / 3
    g, moments = drawn.surrogate("pgd")
    positions = np.asarray(drawn.positions)
    assert g == pytest.approx(CONFIDENCE[positions] * share[positions], abs=1e-6)
    whole_g = CONFIDENCE * share
    assert moments["mean_c"] == pytest.approx(whole_g.mean(), abs=1e-6)
    assert moments["mean_c2"] == pytest.approx((whole_g**2).mean(), abs=1e-6)
    assert moments["cross_c2"] == pytest.approx((whole_g * (CONFIDENCE - whole_g)).mean(), abs=1e-6)
    assert "3 runs each with its own seed" in drawn.notes[0]
    path = drawn.save(tmp_path / "plan.json")
    assert load_plan(path).survival_share("worst-case").tolist() == [2, 2, 1, 3, 1, 0]
    broken = drawn.to_dict() | {"attack_restarts": 1}  # digits above 1 with one run
    from dltest.io import write_json
    write_json(tmp_path / "bad.json", broken)
    with pytest.raises(DltestError, match="one digit 0-1 per pool input"):
        load_plan(tmp_path / "bad.json")


def test_one_restart_stores_0_1_flags_without_cross_sums(monkeypatch):
    drawn, calls, _ = _restart_plan(monkeypatch, attacks=("pgd",), restarts=1)
    assert calls == [0] and drawn.attack_restarts == 1
    assert drawn.survived == {"pgd": "110100"}
    assert set(drawn.surrogate_moments["pgd"]) == {"mean_c", "mean_c2"}
    assert drawn.attacks == [{"attack": "pgd", "settings": None, "seconds": 2.0, "survived": 3}]


def test_attacks_default_to_three_runs_and_flags_to_one(monkeypatch):
    drawn, calls, _ = _restart_plan(monkeypatch, attacks=("pgd",), restarts=None)
    assert calls == [0, 1, 2] and drawn.attack_restarts == 3 and drawn.survived == {"pgd": PGD_COUNTS}
    from dltest.estimation import plan

    data, outputs = _pool()
    given = plan(None, data, design="ppi", budget=6, outputs=outputs, survived={"pgd": [1, 0, 1, 1, 0, 1]})
    assert given.attack_restarts == 1 and given.survived == {"pgd": "101101"}


def test_an_attack_without_a_random_start_runs_once_and_counts_for_every_run(monkeypatch):
    drawn, calls, _ = _restart_plan(monkeypatch, attacks=("fgsm", "pgd"), restarts=3)
    assert calls == [0, 1, 2] and calls.attacks == [["fgsm", "pgd"], ["pgd"], ["pgd"]]
    # fgsm's one run (101110) counts 3 times; worst case per run: 100100, 100110, 101100
    assert drawn.survived == {"fgsm": "303330", "pgd": PGD_COUNTS, "worst-case": "301310"}
    assert drawn.attacks[0] == {"attack": "fgsm", "settings": None, "seconds": 2.0, "survived": 4.0, "restarts": 1}
    assert drawn.attacks[1]["seconds"] == 6.0 and drawn.attacks[1]["restarts"] == 3
    from dltest.estimation.estimating import surrogate_label
    assert surrogate_label(drawn, "fgsm") == "confidence x survived fgsm"
    assert surrogate_label(drawn, "pgd") == "confidence x share of 3 runs survived pgd"
    assert surrogate_label(drawn, "worst-case") == "confidence x share of 3 runs survived worst-case"
    alone, calls, _ = _restart_plan(monkeypatch, attacks=("fgsm",), restarts=None)
    assert calls == [0] and alone.attack_restarts == 1 and alone.survived == {"fgsm": "101110"}
    with pytest.raises(DltestError, match="same outcome every run"):
        _restart_plan(monkeypatch, attacks=("fgsm",), restarts=3)


@pytest.mark.parametrize("value", [0, 10, 2.5, True, "3"])
def test_plan_refuses_bad_attack_restarts(value):
    from dltest.estimation import plan

    data, outputs = _pool()
    with pytest.raises(DltestError, match="attack restarts must be a whole number from 1 to 9"):
        plan(torch.nn.Identity(), data, design="ppi", budget=6, outputs=outputs, attacks=["pgd"],
             attack_restarts=value)
    with pytest.raises(DltestError, match="give attacks too"):
        plan(torch.nn.Identity(), data, design="ppi", budget=6, outputs=outputs, attack_restarts=2)


def test_ppi_with_graded_survival_shares_by_hand():
    from dltest.estimation.estimating import calibrate_surrogate, estimate_outcome

    f = np.array([0.9, 0.8, 0.95, 0.7, 0.6, 0.9, 0.85, 0.5])
    share = np.array([1, 2 / 3, 1 / 3, 1, 0, 0, 1 / 3, 2 / 3])
    right = np.array([1, 1, 1, 0, 1, 1, 1, 0], float)
    robust = np.array([1, 1, 0, 0, 0, 1, 0, 0], float)
    g = f * share
    pool_f = {"mean_c": 0.8, "mean_c2": 0.68}
    pool_g = {"mean_c": 0.5, "mean_c2": 0.4, "cross_c2": 0.05}
    # right draws 0, 1, 2, 4, 5, 6: weights s = 1, 2/3, 1/3, 0, 0, 1/3 (sum 7/3), robust 0, 1, 5:
    a = (1 + 2 / 3) / (7 / 3)  # 5/7
    b = (1 / 3 + 1) / (1 / 3 + 2 / 3 + 1 + 1 + 2 / 3)  # weights 1 - s = 0, 1/3, 2/3, 1, 1, 2/3: 4/11
    fit = calibrate_surrogate(robust, right, g, f)
    assert (fit.a, fit.b) == pytest.approx((5 / 7, 4 / 11))
    assert (fit.a_draws, fit.b_draws) == pytest.approx((7 / 3, 11 / 3))
    sample = Sample("ppi", 100, np.arange(8), np.full(8, 0.08), f, 0.8, False, pool_f)
    result = estimate_outcome(get_design("ppi"), sample, robust, right, False, 0.95, (g, pool_g))
    h = a * g + b * (f - g)
    pool_h = a * 0.5 + b * (0.8 - 0.5)
    # mean(h^2) = a^2 mean(g^2) + 2 a b mean(g k) + b^2 mean(k^2), k = f - g, mean(k^2) = 0.68 - 0.4 - 2 * 0.05
    pool_h2 = a * a * 0.4 + 2 * a * b * 0.05 + b * b * (0.68 - 0.4 - 0.1)
    lam = float(np.clip(np.cov(robust, h, ddof=1)[0, 1] / np.var(h, ddof=1), 0, 1))
    residual = robust - lam * h
    assert result.lam == pytest.approx(lam)
    assert result.estimate == pytest.approx(lam * pool_h + residual.mean())
    anticipated = pool_h - (2 * lam - lam**2) * pool_h2 - ((1 - lam) * pool_h) ** 2  # 3 robust: floor applies
    assert result.standard_error == pytest.approx(math.sqrt((1 - 8 / 100) * max(residual.var(ddof=1), anticipated) / 8))


def test_a_weight_below_one_draw_clips_the_share_to_even_odds():
    from dltest.estimation.estimating import calibrate_surrogate

    f = np.full(4, 0.8)
    fit = calibrate_surrogate(np.array([1, 0, 0, 1.0]), np.ones(4), f * np.array([0.25, 0, 0, 0]), f)
    assert fit.a == pytest.approx(0.5) and fit.a_draws == pytest.approx(0.25)  # weight 1/4: [1/2, 1/2]
    assert fit.b == pytest.approx((0.75 + 1) / 3.75)


def test_the_estimate_reports_the_calibration_shares(monkeypatch):
    import dltest.robustness
    from dltest.estimation import estimate

    drawn, _, data = _restart_plan(monkeypatch, attacks=("pgd",), restarts=3)  # ppi, all 6 inputs drawn once
    labels = np.array([0, 0, 0, 0, 1, 0])  # every prediction is class 0: input 4 is wrong
    robust_at_estimate = np.array([1, 0, 1, 0, 0, 1])

    def fake(model, data, attacks, seed=0, **_):
        at = data.source_index.numpy()
        flags = "".join(str(int(v)) for v in robust_at_estimate[at])
        return SimpleNamespace(clean_inputs="".join("1" if labels[i] == 0 else "0" for i in at), worst_case=None,
                               attacks=[SimpleNamespace(attack="pgd", settings=None, seconds=1.0,
                                                        robust_inputs=flags, n=len(at))])

    monkeypatch.setattr(dltest.robustness, "evaluate_robustness", fake)
    result = estimate(drawn, {i: int(labels[i]) for i in drawn.labels_needed}, model=torch.nn.Identity(),
                      data=data, attacks=["pgd"])
    figure = result.figure("pgd")
    # shares 1, 2/3, 1/3, 1, (1/3, wrong), 0; right inputs 0, 1, 2, 3, 5 robust 1, 0, 1, 0, 1
    # a = (1 + 1/3) / (1 + 2/3 + 1/3 + 1) = 4/9; b = (2/3 + 1) / (1/3 + 2/3 + 1) = 5/6, kept within [1/4, 3/4]
    assert figure.surrogate_a == pytest.approx(4 / 9, abs=1e-6) and figure.surrogate_a_draws == pytest.approx(3.0)
    assert figure.surrogate_b == pytest.approx(0.75) and figure.surrogate_b_draws == pytest.approx(2.0)
    assert figure.surrogate == "confidence x share of 3 runs survived pgd"
    clean = result.figure("accuracy")
    assert clean.surrogate == "confidence" and clean.surrogate_a is None and clean.surrogate_b_draws is None


@pytest.mark.parametrize("value", ["0", "x", "10"])
def test_cli_refuses_bad_attack_restarts_in_one_line(tmp_path, value):
    out = tmp_path / "plan.json"
    result = run_cli("estimate", "plan", "--budget", "10", "-d", "mnist", "--split", "holdout", "--attacks", "pgd",
                     "--attack-restarts", value, "--out", str(out))
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "--attack-restarts" in lines[0] and "whole number from 1 to 9" in lines[0], lines
    assert not out.exists()


def test_cli_refuses_attack_restarts_without_attacks(tmp_path):
    out = tmp_path / "plan.json"
    result = run_cli("estimate", "plan", "--budget", "10", "-d", "mnist", "--split", "holdout",
                     "--attack-restarts", "3", "--out", str(out))
    assert result.exit_code == 2 and "give --attacks too" in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1 and not out.exists()


@pytest.mark.parametrize("kwargs, message", [
    (dict(design="srs", score="deepgini"), "score applies to the importance design"),
    (dict(budget="abc"), "abc"),
    (dict(eps=0.3), "give attacks too"),
    (dict(attack_restarts=3), "repeat the plan-time attacks"),
    (dict(attacks=["fgsm"], attack_restarts=2), "same outcome every run"),
    (dict(attacks=["pgd"], attack_restarts=0), "1 to 9"),
    (dict(design="nope"), "nope"),
])
def test_plan_checks_its_arguments_before_any_forward_pass(kwargs, message):
    from dltest.data import load_dataset
    from dltest.estimation import plan

    class Counting(torch.nn.Module):
        calls = 0

        def forward(self, x):
            Counting.calls += 1
            return torch.zeros(len(x), 10)

    data = load_dataset("mnist", "holdout").subset(torch.arange(20))
    with pytest.raises(DltestError, match=message):
        plan(Counting(), data, **kwargs)
    assert Counting.calls == 0
