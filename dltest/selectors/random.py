"""Uniform random sampling: the baseline every other selector must beat."""

from __future__ import annotations

import torch

from dltest.selectors.base import Pool, Selection, Selector, register


@register
class Random(Selector):
    name = "random"
    summary = "Uniform random sample without replacement (seeded)"

    def __call__(self, pool: Pool, budget: int, generator: torch.Generator) -> Selection:
        return Selection(torch.randperm(len(pool), generator=generator)[:budget])
