"""Which inputs of a pool have been labeled, and with which labels (active learning's growing set).

A :class:`LabeledPool` over a pool of ``size`` inputs starts with nothing labeled; ``label``
records positions (0-based indices into the pool) with their labels, each position at most once.
``labeled()`` and ``unlabeled()`` are sorted and together hold every position exactly once. Its
``state_dict()`` holds only an int and two tensors, so it saves and loads with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import numbers
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from dltest.errors import DltestError

STATE_KEYS = ("size", "labeled", "labels")


class LabeledPool:
    """The labeled mask over a pool of ``size`` inputs and the labels of the labeled ones."""

    def __init__(self, size: int) -> None:
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise DltestError(f"a labeled pool's size must be an integer >= 0, got {size!r}")
        self._mask = torch.zeros(size, dtype=torch.bool)
        self._labels = torch.zeros(size, dtype=torch.long)  # meaningful where _mask is True

    @property
    def size(self) -> int:
        """Inputs in the pool, labeled or not."""
        return len(self._mask)

    @property
    def mask(self) -> Tensor:
        """A copy of the labeled mask: True at every labeled position."""
        return self._mask.clone()

    def __len__(self) -> int:
        """How many positions are labeled."""
        return int(self._mask.sum())

    def __repr__(self) -> str:
        return f"LabeledPool({len(self)} of {self.size} labeled)"

    def label(self, positions: Tensor | Sequence[int], labels: Tensor | Sequence[int]) -> None:
        """Record ``positions`` as labeled with ``labels`` (one each). Nothing changes when any is
        refused: a position outside the pool, given twice or labeled before, or a negative label."""
        positions = _integers(positions, "positions")
        labels = _integers(labels, "labels")
        if len(labels) != len(positions):
            raise DltestError(f"label got {len(positions)} positions but {len(labels)} labels; give one label each")
        outside = positions[(positions < 0) | (positions >= self.size)]
        if len(outside):
            raise DltestError(f"positions {outside[:5].tolist()} lie outside the pool of {self.size} "
                              f"(allowed: 0 to {self.size - 1})")
        if len(positions.unique()) != len(positions):
            values, counts = positions.unique(return_counts=True)
            raise DltestError(f"positions {values[counts > 1][:5].tolist()} are given more than once")
        again = positions[self._mask[positions]]
        if len(again):
            raise DltestError(f"positions {again[:5].tolist()} are labeled already; a position is labeled once")
        if len(labels) and int(labels.min()) < 0:
            raise DltestError(f"labels must be class indices >= 0, got {labels[labels < 0][:5].tolist()}")
        self._mask[positions] = True
        self._labels[positions] = labels

    def labeled(self) -> Tensor:
        """The labeled positions, sorted (int64)."""
        return torch.nonzero(self._mask).flatten()

    def unlabeled(self) -> Tensor:
        """The positions not labeled yet, sorted (int64): the complement of :meth:`labeled`."""
        return torch.nonzero(~self._mask).flatten()

    def labels(self) -> Tensor:
        """The labels of :meth:`labeled`'s positions, in that order."""
        return self._labels[self._mask].clone()

    def state_dict(self) -> dict[str, Any]:
        """``{"size": int, "labeled": positions, "labels": their labels}``: plain types and tensors only."""
        return {"size": self.size, "labeled": self.labeled(), "labels": self.labels()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Replace this pool by the one ``state`` (a :meth:`state_dict`) describes, checked first."""
        if not isinstance(state, Mapping) or set(state) != set(STATE_KEYS):
            keys = sorted(state) if isinstance(state, Mapping) else type(state).__name__
            raise DltestError(f"a labeled pool's state holds {', '.join(STATE_KEYS)}, got {keys}")
        loaded = LabeledPool(state["size"])
        for name in ("labeled", "labels"):
            value = state[name]
            if not isinstance(value, Tensor) or value.ndim != 1 or value.dtype != torch.long:
                raise DltestError(f"a labeled pool's {name!r} must be a 1-D int64 tensor, got "
                                  f"{getattr(value, 'dtype', type(value).__name__)}")
        loaded.label(state["labeled"], state["labels"])
        self._mask, self._labels = loaded._mask, loaded._labels

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> LabeledPool:
        """A pool rebuilt from a :meth:`state_dict`, checked."""
        pool = cls(0)
        pool.load_state_dict(state)
        return pool


def _integers(values: Tensor | Sequence[int], name: str) -> Tensor:
    """``values`` as a 1-D int64 tensor, or a one-line error when they are not whole numbers."""
    if isinstance(values, Tensor):
        tensor = values.detach().cpu()
        if tensor.dtype.is_floating_point or tensor.dtype.is_complex or tensor.dtype == torch.bool:
            raise DltestError(f"{name} must be integers, got a {tensor.dtype} tensor")
    else:
        items = list(values)
        wrong = [v for v in items if isinstance(v, bool) or not isinstance(v, numbers.Integral)]
        if wrong:
            raise DltestError(f"{name} must be integers, got {wrong[0]!r}")
        try:
            tensor = torch.tensor(items, dtype=torch.long)
        except (OverflowError, RuntimeError, ValueError):
            raise DltestError(f"{name} must fit in 64 bits, got {max(items, key=abs)}") from None
    if tensor.ndim != 1:
        raise DltestError(f"{name} must be one-dimensional, got shape {tuple(tensor.shape)}")
    return tensor.long()
