"""Uniform random sampling: the baseline every other selector must beat."""

from __future__ import annotations

import torch

from dltest.selectors.base import Candidates, Selection, Selector, register


@register
class Random(Selector):
    name = "random"
    summary = "Uniform random sample without replacement (seeded)"

    def __call__(self, candidates: Candidates, budget: int, generator: torch.Generator) -> Selection:
        return Selection(torch.randperm(len(candidates), generator=generator)[:budget])
