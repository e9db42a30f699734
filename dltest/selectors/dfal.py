"""DFAL: DeepFool active learning (Ducoffe & Precioso 2018; SPEC §1, "DFAL").

Inputs whose predicted label flips under the smallest L2 perturbation lie nearest the decision
boundary. DFAL draws a seeded random candidate subset of size min(candidate_factor * b, n), runs
DeepFool (L2, overshoot 0.02, at most 50 iterations) on it, and selects the b candidates with the
smallest perturbation norms (ties to the lower pool position). Candidates that never flip rank
last (norm +inf). The adversarial examples are discarded.

The batched DeepFool itself, :func:`~dltest.attacks.kernels.deepfool_l2`, lives with the attack
kernels; its docstring says how it crosses the boundary.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from dltest.attacks.kernels import deepfool_l2
from dltest.errors import DltestError
from dltest.progress import progress_bar
from dltest.runtime import on_device
from dltest.selectors.base import Candidates, ScoreSelector, register

BATCH_SIZE = 256


@register
class DFAL(ScoreSelector):
    name = "dfal"
    summary = "DFAL: smallest DeepFool (L2) perturbation first, on a seeded random candidate subset"
    score_name = "DeepFool L2 norm"
    needs_model = True
    highest = False

    def __init__(self, candidate_factor: float = 10, overshoot: float = 0.02, steps: int = 50):
        if not float(candidate_factor) >= 1:
            raise DltestError(f"candidate_factor must be >= 1, not {candidate_factor}")
        if not float(overshoot) >= 0:
            raise DltestError(f"overshoot must be >= 0, not {overshoot}")
        if int(steps) != steps or steps < 1:
            raise DltestError(f"steps must be a whole number >= 1, not {steps}")
        self.candidate_factor = candidate_factor
        self.overshoot = float(overshoot)
        self.steps = int(steps)

    def candidates(self, n: int, budget: int, generator: torch.Generator) -> Tensor:
        """The seeded random candidate subset, min(candidate_factor * budget, n) positions, sorted."""
        m = min(max(budget, math.ceil(self.candidate_factor * budget)), n)
        return torch.randperm(n, generator=generator)[:m].sort().values

    def scored(self, candidates: Candidates, budget: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """(the seeded candidate subset, the DeepFool norm of each)."""
        if candidates.model is None or candidates.data is None:
            raise DltestError("dfal needs the model and the pool's images")
        drawn = self.candidates(len(candidates), budget, generator)
        model = candidates.model
        parts = []
        with on_device(model, candidates.device), \
                progress_bar("dfal (DeepFool)", total=len(drawn), enabled=candidates.progress) as advance:
            for s in range(0, len(drawn), BATCH_SIZE):
                images = candidates.data.images(drawn[s : s + BATCH_SIZE], candidates.device)
                parts.append(deepfool_l2(model, images, overshoot=self.overshoot, steps=self.steps).norms)
                advance(len(images))
        return drawn, torch.cat(parts)
