"""Operational testing: a model's accuracy (and robust accuracy) on an unlabeled pool from few
labels, with intervals.

    from dltest import load_dataset, load_model, plan, estimate
    pool = load_dataset("mnist", "holdout")
    model, _ = load_model(dataset="mnist")
    drawn = plan(model, pool, design="active", budget=200, seed=0)
    labels = {i: int(pool.y[i]) for i in drawn.labels_needed}   # a person labels these
    result = estimate(drawn, labels)
    result.figure("accuracy")   # estimate, low, high, effective sample size, SRS labels

designs.py holds the samplers and estimators, planning.py the draw, labels.py the labels,
estimating.py the estimate, gating.py the gate's decision on an estimate.
"""

from dltest.estimation.designs import DESIGNS, PoolScores, Result, Sample, get_design
from dltest.estimation.estimating import EstimateResult, FigureEstimate, estimate
from dltest.estimation.gating import decide_on_estimate, load_estimate
from dltest.estimation.labels import labels_for, read_label_file
from dltest.estimation.planning import SCORES, EstimationPlan, load_plan, plan, pool_scores

__all__ = [
    "DESIGNS", "SCORES", "EstimateResult", "EstimationPlan", "FigureEstimate", "PoolScores", "Result", "Sample",
    "decide_on_estimate", "estimate", "get_design", "labels_for", "load_estimate", "load_plan", "plan",
    "pool_scores", "read_label_file",
]
