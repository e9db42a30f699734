"""What a selector is: a small object that picks ``budget`` distinct pool positions, in order.

Selectors are configured like torchattacks' attacks, options in the constructor
(``BALD(samples=10)``), and called on a :class:`Candidates`: ``selector(candidates, budget, generator)``.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from dltest.data import ImageDataset
from dltest.inference import PoolOutputs


@dataclass
class Candidates:
    """What a selector may look at: the cached outputs of the unlabeled candidates, and, for the
    selectors that must run the model again, the model and the images themselves.

    ``labeled_embeddings`` are the embeddings of inputs already labeled (core-set starts there).
    """

    outputs: PoolOutputs
    model: nn.Module | None = None
    data: ImageDataset | None = None
    labeled_embeddings: Tensor | None = None
    device: torch.device = torch.device("cpu")
    progress: bool = False  # draw progress bars for the selectors that run the model again

    def __len__(self) -> int:
        return len(self.outputs)


@dataclass
class Selection:
    """Positions among the candidates in selection order, and the score of each where the selector has one."""

    indices: Tensor
    scores: Tensor | None = None


class Selector:
    """Base class: subclasses set ``name`` and ``summary`` and implement ``__call__``."""

    name: ClassVar[str]
    summary: ClassVar[str]
    score_name: ClassVar[str | None] = None  # what ``Selection.scores`` holds, for reports
    needs_model: ClassVar[bool] = False  # runs the model again (beyond the cached outputs)

    def __call__(self, candidates: Candidates, budget: int, generator: torch.Generator) -> Selection:
        raise NotImplementedError

    @classmethod
    def option_defaults(cls) -> dict[str, Any]:
        """The constructor's options and their defaults, e.g. ``{"samples": 10}``."""
        params = inspect.signature(cls.__init__).parameters.values()
        return {p.name: p.default for p in params if p.name != "self" and p.default is not p.empty}

    def options(self) -> dict[str, Any]:
        """This instance's option values (written into every output JSON)."""
        return {name: getattr(self, name) for name in self.option_defaults()}


def float64_probs(outputs: PoolOutputs) -> Tensor:
    """Softmax probabilities (n, C) computed in float64 from the logits, for scores that rank.

    In float32, scores of confident inputs collapse onto few values (on 10k MNIST test inputs:
    2,444 distinct DeepGini or margin scores in float32, 7,453 in float64), so a selection beyond
    ~10% of the pool would depend on rounding rather than on the model.
    """
    return torch.softmax(outputs.logits.double(), dim=1)


REGISTRY: dict[str, type[Selector]] = {}


def register(cls: type[Selector]) -> type[Selector]:
    """Class decorator: make a selector available by its ``name``."""
    REGISTRY[cls.name] = cls
    return cls


def rank(scores: Tensor, budget: int, highest: bool = True) -> Tensor:
    """Positions of the ``budget`` best scores; ties go to the lower pool position."""
    values = scores.detach().double().cpu().numpy()
    key = -values if highest else values
    order = np.lexsort((np.arange(len(values)), key))[:budget]
    return torch.from_numpy(order.astype(np.int64))


class ScoreSelector(Selector):
    """A selector that scores every candidate and takes the best ``budget`` of them."""

    highest: ClassVar[bool] = True

    def score(self, candidates: Candidates) -> Tensor:
        raise NotImplementedError

    def __call__(self, candidates: Candidates, budget: int, generator: torch.Generator) -> Selection:
        scores = self.score(candidates)
        indices = rank(scores, budget, self.highest)
        return Selection(indices, scores[indices])
