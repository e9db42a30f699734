"""dltest estimate: each design's estimator against hand-computed values, coverage on a synthetic
pool of known accuracy, the plan/estimate CLI round trip on a small MNIST slice, gate --estimate."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest

from dltest.analysis.intervals import clopper_pearson
from dltest.errors import DltestError
from dltest.estimation import DESIGNS, PoolScores, Sample, get_design
from dltest.estimation.designs import _normal, _tuned_lambda, neyman_counts
from dltest.estimation.estimating import srs_labels_for_width
from tests.cli_runner import run_cli


def _sample(design: str, positions, probability, confidence, pool_size, **extra) -> Sample:
    moments = extra.pop("moments", {"mean_c": 0.5, "mean_c2": 0.25})
    return Sample(design, pool_size, np.asarray(positions), np.asarray(probability, float),
                  np.asarray(confidence, float), moments["mean_c"], extra.pop("with_replacement", False),
                  moments, **extra)


# --- each estimator against values computed by hand ------------------------------------------


def test_srs_is_k_over_n_with_the_clopper_pearson_interval():
    sample = _sample("srs", [0, 3, 5, 7], [0.5] * 4, [0.9] * 4, 8)
    result = get_design("srs").estimate(sample, np.array([1, 1, 0, 1]))
    exact = clopper_pearson(3, 4)
    assert result.estimate == 0.75
    assert (result.low, result.high) == pytest.approx((exact.low, exact.high))


def test_the_interval_is_clopper_pearson_at_the_effective_sample_size():
    # p = 0.8 with the variance of 100 simple random labels, from 50 labels: n_eff = 100 (z / t_49)^2
    from scipy.stats import beta, norm, t

    result = _normal(0.8, 0.8 * 0.2 / 100, 0.95, n=50)
    n_eff = 100 * (norm.ppf(0.975) / t.ppf(0.975, 49)) ** 2
    k = 0.8 * n_eff
    assert n_eff == pytest.approx(95.1, abs=0.1)
    assert result.low == pytest.approx(beta.ppf(0.025, k, n_eff - k + 1), abs=1e-9)
    assert result.high == pytest.approx(beta.ppf(0.975, k + 1, n_eff - k), abs=1e-9)
    assert result.standard_error == pytest.approx(0.04)
    exact = clopper_pearson(80, 100)  # without the correction it would be the exact interval of 80 / 100
    assert result.low < exact.low and result.high > exact.high


def test_stratified_mean_and_variance_by_hand():
    # strata of 4 and 4; stratum 0: labels 1, 0 (mean 0.5, variance 0.5 > floor 0.6 * 0.4);
    # stratum 1: labels 1, 1 (variance 0, floored at 0.9 * 0.1 = 0.09); fpc = 1 - 2/4 each.
    sample = _sample("stratified", [0, 1, 4, 5], [0.5] * 4, [0.5, 0.6, 0.9, 0.95], 8,
                     strata=np.array([0, 0, 1, 1]), strata_sizes=np.array([4, 4]),
                     strata_mean_confidence=np.array([0.6, 0.9]))
    result = get_design("stratified").estimate(sample, np.array([1, 0, 1, 1]))
    assert result.estimate == pytest.approx(0.5 * 0.5 + 0.5 * 1.0)
    variance = 0.25 * 0.5 * 0.5 / 2 + 0.25 * 0.5 * 0.09 / 2
    assert result.standard_error == pytest.approx(math.sqrt(variance))


def test_importance_is_one_minus_the_hansen_hurwitz_error_rate():
    # N = 4; draws of positions 0, 2, 2 with per-draw probabilities 0.1, 0.4, 0.4; only the second is wrong.
    # weights w = 1/(N q) = 2.5, 0.625, 0.625; y w = 2.5, 0, 0.625: cov(y w, w) / var(w) = 1.367 / 1.172
    # clips to lambda = 1, the error rate's Hansen-Hurwitz estimate
    sample = _sample("importance", [0, 2, 2], [0.1, 0.4, 0.4], [0.9, 0.6, 0.6], 4, with_replacement=True,
                     moments={"mean_c": 0.9, "mean_c2": 0.85, "s0": 1.0, "s1": 0.95, "s2": 0.9})
    result = get_design("importance").estimate(sample, np.array([1, 0, 1]))
    terms = np.array([0.0, 1 / (4 * 0.4), 0.0])  # (1 - y) / (N q)
    assert result.estimate == pytest.approx(1 - terms.mean())  # 0.791667
    assert result.standard_error == pytest.approx(math.sqrt(terms.var(ddof=1) / 3))  # above the floor 0.04
    assert result.lam == 1.0


def test_importance_tunes_lambda_towards_the_accuracys_hansen_hurwitz_when_right_is_rare():
    # N = 4; q = 0.5, 0.25, 0.25 -> w = 0.5, 1, 1; y = 1, 0, 0 -> y w = 0.5, 0, 0.
    # cov(y w, w) = -1/12 < 0: lambda clips to 0, the estimate is mean(y w) = 1/6 (Hansen-Hurwitz of
    # the accuracy) with variance var(y w) / 3 = (1/12) / 3; the floor s1 - mean_c^2 = 0.05 is below it
    moments = {"mean_c": 0.5, "mean_c2": 0.3, "s0": 1.2, "s1": 0.3, "s2": 0.1}
    sample = _sample("importance", [0, 1, 2], [0.5, 0.25, 0.25], [0.5] * 3, 4, with_replacement=True, moments=moments)
    result = get_design("importance").estimate(sample, np.array([1, 0, 0]))
    assert result.lam == 0.0
    assert result.estimate == pytest.approx(1 / 6)
    assert result.standard_error == pytest.approx(math.sqrt(1 / 12 / 3))
    # four draws, q = 0.25, 0.25, 0.125, 0.125 -> w = 1, 1, 2, 2; y = 0, 1, 0, 1 -> y w = 0, 1, 0, 2:
    # cov(y w, w) = (0.375 - 0.125 - 0.375 + 0.625) / 3 = 1/6, var(w) = 1/3: lambda = 1/2;
    # terms y w - w / 2 = -0.5, 0.5, -1, 1 (mean 0, variance 2.5 / 3 above the floor 0.25 * 1.2)
    mixed = _sample("importance", [0, 1, 2, 3], [0.25, 0.25, 0.125, 0.125], [0.5] * 4, 4, with_replacement=True,
                    moments=moments)
    tuned = get_design("importance").estimate(mixed, np.array([0, 1, 0, 1]))
    assert tuned.lam == pytest.approx(0.5)
    assert tuned.estimate == pytest.approx(0.5)
    assert tuned.standard_error == pytest.approx(math.sqrt(2.5 / 3 / 4))
    # all wrong: lambda 0, terms 0; the floor at survival 0.5: 0.5 s1 - (0.5 mean_c)^2 = 0.15 - 0.0625
    floored = get_design("importance").estimate(sample, np.zeros(3), survival=0.5)
    assert floored.estimate == 0.0
    assert floored.standard_error == pytest.approx(math.sqrt(0.0875 / 3))
    # the floor with lambda = 1 is the error rate's: s0 - s1 - (1 - mean_c)^2 = 1.2 - 0.3 - 0.25
    sample_right = _sample("importance", [0, 0, 0], [0.5] * 3, [0.5] * 3, 4, with_replacement=True, moments=moments)
    assert get_design("importance").estimate(sample_right, np.ones(3)).standard_error == pytest.approx(
        math.sqrt(0.65 / 3))


def test_variance_degrees_of_freedom_shrink_with_heavy_tails():
    from scipy.stats import beta, norm, t

    from dltest.estimation.designs import variance_df

    # one 1 among ten: Bernoulli(0.1) moments, excess kurtosis (1 - 6 * 0.09) / 0.09 = 5.111;
    # df = 2 / (2/9 + 5.111/10) = 2.727 instead of n - 1 = 9
    assert variance_df(np.array([1.0] + [0.0] * 9)) == pytest.approx(2 / (2 / 9 + (0.46 / 0.09) / 10))
    # light tails (excess kurtosis -2 for two equal halves) keep n - 1; constant terms have no variance
    assert variance_df(np.array([0.0, 1.0] * 5)) == pytest.approx(9)
    assert variance_df(np.zeros(10)) is None
    # the interval uses t at that df in Korn & Graubard's factor
    result = _normal(0.8, 0.8 * 0.2 / 100, 0.95, n=10, df=2.727)
    n_eff = 100 * (norm.ppf(0.975) / t.ppf(0.975, 2.727)) ** 2
    assert result.low == pytest.approx(beta.ppf(0.025, 0.8 * n_eff, 0.2 * n_eff + 1), abs=1e-9)


def test_designs_below_their_minimum_budget_say_their_interval_is_not_valid():
    assert get_design("importance").invalid_reason(199).startswith("importance needs at least 200 draws")
    assert get_design("importance").invalid_reason(200) is None
    assert get_design("active").invalid_reason(99).startswith("active needs at least 100 draws")
    assert get_design("active").invalid_reason(100) is None
    for name in ("srs", "stratified", "ppi"):
        assert get_design(name).invalid_reason(1) is None


def test_ppi_is_lambda_mean_f_plus_the_mean_residual():
    # lambda = cov(y, f) / var(f) = 2.27 -> clipped to 1; residuals y - f = 0.1, -0.5, 0.3, 0.1 (mean 0)
    sample = _sample("ppi", [1, 2, 3, 4], [0.4] * 4, [0.9, 0.5, 0.7, 0.9], 10,
                     moments={"mean_c": 0.8, "mean_c2": 0.7})
    result = get_design("ppi").estimate(sample, np.array([1, 0, 1, 1]))
    assert result.lam == 1.0
    assert result.estimate == pytest.approx(0.8)
    assert result.standard_error == pytest.approx(math.sqrt((1 - 4 / 10) * 0.12 / 4))  # 0.12 > floor 0.1


def test_active_inference_is_the_augmented_ipw_estimate():
    # N = 5, q = 0.2, 0.4, 0.1 -> weights 1/(N q) = 1, 0.5, 2; lambda clips to 1;
    # terms (y - f) w = 0.1, -0.1, 0.8
    sample = _sample("active", [0, 1, 2], [0.2, 0.4, 0.1], [0.9, 0.2, 0.6], 5, with_replacement=True,
                     moments={"mean_c": 0.6, "mean_c2": 0.4, "s0": 2.0, "s1": 0.3, "s2": 0.25})
    result = get_design("active").estimate(sample, np.array([1, 0, 1]))
    terms = np.array([0.1, -0.1, 0.8])
    assert result.lam == 1.0
    assert result.estimate == pytest.approx(0.6 + terms.mean())
    assert result.standard_error == pytest.approx(math.sqrt(terms.var(ddof=1) / 3))


def test_power_tuning_and_the_floor_of_an_all_correct_sample():
    assert _tuned_lambda(np.array([1.0, 0, 1, 0]), np.array([1.0, 0, 1, 1])) == pytest.approx(2 / 3)
    # all labels right: the sample variance is 0, the floor (confidence 0.9 anticipates 0.09) keeps a width
    sample = _sample("ppi", [0, 1, 2, 3], [0.04] * 4, [0.9] * 4, 100, moments={"mean_c": 0.9, "mean_c2": 0.81})
    result = get_design("ppi").estimate(sample, np.ones(4))
    assert result.standard_error == pytest.approx(math.sqrt(0.96 * 0.09 / 4))
    assert result.low < 0.9 < result.high


def test_neyman_counts_follow_size_times_spread_with_floors_and_caps():
    assert neyman_counts(np.array([100, 100]), np.array([0.1, 0.3]), 40).tolist() == [10, 30]
    assert neyman_counts(np.array([100, 100, 5]), np.array([0.01, 0.5, 0.5]), 20).tolist() == [2, 16, 2]
    assert neyman_counts(np.array([3, 100, 5]), np.array([0.9, 0.01, 0.5]), 20).tolist() == [3, 12, 5]


def test_draws_have_their_stated_probabilities():
    pool = PoolScores(np.linspace(0.5, 1.0, 100), np.linspace(1.0, 0.0, 100))
    importance = get_design("importance", uniform_share=0.5)
    q = importance.probabilities(pool)
    assert q.sum() == pytest.approx(1.0)
    assert q.min() == pytest.approx(0.5 / 100)  # the uniform share bounds every weight 1/(N q) by 2
    sample = importance.draw(pool, 30, np.random.default_rng(0))
    assert np.allclose(sample.probability, q[sample.positions])
    srs = get_design("srs").draw(pool, 30, np.random.default_rng(0))
    assert len(set(srs.positions.tolist())) == 30 and np.allclose(srs.probability, 0.3)
    strat = get_design("stratified", strata=4).draw(pool, 20, np.random.default_rng(0))
    assert len(set(strat.positions.tolist())) == 20
    assert sorted(np.unique(strat.strata).tolist()) == [0, 1, 2, 3]


def test_srs_labels_for_a_width_is_the_smallest_exact_interval_that_fits():
    width = clopper_pearson(90, 100).high - clopper_pearson(90, 100).low
    assert srs_labels_for_width(width, 0.9) == 100
    assert srs_labels_for_width(0.0, 0.9) is None


def test_bad_design_options_are_one_line_errors():
    with pytest.raises(DltestError, match="unknown design 'cem'"):
        get_design("cem")
    with pytest.raises(DltestError, match="does not take 'strata'"):
        get_design("srs", strata=3)
    with pytest.raises(DltestError, match="uniform share must be in"):
        get_design("active", uniform_share=0)


# --- coverage on a synthetic pool of known accuracy -----------------------------------------


@pytest.fixture(scope="module")
def synthetic_pool():
    """2000 inputs; the model is right with probability its confidence (mildly overconfident)."""
    rng = np.random.default_rng(7)
    confidence = 1 - 0.5 * rng.beta(0.6, 3.0, size=2000)
    right = (rng.random(2000) < confidence - 0.03).astype(float)
    entropy_like = 1 - confidence
    return PoolScores(confidence, entropy_like), right


@pytest.mark.parametrize("design", list(DESIGNS))
def test_coverage_and_bias_on_a_pool_of_known_accuracy(synthetic_pool, design):
    pool, right = synthetic_pool
    truth = right.mean()
    chosen = get_design(design)
    rng = np.random.default_rng(1)
    hits, estimates = [], []
    for _ in range(300):
        sample = chosen.draw(pool, 100, rng)
        result = chosen.estimate(sample, right[sample.positions])
        hits.append(result.low <= truth <= result.high)
        estimates.append(result.estimate)
    assert np.mean(hits) >= 0.9
    assert abs(np.mean(estimates) - truth) < 0.01  # unbiased up to the noise of 300 draws


# --- the command line on a small MNIST slice --------------------------------------------------


@pytest.fixture(scope="module")
def mnist_slice(tmp_path_factory):
    """400 holdout images as an unlabeled pool file, their labels beside it."""
    from dltest import load_dataset

    folder = tmp_path_factory.mktemp("estimate")
    data = load_dataset("mnist", "holdout")
    np.savez(folder / "pool.npz", x=data.x[:400, 0].numpy())
    np.savez(folder / "labeled.npz", x=data.x[:400, 0].numpy(), y=data.y[:400].numpy())
    return folder, data.y[:400].numpy()


def _model_path():
    from dltest.checkpoint import pretrained_path

    return str(pretrained_path("mnist"))


def _fill_sheet(sheet, labels, out):
    rows = list(csv.DictReader(open(sheet)))
    with open(out, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["index", "source", "label"])
        for row in rows:
            writer.writerow([row["index"], row["source"], int(labels[int(row["index"])])])
    return rows


def test_plan_and_estimate_round_trip(mnist_slice):
    folder, labels = mnist_slice
    plan, sheet, filled, out = (folder / n for n in ("plan.json", "sheet.csv", "labels.csv", "estimate.json"))
    result = run_cli("estimate", "plan", "--budget", "40", "-d", str(folder / "pool.npz"), "-m",
                     _model_path(), "--design", "srs", "--seed", "3", "--out", str(plan),
                     "--csv", str(sheet))
    assert result.exit_code == 0, result.output
    drawn = json.loads(plan.read_text())
    assert list(drawn)[:3] == ["command", "dltest_version", "seed"] and drawn["seed"] == 3
    rows = _fill_sheet(sheet, labels, filled)
    assert len(rows) == 40 and {float(r["inclusion_probability"]) for r in rows} == {0.1}
    result = run_cli("estimate", "--plan", str(plan), "--labels", str(filled), "--out", str(out))
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    accuracy = report["figures"][0]
    right = sum(int(labels[p]) == c for p, c in zip(drawn["positions"], drawn["predicted"]))
    assert accuracy["figure"] == "accuracy" and accuracy["estimate"] == right / 40  # SRS: k / n
    exact = clopper_pearson(right, 40)
    assert (accuracy["low"], accuracy["high"]) == pytest.approx((exact.low, exact.high))
    assert accuracy["labeled"] == 40 and report["design"] == "srs"
    assert report["valid"] is True and report["invalid_reason"] is None and report["validity"] == "exact"


def test_estimate_with_attacks_and_pool_labels(mnist_slice):
    folder, _ = mnist_slice
    plan, out = folder / "plan-active.json", folder / "estimate-active.json"
    result = run_cli("estimate", "plan", "--budget", "20", "-d", str(folder / "pool.npz"), "-m",
                     _model_path(), "--design", "active", "--out", str(plan))
    assert result.exit_code == 0, result.output
    result = run_cli("estimate", "--plan", str(plan), "--labels", "pool", "-d",
                     str(folder / "labeled.npz"), "-m", _model_path(), "--attacks", "fgsm",
                     "--out", str(out))
    assert result.exit_code == 0, result.output
    assert "interval not valid: active needs at least 100 draws" in " ".join(result.output.split())
    report = json.loads(out.read_text())
    assert report["valid"] is False and report["validity"] == "asymptotic"
    assert report["invalid_reason"].startswith("active needs at least 100 draws for a valid interval (got 20)")
    assert any(n.startswith("interval will not be valid") for n in json.loads(plan.read_text())["notes"])
    gate_out = folder / "gate-active.json"
    refused = run_cli("gate", "--estimate", str(out), "--min-accuracy", "0.5", "--out", str(gate_out))
    assert refused.exit_code == 2 and "interval is not valid" in refused.output and not gate_out.exists()
    figures = {f["figure"]: f for f in report["figures"]}
    assert set(figures) == {"accuracy", "fgsm"}
    assert figures["fgsm"]["estimate"] <= figures["accuracy"]["estimate"]
    assert figures["accuracy"]["labeled"] == len(set(json.loads(plan.read_text())["positions"]))


@pytest.mark.parametrize("args, message", [
    (["plan", "--design", "cem"], "unknown design 'cem'"),
    (["plan", "--design", "srs", "--score", "deepgini"], "--score applies to the importance design"),
    (["plan", "--design", "srs", "--strata", "3"], "does not take 'strata'"),
    (["plan", "--budget", "ten"], "neither a count"),
    ([], "give --plan"),
])
def test_bad_usage_exits_2_with_one_line(tmp_path, args, message):
    out = tmp_path / "out.json"
    result = run_cli("estimate", *args, "--out", str(out)) if args else run_cli("estimate")
    assert result.exit_code == 2
    assert message in result.output and len(result.output.strip().splitlines()) == 1
    assert not out.exists()


def test_missing_labels_and_a_file_that_is_no_plan_exit_2(mnist_slice, tmp_path):
    folder, labels = mnist_slice
    plan = folder / "plan.json"
    if not plan.exists():
        test_plan_and_estimate_round_trip(mnist_slice)
    partial = tmp_path / "partial.csv"
    partial.write_text("index,label\n" + f"{json.loads(plan.read_text())['positions'][0]},3\n")
    out = tmp_path / "e.json"
    result = run_cli("estimate", "--plan", str(plan), "--labels", str(partial), "--out", str(out))
    assert result.exit_code == 2 and "has no label for 39 of the 40 inputs" in result.output and not out.exists()
    bogus = tmp_path / "bogus.json"
    bogus.write_text('{"command": "dltest select"}')
    result = run_cli("estimate", "--plan", str(bogus), "--labels", str(partial), "--out", str(out))
    assert result.exit_code == 2 and "is not a plan" in result.output


# --- dltest gate --estimate ---------------------------------------------------------------------


def _estimate_file(tmp_path, low=0.93, estimate=0.96, high=0.98):
    path = tmp_path / "estimate.json"
    path.write_text(json.dumps({
        "command": "dltest estimate", "dltest_version": "0", "seed": 0, "design": "active", "interval": "x",
        "dataset": "mnist", "figures": [
            {"figure": "accuracy", "estimate": estimate, "low": low, "high": high, "confidence": 0.95},
            {"figure": "pgd", "estimate": 0.6, "low": 0.5, "high": 0.7, "confidence": 0.95}]}))
    return path


def test_gate_decides_on_the_intervals_lower_end(tmp_path):
    path, out = _estimate_file(tmp_path), tmp_path / "gate.json"
    passed = run_cli("gate", "--estimate", str(path), "--min-accuracy", "0.93", "--out", str(out))
    assert passed.exit_code == 0, passed.output
    report = json.loads(out.read_text())
    assert report["passed"] and report["bars"][0]["low"] == 0.93
    failed = run_cli("gate", "--estimate", str(path), "--min-accuracy", "0.95", "--min-robust",
                     "pgd=0.4", "--out", str(out))
    assert failed.exit_code == 1  # the estimate 0.96 is above 0.95, its lower end 0.93 is not
    bars = {b["figure"]: b["passed"] for b in json.loads(out.read_text())["bars"]}
    assert bars == {"accuracy": False, "pgd": True}


@pytest.mark.parametrize("args, message", [
    (["--min-accuracy", "0.9", "--confidence", "0.9"], "at 95% confidence"),
    (["--min-robust", "square=0.5"], "has no figure 'square'"),
    (["--max-drop", "0.01", "--baseline", "gate.json"], "minimums only"),
])
def test_gate_estimate_mismatches_exit_2(tmp_path, args, message):
    path = _estimate_file(tmp_path)
    (tmp_path / "gate.json").write_text("{}")
    out = tmp_path / "g.json"
    result = run_cli("gate", "--estimate", str(path), *args, "--out", str(out))
    assert result.exit_code == 2 and message in result.output, result.output
    assert not out.exists()


def test_labels_by_index_or_class_name_from_csv_and_npz(tmp_path):
    from types import SimpleNamespace

    from dltest.estimation import labels_for, read_label_file

    plan = SimpleNamespace(labels_needed=[4, 1], pool_size=6, classes=["cat", "dog", "7"])
    sheet = tmp_path / "labels.csv"
    sheet.write_text("index,source,label\n1,11,dog\n4,14,2\n")
    assert labels_for(plan, read_label_file(sheet)).tolist() == [2, 1]  # in the plan's order
    np.savez(tmp_path / "pairs.npz", index=np.array([1, 4]), label=np.array([0, 1]))
    assert labels_for(plan, read_label_file(tmp_path / "pairs.npz")).tolist() == [1, 0]
    np.savez(tmp_path / "all.npz", y=np.array([0, 1, 2, 0, 2, 1]))
    assert labels_for(plan, read_label_file(tmp_path / "all.npz")).tolist() == [2, 1]
    sheet.write_text("index,label\n1,bird\n4,0\n")
    with pytest.raises(DltestError, match="label 'bird' of index 1 is neither a class index nor a class name"):
        labels_for(plan, read_label_file(sheet))
    sheet.write_text("index,label\n1,0\n1,1\n")
    with pytest.raises(DltestError, match="index 1 appears twice"):
        read_label_file(sheet)


def test_gate_refuses_a_file_that_is_no_estimate(tmp_path):
    path, out = tmp_path / "plan.json", tmp_path / "g.json"
    path.write_text('{"command": "dltest estimate plan", "figures": []}')
    result = run_cli("gate", "--estimate", str(path), "--min-accuracy", "0.9", "--out", str(out))
    assert result.exit_code == 2 and "is not an estimate written by 'dltest estimate --out'" in result.output
    assert not out.exists()


def test_a_robust_figure_drops_the_confidence_floor_once_both_outcomes_show():
    from dltest.estimation.estimating import estimate_outcome, survival_share

    design = get_design("ppi")
    confidence = np.full(20, 0.95)
    sample = _sample("ppi", list(range(20)), [0.2] * 20, confidence, 100, moments={"mean_c": 0.95, "mean_c2": 0.9025})
    clean = np.ones(20)
    many = np.array([1.0] * 14 + [0.0] * 6)  # 6 non-robust: the sample's variance alone
    result = estimate_outcome(design, sample, many, clean, False, 0.95)
    residual = many - result.lam * confidence
    assert result.standard_error == pytest.approx(math.sqrt((1 - 20 / 100) * residual.var(ddof=1) / 20))
    few = np.array([1.0] * 18 + [0.0] * 2)  # 2 non-robust: the floor at survival 0.9 x confidence
    assert survival_share(few, clean) == pytest.approx(0.9)
    floored = estimate_outcome(design, sample, few, clean, False, 0.95)
    assert floored.standard_error == pytest.approx(design.estimate(sample, few, 0.95, 0.9).standard_error)
    assert floored.standard_error > design.estimate(sample, few, 0.95, 0.9, floor=False).standard_error


# --- the plan-time robust surrogate (issue 18) --------------------------------------------------


def _tiny_plan(design="ppi", budget=4, survived=None, seed=0):
    """A pool of 6 hand-made inputs (logits give confidences 0.9, 0.6, ...), planned with given flags."""
    import torch

    from dltest.data import ImageDataset
    from dltest.estimation import plan
    from dltest.inference import PoolOutputs

    confidence = torch.tensor([0.9, 0.6, 0.8, 0.7, 0.95, 0.5], dtype=torch.float64)
    # two classes: logit difference log(c / (1 - c)) gives top probability c for class 0
    logits = torch.stack([torch.log(confidence / (1 - confidence)), torch.zeros(6, dtype=torch.float64)], 1)
    data = ImageDataset("toy", "pool", torch.zeros(6, 1, 2, 2, dtype=torch.uint8), torch.full((6,), -1),
                        ["a", "b"], torch.arange(6), labeled=False)
    flags = survived if survived is not None else {"pgd": [1, 0, 1, 1, 0, 1]}
    return plan(None, data, design=design, budget=budget, seed=seed, outputs=PoolOutputs(logits.float()),
                survived=flags), confidence.numpy()


def test_the_robust_surrogate_is_confidence_times_survived():
    from dltest.estimation.designs import robust_surrogate

    assert robust_surrogate(np.array([0.9, 0.6, 0.8]), np.array([1, 0, 1])).tolist() == pytest.approx([0.9, 0.0, 0.8])
    drawn, confidence = _tiny_plan(survived={"pgd": [1, 0, 1, 1, 0, 1], "fgsm": [1, 1, 0, 1, 0, 1]})
    assert drawn.survived == {"pgd": "101101", "fgsm": "110101", "worst-case": "100101"}
    survived = np.array([1, 0, 0, 1, 0, 1])  # the worst case: survived both
    g, moments = drawn.surrogate("worst-case")
    positions = np.asarray(drawn.positions)
    assert g == pytest.approx(confidence[positions] * survived[positions], abs=1e-6)
    assert moments["mean_c"] == pytest.approx((confidence * survived).mean(), abs=1e-6)
    assert moments["mean_c2"] == pytest.approx((confidence**2 * survived).mean(), abs=1e-6)
    assert [row["attack"] for row in drawn.attacks] == ["pgd", "fgsm"]
    without, _ = _tiny_plan(survived={})
    assert without.surrogate("pgd") is None and without.attacks == [] and without.survived == {}


def test_plan_time_flags_leave_srs_and_ppi_draws_alone_and_move_active_towards_broken_predictions():
    _, confidence = _tiny_plan()
    for design in ("srs", "ppi", "stratified"):
        with_flags, _ = _tiny_plan(design, budget=4, seed=5)
        without, _ = _tiny_plan(design, budget=4, seed=5, survived={})
        assert with_flags.positions == without.positions
    pool = PoolScores(np.array([0.9, 0.9]), np.array([0.1, 0.1]), robust=np.array([0.9, 0.0]))
    q = get_design("active").probabilities(pool)
    # clean rule: equal; robust rule sqrt(r (1 - r)) with r = (f + g) / 2 = 0.9, 0.45: 0.3 vs 0.4975
    robust = np.array([0.3, math.sqrt(0.45 * 0.55)])
    expected = 0.5 * (0.5 * np.array([0.5, 0.5]) + 0.5 * robust / robust.sum()) + 0.5 / 2
    assert q == pytest.approx(expected)


def test_ppi_with_the_calibrated_surrogate_by_hand():
    # 8 draws (SRS from a pool of 100): f, survived, right, robust
    from dltest.estimation.estimating import estimate_outcome

    f = np.array([0.9, 0.8, 0.95, 0.7, 0.6, 0.9, 0.85, 0.5])
    survived = np.array([1, 1, 1, 1, 0, 0, 0, 0], float)
    right = np.array([1, 1, 1, 0, 1, 1, 1, 0], float)
    robust = np.array([1, 1, 1, 0, 0, 1, 0, 0], float)
    g = f * survived
    pool_f = {"mean_c": 0.8, "mean_c2": 0.68}
    pool_g = {"mean_c": 0.5, "mean_c2": 0.45}
    sample = _sample("ppi", list(range(8)), [0.08] * 8, f, 100, moments=pool_f)
    result = estimate_outcome(get_design("ppi"), sample, robust, right, False, 0.95, (g, pool_g))
    # a: right & survived = draws 0, 1, 2 (all robust) -> 1, kept at 1 - 1/6; b: right & broken = 4, 5, 6 -> 1/3
    a, b = 1 - 1 / 6, 1 / 3
    h = a * g + b * (f - g)
    pool_h = a * 0.5 + b * (0.8 - 0.5)
    lam = float(np.clip(np.cov(robust, h, ddof=1)[0, 1] / np.var(h, ddof=1), 0, 1))
    residual = robust - lam * h
    assert result.lam == pytest.approx(lam)
    assert result.estimate == pytest.approx(lam * pool_h + residual.mean())
    # both outcomes show fewer than 5 times: the floor applies, anticipated from h (survival 1)
    pool_h2 = a * a * 0.45 + b * b * (0.68 - 0.45)
    anticipated = pool_h - (2 * lam - lam**2) * pool_h2 - ((1 - lam) * pool_h) ** 2
    variance = (1 - 8 / 100) * max(residual.var(ddof=1), anticipated) / 8
    assert result.standard_error == pytest.approx(math.sqrt(variance))


@pytest.fixture(scope="module")
def synthetic_robust_pool():
    """3000 inputs: right with probability f; the prediction survived a plan-time attack for 70%
    (more often where f is high); robust at estimate time: 96% of the right survivors and 20% of
    the right broken ones (a rerun spares some), never a wrong one."""
    rng = np.random.default_rng(11)
    confidence = 1 - 0.6 * rng.beta(0.7, 2.5, size=3000)
    right = rng.random(3000) < confidence - 0.02
    survived = rng.random(3000) < 0.3 + 0.5 * confidence
    robust = right & np.where(survived, rng.random(3000) < 0.96, rng.random(3000) < 0.2)
    return confidence, right.astype(float), survived.astype(float), robust.astype(float)


@pytest.mark.slow
@pytest.mark.parametrize("design", list(DESIGNS))
def test_coverage_with_the_plan_time_surrogate_on_a_pool_of_known_robust_accuracy(synthetic_robust_pool, design):
    from dltest.estimation.designs import robust_surrogate
    from dltest.estimation.estimating import estimate_outcome

    confidence, right, survived, robust = synthetic_robust_pool
    g = robust_surrogate(confidence, survived)
    pool = PoolScores(confidence, 1 - confidence, robust=g)
    chosen = get_design(design)
    budget = max(chosen.min_budget, 100)
    moments = chosen.prediction_moments(pool, g, budget)
    truth = robust.mean()
    rng = np.random.default_rng(2)
    hits, estimates = [], []
    for _ in range(1000):
        sample = chosen.draw(pool, budget, rng)
        at = sample.positions
        result = estimate_outcome(chosen, sample, robust[at], right[at], False, 0.95, (g[at], moments))
        hits.append(result.low <= truth <= result.high)
        estimates.append(result.estimate)
    assert np.mean(hits) >= 0.94
    assert abs(np.mean(estimates) - truth) < 0.005  # unbiased up to the noise of 1000 draws


def test_cli_plan_time_attacks_round_trip_on_an_mnist_slice(mnist_slice):
    import torch

    from dltest import load_dataset, load_model
    from dltest.checkpoint import pretrained_path
    from dltest.robustness import evaluate_robustness

    folder, _ = mnist_slice
    robust_model = str(pretrained_path("mnist", robust=True))
    plan, out = folder / "plan-attacked.json", folder / "estimate-attacked.json"
    result = run_cli("estimate", "plan", "--budget", "100", "-d", str(folder / "labeled.npz"), "-m", robust_model,
                     "--design", "active", "--attacks", "fgsm", "--eps", "0.3", "--out", str(plan))
    assert result.exit_code == 0, result.output
    assert "plan-time attacks fgsm ran over all 400 pool inputs with the predicted labels" in " ".join(result.output.split())
    drawn = json.loads(plan.read_text())
    assert [row["attack"] for row in drawn["attacks"]] == ["fgsm"] and drawn["attacks"][0]["settings"]["eps"] == 0.3
    # FGSM has no random start: one run by default (a second would agree), 0/1 flags
    assert drawn["attack_restarts"] == 1 and "restarts" not in drawn["attacks"][0]
    assert len(drawn["survived"]["fgsm"]) == 400 and set(drawn["survived"]["fgsm"]) == {"0", "1"}
    assert set(drawn["surrogate_moments"]["fgsm"]) == {"mean_c", "mean_c2", "s0", "s1", "s2"}
    result = run_cli("estimate", "--plan", str(plan), "--labels", "pool", "-d", str(folder / "labeled.npz"),
                     "-m", robust_model, "--attacks", "fgsm", "--out", str(out))
    assert result.exit_code == 0, result.output
    figures = {f["figure"]: f for f in json.loads(out.read_text())["figures"]}
    assert figures["fgsm"]["surrogate"] == "confidence x survived fgsm"
    assert figures["accuracy"]["surrogate"] == "confidence"
    # a and b rest on the right draws that survived / did not survive the plan-time attack
    labels = np.load(folder / "labeled.npz")["y"]
    right = np.asarray(drawn["predicted"]) == labels[drawn["positions"]]
    survived = np.asarray([drawn["survived"]["fgsm"][p] == "1" for p in drawn["positions"]])
    fgsm = figures["fgsm"]
    assert (fgsm["surrogate_a_draws"], fgsm["surrogate_b_draws"]) == (int((right & survived).sum()),
                                                                       int((right & ~survived).sum()))
    assert 0 < fgsm["surrogate_a"] < 1 and 0 < fgsm["surrogate_b"] < 1
    assert figures["accuracy"]["surrogate_a"] is None
    assert (f"fgsm: surrogate h = a g + b (f - g) with a = {fgsm['surrogate_a']:.3f} (on "
            f"{fgsm['surrogate_a_draws']:g} right draws that survived at plan time), b = {fgsm['surrogate_b']:.3f} (on "
            f"{fgsm['surrogate_b_draws']:g} right draws broken at plan time)") in " ".join(result.output.split())
    # the truth, independently: FGSM (no random start) on all 400 inputs with their true labels
    pool = load_dataset("mnist", "holdout").subset(list(range(400)))
    model, _ = load_model(robust_model)
    truth = evaluate_robustness(model, pool, ["fgsm"], seed=0).attacks[0].robust_accuracy
    assert figures["fgsm"]["low"] <= truth <= figures["fgsm"]["high"]
    assert 0.5 < truth < 1.0  # something to estimate
    assert torch.equal(pool.y, torch.as_tensor(np.load(folder / "labeled.npz")["y"]))


@pytest.mark.parametrize("args, message", [
    (["--attacks", "pgd"], "the plan's surrogate comes from the plan-time attacks fgsm"),
    (["--attacks", "fgsm", "--eps", "0.1"], "attacked with the plan-time settings"),
])
def test_estimate_refuses_attacks_other_than_the_plans(mnist_slice, args, message):
    folder, _ = mnist_slice
    plan = folder / "plan-attacked.json"
    if not plan.exists():
        test_cli_plan_time_attacks_round_trip_on_an_mnist_slice(mnist_slice)
    out = folder / "refused.json"
    result = run_cli("estimate", "--plan", str(plan), "--labels", "pool", "-d", str(folder / "labeled.npz"), *args,
                     "--out", str(out))
    assert result.exit_code == 2 and message in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1 and not out.exists()
