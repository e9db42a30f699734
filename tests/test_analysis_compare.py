"""Pearson per stage and Wilcoxon comparisons on hand-made records with known answers."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from dltest.analysis.compare import (
    bias_robustness_correlations, compare_functions, paired_robustness, pearson, stage_means, wilcoxon_test,
)
from dltest.errors import DltestError


def record(metric, seed, stage, robust, bias=None, clean=0.9):
    return {"metric": metric, "seed": seed, "stage": stage, "labeled": 200 * (stage + 1), "selected": [],
            "clean_accuracy": clean, "robust_accuracy": robust, "bias": bias, "seconds": {}}


def test_pearson_known_answers():
    assert pearson([1, 2, 3, 4], [2, 4, 6, 8])[0] == pytest.approx(1.0)
    assert pearson([1, 2, 3, 4], [0.9, 0.7, 0.5, 0.3])[0] == pytest.approx(-1.0)
    r, p = pearson([1, 2, 3, 5], [1, 3, 2, 4])
    assert (r, p) == pytest.approx(tuple(stats.pearsonr([1, 2, 3, 5], [1, 3, 2, 4])))
    assert pearson([1, 2, 3], [5, 5, 5]) == (None, None)  # constant: r is undefined
    assert pearson([1, 2], [1, 2]) == (None, None)  # two points are always +-1


def test_correlations_per_stage_average_seeds_first():
    # robustness = 0.8 - 0.5 * entropy bias for every function at stage 1 (r = -1), and rising with
    # the gini bias at stage 2 (r = +1); seed 1 differs from seed 0 but the means keep the relation.
    records = []
    for i, metric in enumerate(["random", "dre", "entropy", "deepgini"]):
        d = 0.1 * i
        for seed, shift in ((0, -0.01), (1, 0.01)):
            records.append(record(metric, seed, 0, {"pgd": 0.3}))  # stage 0: no bias, left out
            records.append(record(metric, seed, 1, {"pgd": 0.8 - 0.5 * d + shift},
                                  {"entropy": d + shift, "gini": (i % 2) * 0.2, "label": 0.05}))
            records.append(record(metric, seed, 2, {"pgd": 0.2 + 0.3 * d}, {"entropy": 0.5, "gini": d}))
    means = stage_means(records)
    assert sorted(means) == [1, 2]
    assert means[1]["entropy"]["bias"]["entropy"] == pytest.approx(0.2)
    assert means[1]["entropy"]["seeds"] == 2
    cells = {(c.stage, c.characteristic): c for c in bias_robustness_correlations(records)}
    assert cells[(1, "entropy")].r == pytest.approx(-1.0)
    assert cells[(1, "entropy")].functions == ["deepgini", "dre", "entropy", "random"]
    assert cells[(2, "gini")].r == pytest.approx(1.0)
    assert cells[(1, "label")].r is None  # the same label bias for every function
    assert cells[(2, "entropy")].r is None
    assert (2, "label") not in cells  # no function has a label bias at stage 2
    gini1 = cells[(1, "gini")]
    x = [0.0, 0.2, 0.0, 0.2]  # random, dre, entropy, deepgini
    y = [0.8, 0.75, 0.7, 0.65]
    order = ["random", "dre", "entropy", "deepgini"]
    by_name = dict(zip(order, zip(x, y)))
    expected = stats.pearsonr([by_name[m][0] for m in gini1.functions], [by_name[m][1] for m in gini1.functions])
    assert gini1.r == pytest.approx(expected.statistic) and gini1.p_value == pytest.approx(expected.pvalue)


def test_correlations_refuse_unknown_attacks_and_runs_without_bias():
    records = [record("dre", 0, 1, {"pgd": 0.5}, {"entropy": 0.1})]
    with pytest.raises(DltestError, match="autoattack"):
        bias_robustness_correlations(records, ["autoattack"])
    with pytest.raises(DltestError, match="no selection stage with a bias"):
        bias_robustness_correlations([record("dre", 0, 0, {"pgd": 0.5})])


@pytest.mark.slow
def test_wilcoxon_matches_scipy_directly():
    a = [0.61, 0.64, 0.58, 0.70, 0.66, 0.69, 0.72, 0.63, 0.67, 0.71]
    b = [0.55, 0.60, 0.59, 0.62, 0.61, 0.63, 0.65, 0.58, 0.60, 0.64]
    result = wilcoxon_test(a, b, alpha=0.05, names=("dre", "deepgini"))
    expected = stats.wilcoxon(a, b)
    assert result.statistic == pytest.approx(expected.statistic)
    assert result.p_value == pytest.approx(expected.pvalue)
    assert result.pairs == 10 and result.significant
    assert result.median_difference == pytest.approx(float(np.median(np.subtract(a, b))))
    assert result.verdict.startswith("dre is more robust than deepgini")
    # the same samples the other way round: same p, the verdict names the same winner
    swapped = wilcoxon_test(b, a, names=("deepgini", "dre"))
    assert swapped.p_value == pytest.approx(result.p_value)
    assert swapped.verdict.startswith("dre is more robust than deepgini")
    # a stricter level than the p-value: no verdict of difference
    strict = wilcoxon_test(a, b, alpha=result.p_value / 2, names=("dre", "deepgini"))
    assert not strict.significant and strict.verdict.startswith("no significant difference")


def test_wilcoxon_edge_cases():
    equal = wilcoxon_test([0.5, 0.6, 0.7], [0.5, 0.6, 0.7])
    assert equal.p_value == 1.0 and not equal.significant and equal.note == "every pair is equal"
    few = wilcoxon_test([1, 2, 3, 4, 5], [0, 0, 0, 0, 0])  # exact two-sided p >= 2/2^5 = 0.0625
    assert few.p_value == pytest.approx(0.0625) and not few.significant
    assert "cannot reach" in few.note
    with pytest.raises(DltestError, match="alpha"):
        wilcoxon_test([1, 2], [2, 1], alpha=1.5)
    with pytest.raises(DltestError, match="one length"):
        wilcoxon_test([1, 2], [2])


def test_pairs_are_seed_stage_attack_and_skip_the_shared_initial_model():
    records = []
    for seed in (0, 1):
        for metric, level in (("dre", 0.6), ("random", 0.5)):
            records.append(record(metric, seed, 0, {"pgd": 0.1, "square": 0.2}))
            for stage in (1, 2):
                records.append(record(metric, seed, stage, {"pgd": level + 0.01 * stage, "square": level + seed * 0.02}))
    records.append(record("dre", 0, 3, {"pgd": 0.9}))  # random has no stage 3: unpaired
    keys, a, b = paired_robustness(records, "dre", "random")
    assert keys == [(s, st, atk) for s in (0, 1) for st in (1, 2) for atk in ("pgd", "square")]
    assert all(x - y == pytest.approx(0.1) for x, y in zip(a, b))
    keys, _, _ = paired_robustness(records, "dre", "random", attacks=["square"])
    assert len(keys) == 4
    [comparison] = compare_functions(records, ["dre", "random"])
    assert comparison.pairs == 8 and comparison.significant  # 8 positive differences: p = 2/2^8
    assert comparison.p_value == pytest.approx(stats.wilcoxon(*paired_robustness(records, "dre", "random")[1:]).pvalue)
    with pytest.raises(DltestError, match="not in the runs"):
        compare_functions(records, ["dre", "mcp"])
    with pytest.raises(DltestError, match="at least two"):
        compare_functions(records, ["dre"])


@pytest.mark.slow
def test_accuracy_figure_averages_the_seeds(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from dltest.analysis import plots

    drawn = {}

    def record_lines(fig, plt, path):  # capture what was drawn instead of saving
        for ax in fig.axes:
            drawn[ax.get_title()] = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata()))
                                     for line in ax.get_lines()}
        plt.close(fig)
        return path

    monkeypatch.setattr(plots, "_save", record_lines)
    records = [{"metric": "dre", "seed": seed, "stage": stage, "labeled": 200 + 100 * stage,
                "clean_accuracy": clean, "robust_accuracy": {"pgd": robust}}
               for seed, stage, clean, robust in [(0, 0, 0.8, 0.0), (1, 0, 0.6, 0.2), (0, 1, 0.9, 0.5), (1, 1, 0.7, 0.3)]]
    plots.accuracy_by_stage(records, tmp_path / "a.png")
    assert drawn["clean accuracy"]["dre"][0] == [200, 300]
    assert drawn["clean accuracy"]["dre"][1] == pytest.approx([70.0, 80.0])
    assert drawn["robust accuracy (pgd)"]["dre"][1] == pytest.approx([10.0, 40.0])
