"""What a selector is: a small object that picks ``budget`` distinct pool positions, in order.

Selectors are configured like torchattacks' attacks, options in the constructor
(``BALD(samples=10)``), and called on a :class:`Candidates`: ``selector(candidates, budget, generator)``.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, replace
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
    ``reference`` is the data the model was trained on, for the selectors that compare with it
    (surprise adequacy).
    """

    outputs: PoolOutputs
    model: nn.Module | None = None
    data: ImageDataset | None = None
    labeled_embeddings: Tensor | None = None
    device: torch.device = torch.device("cpu")
    progress: bool = False  # draw progress bars for the selectors that run the model again
    reference: ImageDataset | None = None

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
    needs_reference: ClassVar[bool] = False  # compares with reference (training) inputs
    needs_embeddings: ClassVar[bool] = False  # works on the penultimate embeddings
    needs_mc_samples: ClassVar[bool] = False  # draws MC-dropout predictions

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

    @property
    def label(self) -> str:
        """The name reports give this selector: its ``name`` (a sampled one adds its sampling)."""
        return self.name


@dataclass
class ProbabilityOutputs(PoolOutputs):
    """Pool outputs given as probabilities (``select(outputs=probs)``), which the scores use as given,
    in float64. A softmax of their float32 logarithm is not the same numbers (lc of
    [0.5, 0.25, 0.25, 0] came out 0.49999999952), and mathematically tied rows then broke their
    ties by rounding instead of by position."""

    given: Tensor | None = None

    @classmethod
    def of(cls, probs: Tensor) -> "ProbabilityOutputs":
        """Outputs of ``probs`` (n, C): float32 probabilities and their log as any outputs, plus the
        given values in float64."""
        base = PoolOutputs.from_probs(probs)
        given = torch.as_tensor(probs).detach().to("cpu", torch.float64)
        return cls(logits=base.logits, embeddings=base.embeddings, _probs=base._probs, given=given)

    def subset(self, positions: Tensor) -> "ProbabilityOutputs":
        assert self.given is not None
        return replace(self, logits=self.logits[positions], _probs=self.probs[positions], given=self.given[positions],
                       embeddings=self.embeddings[positions] if self.embeddings is not None else None)


def float64_probs(outputs: PoolOutputs) -> Tensor:
    """Probabilities (n, C) in float64, for scores that rank: the given ones for
    :class:`ProbabilityOutputs`, else the softmax of the logits computed in float64.

    In float32, scores of confident inputs collapse onto few values (on 10k MNIST test inputs:
    2,444 distinct DeepGini or margin scores in float32, 7,453 in float64), so a selection beyond
    ~10% of the pool would depend on rounding rather than on the model.
    """
    if isinstance(outputs, ProbabilityOutputs) and outputs.given is not None:
        return outputs.given
    return torch.softmax(outputs.logits.double(), dim=1)


def ordered_sum(x: Tensor, dim: int = -1) -> Tensor:
    """Sum along ``dim`` by pairwise halving with elementwise additions only.

    A reduction kernel (or a matrix product) may group its terms differently depending on the
    tensor's shape, its memory layout, the thread count or the CPU's vector width; elementwise
    additions are exact IEEE operations on each element, so this sum gives every element the same
    bits however many other elements share the tensor.
    """
    x = x.movedim(dim, -1)
    while x.shape[-1] > 1:
        if x.shape[-1] % 2:
            x = torch.cat([x, torch.zeros_like(x[..., :1])], dim=-1)
        x = x[..., 0::2] + x[..., 1::2]
    return x[..., 0]


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
    """A selector that scores candidates and takes the best ``budget`` of them.

    :meth:`scored` gives the positions it scored (all candidates, or a subset such as DFAL's) and
    their scores; that is what lets ``sampling`` (:class:`~dltest.selectors.sampling.SampledSelector`)
    work on any of them.
    """

    highest: ClassVar[bool] = True

    def score(self, candidates: Candidates) -> Tensor:
        raise NotImplementedError

    def scored(self, candidates: Candidates, budget: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """(positions, scores) of the candidates this selector scores, by default all of them."""
        return torch.arange(len(candidates)), self.score(candidates)

    def __call__(self, candidates: Candidates, budget: int, generator: torch.Generator) -> Selection:
        positions, scores = self.scored(candidates, budget, generator)
        order = rank(scores, budget, self.highest)
        return Selection(positions[order], scores[order])
