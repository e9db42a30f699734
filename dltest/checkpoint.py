"""Checkpoints that carry everything needed to rebuild a model, loaded without unpickling code.

A dltest checkpoint is a plain dict of primitives and tensors (so ``torch.load(...,
weights_only=True)`` reads it): the architecture name and arguments, the dataset, the input
shape, the class count, the normalisation, the weights and free-form metadata (how it was
trained). TorchScript files load too. A pickled ``nn.Module`` loads only with ``trust=True``.
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dltest.data import ImageDataset
from dltest.errors import DltestError
from dltest.io import atomic_path
from dltest.profiles import PROFILES
from dltest.zoo import Classifier, build_model

FORMAT = "dltest-checkpoint"
VERSION = 1
PRETRAINED_PACKAGE = "dltest.pretrained"


@dataclass
class ModelInfo:
    """What is known about a loaded model; ``source`` is the file or bundled name it came from."""

    source: str
    arch: str | None = None
    dataset: str | None = None
    input_shape: tuple[int, ...] | None = None
    num_classes: int | None = None
    meta: dict[str, Any] = field(default_factory=dict)


def save_checkpoint(
    model: Classifier,
    path: str | os.PathLike,
    *,
    arch: str,
    dataset: str,
    input_shape: tuple[int, ...],
    num_classes: int,
    meta: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write a self-describing checkpoint atomically; ``extra`` holds resumable training state."""
    state = {
        "format": FORMAT,
        "version": VERSION,
        "arch": arch,
        "dataset": dataset,
        "input_shape": list(input_shape),
        "num_classes": int(num_classes),
        "mean": model.mean.flatten().tolist(),
        "std": model.std.flatten().tolist(),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "meta": meta or {},
    }
    if extra:
        state.update(extra)
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    return Path(path)


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """The raw dict of a dltest checkpoint, read with ``weights_only=True``."""
    path = Path(path)
    if not path.is_file():
        raise DltestError(f"model file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt zip, truncated file, pickled objects refused
        raise DltestError(f"cannot read {path} as a dltest checkpoint ({_first_line(exc)})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise DltestError(
            f"{path} is not a dltest checkpoint (a bare state_dict or a foreign file); "
            "save models with `dltest train` or dltest.save_checkpoint"
        )
    return state


def load_model(
    source: str | os.PathLike | None = None,
    *,
    dataset: str | None = None,
    trust: bool = False,
) -> tuple[nn.Module, ModelInfo]:
    """Load a model in eval mode on the CPU.

    ``source`` is a dltest checkpoint, a TorchScript file, an ``.onnx`` file (run by onnxruntime,
    see :mod:`dltest.export`), or ``None`` for the bundled model of ``dataset``. ``trust=True`` also accepts a pickled ``nn.Module``: that runs code from the file,
    so only use it for files you made.
    """
    if source is None:
        if dataset is None:
            raise DltestError("no model given: pass --model FILE or a dataset with a bundled model")
        source = pretrained_path(dataset)
    path = Path(source)
    if not path.is_file():
        raise DltestError(f"model file not found: {path}")
    if path.suffix.lower() == ".onnx":
        return _load_onnx(path)
    if _is_torchscript(path):
        try:
            model = torch.jit.load(str(path), map_location="cpu")
        except Exception as exc:
            raise DltestError(f"cannot read TorchScript file {path} ({_first_line(exc)})") from None
        return model.eval(), ModelInfo(source=str(path))
    if trust:
        obj = torch.load(path, map_location="cpu", weights_only=False)
        if isinstance(obj, nn.Module):
            return obj.eval(), ModelInfo(source=str(path))
    state = read_checkpoint(path)
    model = model_from_checkpoint(state, path)
    info = ModelInfo(
        source=str(path),
        arch=state["arch"],
        dataset=state.get("dataset"),
        input_shape=tuple(state["input_shape"]),
        num_classes=int(state["num_classes"]),
        meta=dict(state.get("meta", {})),
    )
    return model, info


def _load_onnx(path: Path) -> tuple[nn.Module, ModelInfo]:
    """An ONNX file runs through onnxruntime (dltest.export): inference only, no gradients."""
    from dltest.export import load_onnx

    model, meta = load_onnx(path)
    shape = meta.get("input_shape") or model.input_shape
    return model, ModelInfo(
        source=str(path), arch="onnx", dataset=meta.get("dataset"),
        input_shape=tuple(shape) if shape else None,
        num_classes=int(meta["num_classes"]) if meta.get("num_classes") else None, meta=meta,
    )


def model_from_checkpoint(state: dict[str, Any], path: str | os.PathLike = "checkpoint") -> Classifier:
    """Rebuild the zoo model a checkpoint dict describes and load its weights."""
    try:
        model = build_model(
            state["arch"], state["num_classes"], tuple(state["input_shape"]),
            mean=tuple(state["mean"]), std=tuple(state["std"]),
        )
        model.load_state_dict(state["state_dict"])
    except (KeyError, RuntimeError, TypeError) as exc:
        raise DltestError(f"{path}: checkpoint does not match its architecture ({_first_line(exc)})") from None
    return model.eval()


def pretrained_path(dataset: str) -> Path:
    """The bundled checkpoint for ``dataset`` (``models/`` in the repository), named by its profile."""
    name = PROFILES[dataset].pretrained if dataset in PROFILES else None
    path = _bundled(name) if name else None
    if path is None:
        available = ", ".join(pretrained_datasets()) or "none"
        raise DltestError(f"no bundled model for dataset {dataset!r} (bundled: {available}); pass --model FILE")
    return path


def pretrained_datasets() -> list[str]:
    """The datasets whose profile names a bundled checkpoint that is installed."""
    return sorted(name for name, p in PROFILES.items() if p.pretrained and _bundled(p.pretrained))


def _bundled(name: str) -> Path | None:
    """The installed file ``models/<name>``, or None."""
    try:
        path = Path(str(resources.files(PRETRAINED_PACKAGE).joinpath(name)))
    except ModuleNotFoundError:
        return None
    return path if path.is_file() else None


def check_fits(model: nn.Module, data: ImageDataset, info: ModelInfo | None = None) -> None:
    """Fail with one line when ``model`` cannot classify ``data`` (input shape or class count)."""
    name = info.source if info else "model"
    if info and info.input_shape and tuple(info.input_shape) != tuple(data.input_shape):
        raise DltestError(
            f"{name} takes inputs of shape {tuple(info.input_shape)}, but {data.name} has {tuple(data.input_shape)}"
        )
    probe = data.images(slice(0, 2))
    try:
        with torch.inference_mode():
            out = model.eval()(probe.to(next(iter(model.parameters()), probe).device))
    except Exception as exc:
        raise DltestError(f"{name} cannot take {data.name} inputs of shape {tuple(data.input_shape)} ({_first_line(exc)})") from None
    if out.ndim != 2:
        raise DltestError(f"{name} must output (batch, classes) logits, got shape {tuple(out.shape)}")
    from dltest.data import BUILTINS

    exact = data.name in BUILTINS  # a user file may lack some classes in its labels
    if out.shape[1] < data.num_classes or (exact and out.shape[1] != data.num_classes):
        raise DltestError(f"{name} outputs {out.shape[1]} classes, but {data.name} has {data.num_classes}")


def _is_torchscript(path: Path) -> bool:
    """TorchScript archives hold a ``code/`` folder; plain ``torch.save`` files do not."""
    try:
        with zipfile.ZipFile(path) as z:
            return any("/code/" in n for n in z.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
