"""Comparing two selections of the same pool made by two codes (an ONNX runtime and torch, an adapted
client model and the zoo model): their scores agree only to rounding, never bit for bit, so inputs
whose scores are that close may legitimately trade places."""

from __future__ import annotations

import math

import pytest


def assert_same_selection(got, expected, rel: float = 1e-4, abs: float = 1e-6, context: object = None) -> None:
    """Scores equal within tolerance place by place, and the same input in every place except where
    the two scores at that place are within tolerance of each other (a near-tie, which rounding may
    order either way). Selections without scores depend on no float and must be identical."""
    assert len(got.indices) == len(expected.indices), context
    if expected.scores is None or got.scores is None:
        assert got.indices == expected.indices, context
        return
    inf = float("inf")  # None: no finite score (coreset's random first center, a confident ats input)
    ours = [inf if v is None or (isinstance(v, float) and math.isnan(v)) else v for v in got.scores]
    theirs = [inf if v is None or (isinstance(v, float) and math.isnan(v)) else v for v in expected.scores]
    assert ours == pytest.approx(theirs, rel=rel, abs=abs), context
    differing = [k for k, (a, b) in enumerate(zip(got.indices, expected.indices)) if a != b]
    for k in differing:
        assert theirs[k] != inf, (context, k)  # a place decided by no score (a seeded draw) must agree
    assert len(differing) <= max(2, len(got.indices) // 10), (context, differing)  # a few near-ties, not another selection
