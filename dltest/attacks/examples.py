"""Adversarial examples as data: generated from pool inputs, written to and read from ``.npz``.

:class:`AdversarialExamples` is what ``dltest attack`` writes: an ``.npz`` with ``x``
(N, H, W, C float32 in [0, 1]) and ``y`` like any dltest data file (so ``--dataset adv.npz``
reads it), plus the source positions, the predictions and the settings. A file made elsewhere
may hold uint8 pixels (0..255): they are scaled to [0, 1] as every dltest loader does.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from dltest._version import __version__
from dltest.attacks.presets import AttackSpec
from dltest.data import ImageDataset, check_examples, check_npz_sizes, to_float_images

EXAMPLE_ARRAYS = ("x", "y", "indices", "meta")  # what every adversarial-examples file holds
from dltest.errors import DltestError
from dltest.adapter import prepared
from dltest.io import atomic_path, parse_json_text
from dltest.progress import progress_bar
from dltest.runtime import MAX_TORCH_SEED, check_seed, resolve_device, seeded


@dataclass
class AdversarialExamples:
    """Adversarial versions of pool inputs: images (N, C, H, W, float in [0, 1]) and labels.

    ``indices`` are the positions of the source inputs in the pool (``dataset``/``split``),
    ``source_index`` their positions in the file or torchvision split they come from.
    """

    x: Tensor
    y: Tensor
    indices: Tensor
    source_index: Tensor
    clean_pred: Tensor
    adv_pred: Tensor
    dataset: str
    split: str
    attack: dict[str, Any]
    seed: int
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.y)

    @property
    def success_rate(self) -> float:
        """Share of the inputs the model got right before the attack and wrong after it."""
        flipped = (self.clean_pred == self.y) & (self.adv_pred != self.y)
        return float(flipped.float().mean()) if len(self) else 0.0

    def as_dataset(self, classes: list[str]) -> ImageDataset:
        return ImageDataset(self.dataset, "adversarial", self.x, self.y, classes, self.source_index)

    def save(self, path: str | os.PathLike) -> Path:
        """Write an ``.npz`` (``x`` as N, H, W, C), atomically."""
        info = {"dataset": self.dataset, "split": self.split, "attack": self.attack, "seed": self.seed,
                "dltest_version": __version__, **self.meta}
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                np.savez_compressed(
                    f,
                    x=self.x.permute(0, 2, 3, 1).contiguous().numpy().astype(np.float32),
                    y=self.y.numpy().astype(np.int64),
                    indices=self.indices.numpy().astype(np.int64),
                    source_index=self.source_index.numpy().astype(np.int64),
                    clean_pred=self.clean_pred.numpy().astype(np.int64),
                    adv_pred=self.adv_pred.numpy().astype(np.int64),
                    meta=np.array(json.dumps(info)),
                )
        return Path(path)


def load_adversarial(path: str | os.PathLike, data: ImageDataset | None = None) -> AdversarialExamples:
    """Read what :meth:`AdversarialExamples.save` wrote; with ``data``, check it comes from it.

    Everything that the arrays' headers tell (the arrays present, shapes, dtypes, the size as
    float32 images, the fit to ``data``) is checked before any array is read, so a small file
    declaring a huge array is refused in bounded memory. uint8 pixels are scaled to [0, 1].
    """
    path = Path(path)
    if not path.is_file():
        raise DltestError(f"adversarial examples file not found: {path}")
    headers = check_npz_sizes(path, as_float32=("x",))  # sizes on the headers, before any array is read
    _check_headers(headers, path, data)
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except DltestError:
        raise
    except Exception as exc:
        raise DltestError(f"cannot read {path} as an .npz file ({exc})") from None
    meta = parse_json_text(str(arrays.pop("meta")), f"{path}: meta")
    if not isinstance(meta, dict):
        raise DltestError(f"{path}: meta must be a JSON object")
    _check_meta(meta, path)
    check_examples(arrays, path, data.classes if data is not None else None)
    x = to_float_images(torch.from_numpy(arrays["x"]).permute(0, 3, 1, 2).contiguous())
    y = torch.from_numpy(arrays["y"]).long()
    n = len(y)
    examples = AdversarialExamples(
        x=x, y=y, indices=torch.from_numpy(arrays["indices"]).long(),
        source_index=torch.from_numpy(arrays.get("source_index", arrays["indices"])).long(),
        clean_pred=torch.from_numpy(arrays.get("clean_pred", np.full(n, -1))).long(),
        adv_pred=torch.from_numpy(arrays.get("adv_pred", np.full(n, -1))).long(),
        dataset=meta.pop("dataset", "?"), split=meta.pop("split", "?"), attack=meta.pop("attack", {}),
        seed=_meta_seed(meta.pop("seed", 0), path), meta=meta,
    )
    if data is not None:
        if examples.dataset != data.name:
            raise DltestError(f"{path} holds adversarial examples of {examples.dataset!r}, not {data.name!r}")
        if tuple(x.shape[1:]) != tuple(data.input_shape):
            raise DltestError(f"{path} holds inputs of shape {tuple(x.shape[1:])}, but {data.name} has {data.input_shape}")
    return examples


def _check_headers(headers: dict[str, tuple[tuple[int, ...], np.dtype]], path: Path,
                   data: ImageDataset | None) -> None:
    """The arrays an examples file must hold, their shapes and the image dtype, and (with
    ``data``) the image shape, all from the headers: one line naming what is wrong."""
    missing = [key for key in EXAMPLE_ARRAYS if key not in headers]
    if missing:
        raise DltestError(f"{path} is not a dltest adversarial-examples file (no {', '.join(missing)})")
    shape, dtype = headers["x"]
    if len(shape) != 4 or shape[3] not in (1, 3):
        raise DltestError(f"{path}: x must have shape (N, H, W, C) with C 1 or 3, not {shape}")
    if not (dtype == np.uint8 or np.issubdtype(dtype, np.floating)):
        raise DltestError(f"{path}: x must be float in [0, 1] or uint8 (0..255), not {dtype}")
    for key in ("y", "indices"):
        if headers[key][0] != (shape[0],):
            raise DltestError(f"{path}: {key} must be {shape[0]} integers, one per image, not shape {headers[key][0]}")
    images = (shape[3], shape[1], shape[2])
    if data is not None and images != tuple(data.input_shape):
        raise DltestError(f"{path} holds inputs of shape {images}, but {data.name} has {tuple(data.input_shape)}")


def _meta_seed(value: Any, path: Path) -> int:
    """The seed the file records: an integer (a whole float from JSON counts)."""
    whole = isinstance(value, int) or (isinstance(value, float) and value.is_integer())
    if isinstance(value, bool) or not whole:
        raise DltestError(f"{path}: meta 'seed' must be an integer, got {value!r}")
    return check_seed(int(value), f"{path}: meta 'seed'", maximum=MAX_TORCH_SEED)


def _check_meta(meta: dict[str, Any], path: Path) -> None:
    """The fields dltest reads from an examples file's meta, of the types it wrote them with."""
    for name in ("dataset", "split"):
        if name in meta and not isinstance(meta[name], str):
            raise DltestError(f"{path}: meta {name!r} must be a string, got {meta[name]!r:.40}")
    if "attack" in meta and not isinstance(meta["attack"], dict):
        raise DltestError(f"{path}: meta 'attack' must be a JSON object, got {meta['attack']!r:.40}")


def generate_adversarial(
    model: nn.Module,
    data: ImageDataset,
    indices: Sequence[int] | Tensor | None,
    attack: AttackSpec,
    *,
    seed: int = 0,
    batch_size: int = 256,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> AdversarialExamples:
    """Attack the inputs of ``data`` at ``indices`` (all when None), model in eval mode.

    Every selected input gets its adversarial version, also where the attack fails (as in
    adversarial training). Seeded: torch's generator is set to ``seed`` and restored after.
    The model is prepared by :func:`dltest.adapter.prepared`; the caller's model is left on its
    device and in its mode.
    """
    check_seed(seed, maximum=MAX_TORCH_SEED)
    device = resolve_device(device)
    data.require_labels("generate_adversarial (the attack's targets)")
    positions = torch.arange(len(data)) if indices is None else torch.as_tensor(indices, dtype=torch.long)
    if len(positions) == 0:
        raise DltestError("no inputs to attack (empty selection)")
    if positions.min() < 0 or positions.max() >= len(data):
        raise DltestError(f"indices outside the pool of {len(data)}")
    xs, clean, advp = [], [], []
    with prepared(model, data, device) as model, seeded(seed, device), \
            progress_bar(f"attack {attack.label}", len(positions), progress) as advance:
        atk = attack.build(model, data.num_classes)
        for chunk in positions.split(batch_size):
            x = data.images(chunk, device)
            y = data.y[chunk].to(device)
            adv = atk(x, y).detach()
            with torch.no_grad():
                clean.append(model(x).argmax(1).cpu())
                advp.append(model(adv).argmax(1).cpu())
            xs.append(adv.float().cpu())
            advance(len(chunk))
    return AdversarialExamples(
        x=torch.cat(xs), y=data.y[positions].clone(), indices=positions.clone(),
        source_index=data.source_index[positions].clone(), clean_pred=torch.cat(clean), adv_pred=torch.cat(advp),
        dataset=data.name, split=data.split, attack=attack.to_dict(), seed=seed,
    )


def with_examples(train_data: ImageDataset, examples: AdversarialExamples) -> ImageDataset:
    """The training data followed by the adversarial examples (as float images)."""
    if tuple(examples.x.shape[1:]) != tuple(train_data.input_shape):
        raise DltestError(
            f"adversarial examples have shape {tuple(examples.x.shape[1:])}, training data {train_data.input_shape}"
        )
    return ImageDataset(
        train_data.name, f"{train_data.split}+adversarial",
        torch.cat([to_float_images(train_data.x), to_float_images(examples.x)]),
        torch.cat([train_data.y, examples.y]), train_data.classes,
        torch.cat([train_data.source_index, examples.source_index]),
    )
