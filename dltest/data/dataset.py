"""The dataset: images in [0, 1] with labels, seeded sampling, batches, and its fingerprint."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
from torch import Tensor

from dltest.errors import DltestError


@dataclass
class ImageDataset:
    """Images ``x`` (N, C, H, W; uint8, or float in [0, 1]) with labels ``y`` (N,).

    ``source_index[i]`` is the position of row ``i`` in the file or torchvision split it came
    from (for ``val``/``holdout``: its position in the test set). A user file without labels
    has ``labeled=False`` (``y`` is all -1): enough to select from, not to evaluate or train.
    """

    name: str
    split: str
    x: Tensor
    y: Tensor
    classes: list[str]
    source_index: Tensor
    labeled: bool = True

    def __len__(self) -> int:
        return len(self.y)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.x.shape[1:])  # type: ignore[return-value]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def subset(self, positions: Tensor | list[int] | np.ndarray, split: str | None = None) -> "ImageDataset":
        """The rows at ``positions``, in that order."""
        positions = torch.as_tensor(positions, dtype=torch.long)
        return ImageDataset(
            self.name, split or self.split, self.x[positions], self.y[positions],
            self.classes, self.source_index[positions], self.labeled,
        )

    def sample_positions(self, n: int | None, seed: int) -> Tensor | None:
        """``n`` positions drawn at random with ``seed`` (sorted); None when ``n`` is None or
        covers the whole dataset. Drawn from a private generator: the global RNG is untouched."""
        if n is not None and n < 1:
            raise DltestError(f"n must be >= 1, got {n}")
        if n is None or n >= len(self):
            return None
        return torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))[:n].sort().values

    def sample(self, n: int | None, seed: int) -> "ImageDataset":
        """A seeded random subset of ``n`` inputs, in pool order (all of them when ``n`` is None or
        at least the size): the same ``n`` and ``seed`` give the same subset."""
        positions = self.sample_positions(n, seed)
        return self if positions is None else self.subset(positions)

    def require_labels(self, purpose: str) -> "ImageDataset":
        """Fail with one line when the data has no labels but ``purpose`` needs them."""
        if not self.labeled:
            raise DltestError(f"{self.name} has no labels (no 'y' array): {purpose} needs them")
        return self

    def images(self, positions: Tensor | slice | None = None, device: torch.device | str = "cpu") -> Tensor:
        """Float images in [0, 1] on ``device``."""
        x = self.x if positions is None else self.x[positions]
        return to_float_images(x.to(device, non_blocking=True))

    def batches(
        self, batch_size: int, device: torch.device | str = "cpu"
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """Consecutive (images, labels) batches in pool order, images as floats in [0, 1]."""
        for start in range(0, len(self), batch_size):
            stop = start + batch_size
            yield self.images(slice(start, stop), device), self.y[start:stop].to(device, non_blocking=True)


def to_float_images(x: Tensor) -> Tensor:
    """uint8 images become float32 in [0, 1]; float images are returned as float32."""
    if x.dtype == torch.uint8:
        return x.float().div_(255)
    return x.float()

def fingerprint(data: ImageDataset) -> str:
    """A digest of the data's identity and contents (images, labels, source positions): two runs
    that train on different data (another dataset, size, seed's subset, selection or attack)
    never share a resumable state."""
    h = hashlib.sha256(f"{data.name}|{data.split}|{len(data)}|{tuple(data.x.shape)}|{data.x.dtype}".encode())
    for t in (data.x, data.y, data.source_index):
        h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def fit_channels(data: ImageDataset, channels: int) -> ImageDataset:
    """``data`` with ``channels`` channels where that loses nothing: grey -> 3 equal channels, or
    3 equal channels (a grey image saved as RGB) -> 1; otherwise ``data`` unchanged."""
    have = data.input_shape[0]
    if have == channels:
        return data
    if have == 1 and channels == 3:
        x = data.x.expand(-1, 3, -1, -1).contiguous()
    elif have == 3 and channels == 1 and torch.equal(data.x[:, 0], data.x[:, 1]) and torch.equal(data.x[:, 0], data.x[:, 2]):
        x = data.x[:, :1].contiguous()
    else:
        return data
    return ImageDataset(data.name, data.split, x, data.y, data.classes, data.source_index, data.labeled)
