"""Checkpoints that carry everything needed to rebuild a model, loaded without unpickling code.

A dltest checkpoint is a plain dict of primitives and tensors (so ``torch.load(...,
weights_only=True)`` reads it): the architecture name and arguments, the dataset, the input
shape, the class count, the normalisation, the weights and free-form metadata (how it was
trained). TorchScript files load too. A pickled ``nn.Module`` loads only with ``trust=True``.

No metadata in a file runs code: the architecture a checkpoint names is built only when it is a
zoo name; a ``module:Class`` or ``file.py:Class`` (imported and called to build the model) only
when the user named it (``arch=``, ``--arch``) or trusts the file (``trust=True``,
``--trust-model``); see :func:`dltest.zoo.check_file_arch`.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import pickle
import warnings
import zipfile
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dltest.adapter import ModelAdapter, adapt, parse_normalize, unwrap
from dltest.adapter import check_fits  # noqa: F401 - re-exported: it lived here before (issue 19)
from dltest.errors import DltestError, first_line
from dltest.onnx_model import load_onnx
from dltest.io import atomic_path
from dltest.profiles import PROFILES
from dltest.zoo import (
    ARCHITECTURES, Classifier, _shown, build_architecture, build_model, check_file_arch, is_zoo_architecture,
    parse_arch_kwargs,
)
from dltest.zoo import resolve_arch  # noqa: F401 - re-exported: architecture resolution lived here before (issue 19)

FORMAT = "dltest-checkpoint"
VERSION = 1
PRETRAINED_PACKAGE = "dltest.pretrained"
STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model")  # where other tools nest a state_dict


@dataclass
class ModelInfo:
    """What is known about a loaded model; ``source`` is the file or bundled name it came from.

    ``kind`` is how it was stored (``dltest-checkpoint``, ``state_dict``, ``torchscript``,
    ``pickled-module`` or ``object``); ``arch`` is a zoo name or ``module:Class``.
    """

    source: str
    arch: str | None = None
    dataset: str | None = None
    input_shape: tuple[int, ...] | None = None
    num_classes: int | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    kind: str = "dltest-checkpoint"
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    normalize: tuple[tuple[float, ...], tuple[float, ...]] | None = None
    digest: str | None = None

    outputs: str = "logits"  # what the model outputs (logits, probabilities, log-probabilities); check_fits sets it
    embeddings: str | None = None  # where its embeddings come from; check_fits sets it

    def describe(self) -> dict[str, Any]:
        """What an output JSON records about the model, how dltest reads its outputs included."""
        return {
            "source": self.source, "kind": self.kind, "arch": self.arch, "arch_kwargs": self.arch_kwargs or None,
            "normalize": [list(v) for v in self.normalize] if self.normalize else None,
            "outputs": self.outputs, "embeddings": self.embeddings, "digest": self.digest,
        }


def state_digest(state_dict: dict[str, torch.Tensor], header: dict[str, Any] | None = None) -> str:
    """``sha256:<hex>`` of the tensors (names, dtypes, shapes and bytes, in name order) and of
    ``header`` (the architecture fields a checkpoint rebuilds the model from)."""
    h = hashlib.sha256()
    h.update(json.dumps(header or {}, sort_keys=True, default=str).encode())
    for name in sorted(state_dict):
        t = state_dict[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return "sha256:" + h.hexdigest()


def _digest_header(state: dict[str, Any]) -> dict[str, Any]:
    keys = ("arch", "arch_kwargs", "input_shape", "num_classes", "mean", "std", "normalize")
    return {k: state.get(k) for k in keys}


def save_checkpoint(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    arch: str,
    dataset: str,
    input_shape: tuple[int, ...],
    num_classes: int,
    meta: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    arch_kwargs: dict[str, Any] | None = None,
) -> Path:
    """Write a self-describing checkpoint atomically, with a digest of its weights.

    ``model`` is a zoo :class:`Classifier` (``arch`` a zoo name) or any module built by ``arch``
    = ``module:Class`` with ``arch_kwargs`` (an adapter's normalisation is stored with it).
    ``extra`` holds resumable training state.
    """
    normalize = model.normalization if isinstance(model, ModelAdapter) else None
    inner = model.model if isinstance(model, ModelAdapter) else model
    state = {
        "format": FORMAT,
        "version": VERSION,
        "arch": arch,
        "arch_kwargs": dict(arch_kwargs or {}),
        "dataset": dataset,
        "input_shape": list(input_shape),
        "num_classes": int(num_classes),
        "mean": inner.mean.flatten().tolist() if isinstance(inner, Classifier) else None,
        "std": inner.std.flatten().tolist() if isinstance(inner, Classifier) else None,
        "normalize": [list(v) for v in normalize] if normalize else None,
        "state_dict": {k: v.detach().cpu() for k, v in inner.state_dict().items()},
        "meta": meta or {},
    }
    state["digest"] = state_digest(state["state_dict"], _digest_header(state))
    if extra:
        state.update(extra)
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    return Path(path)


def save_model(model: nn.Module, path: str | os.PathLike, info: ModelInfo, *, dataset: str,
               input_shape: tuple[int, ...], num_classes: int, meta: dict[str, Any] | None = None) -> Path:
    """Save a (re)trained model in the form it came in: a dltest checkpoint for zoo and
    ``--arch`` models, TorchScript for TorchScript models (normalisation stays outside, as given)."""
    inner = unwrap(model)
    if info.arch and (isinstance(inner, Classifier) or ":" in info.arch):
        return save_checkpoint(model, path, arch=info.arch, arch_kwargs=info.arch_kwargs, dataset=dataset,
                               input_shape=input_shape, num_classes=num_classes, meta=meta)
    try:
        scripted = inner if isinstance(inner, torch.jit.ScriptModule) else torch.jit.script(inner)
    except Exception as exc:  # noqa: BLE001 - any scripting failure is reported in one line
        why = f"cannot save the retrained model as TorchScript ({first_line(exc)}); load it as a state_dict with "
        raise DltestError(why + "arch='module:Class' instead", cli=why + "--arch module:Class instead") from None
    with atomic_path(path) as tmp:
        torch.jit.save(scripted, str(tmp))
    return Path(path)


def copy_model(model: nn.Module) -> nn.Module:
    """An independent copy whose parameters are leaves, as an optimizer needs.

    ``copy.deepcopy`` of a TorchScript module clones its parameters under autograd, so the copies
    are non-leaf tensors ("can't optimize a non-leaf Tensor"); copying under ``no_grad`` makes
    leaves, and ``requires_grad`` is then set back as it was.
    """
    flags = [p.requires_grad for p in model.parameters()]
    with torch.no_grad():
        copied = copy.deepcopy(model)
    for p, flag in zip(copied.parameters(), flags):
        p.requires_grad_(flag)
    return copied


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """The raw dict of a dltest checkpoint, read with ``weights_only=True``."""
    path = Path(path)
    state = _load_weights_only(path)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise DltestError(
            f"{path} is not a dltest checkpoint (a bare state_dict or a foreign file); "
            "save models with `dltest train` or dltest.save_checkpoint"
        )
    return state


def _load_weights_only(path: Path) -> Any:
    if not path.is_file():
        raise DltestError(f"model file not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "Unsupported global" in str(exc):  # a class to import: pickled objects, not plain weights
            why = f"{path} holds pickled Python objects (e.g. a whole nn.Module): loading it runs code from the file; "
            raise DltestError(
                why + "pass trust=True only for a file you made, or save its state_dict and pass arch",
                cli=why + "pass --trust-model only for a file you made, or save its state_dict and pass --arch",
            ) from None
        raise DltestError(f"cannot read {path} as a model file ({first_line(exc)})") from None
    except Exception as exc:  # corrupt zip, truncated file
        raise DltestError(f"cannot read {path} as a model file ({first_line(exc)})") from None


def load_model(
    source: str | os.PathLike | None = None,
    *,
    dataset: str | None = None,
    trust: bool = False,
    arch: str | None = None,
    arch_kwargs: dict[str, Any] | str | None = None,
    normalize: Any = None,
    num_classes: int | None = None,
    input_shape: tuple[int, ...] | None = None,
    robust: bool = False,
) -> tuple[nn.Module, ModelInfo]:
    """Load a model in eval mode on the CPU.

    ``source`` is a dltest checkpoint, a TorchScript file, an ``.onnx`` file (run by onnxruntime,
    see :mod:`dltest.onnx_model`), a state_dict (with ``arch``: a zoo name or ``module:Class``, built
    with ``arch_kwargs``; a zoo model also needs ``input_shape``), or ``None`` for the bundled
    model of ``dataset`` (``robust=True``: its adversarially trained one). ``trust=True`` also accepts a pickled ``nn.Module``: that runs code from
    the file, so only use it for files you made. A ``module:Class`` / ``file.py:Class`` in ``arch``
    is imported and called, which runs its code; a dltest checkpoint that names such an
    architecture loads only when ``arch`` names the same one, or with ``trust=True``
    (:func:`check_file_arch`). ``normalize=(mean, std)`` is for models trained
    on normalised inputs: the model then comes wrapped in :class:`~dltest.adapter.ModelAdapter`
    (every dltest function adapts other outside models itself).
    """
    if source is None:
        if dataset is None:
            raise DltestError("no model given: pass --model FILE or a dataset with a bundled model")
        source = pretrained_path(dataset, robust=robust)
    path = Path(source)
    if not path.is_file():
        raise DltestError(f"model file not found: {path}")
    kwargs = parse_arch_kwargs(arch_kwargs)
    if kwargs and not arch:
        raise DltestError("arch_kwargs need arch", cli="--arch-kwargs needs --arch")
    normalization = parse_normalize(normalize, input_shape[0] if input_shape else None)
    if path.suffix.lower() == ".onnx":
        if arch:
            raise DltestError(f"{path} is an ONNX file: it carries its architecture; drop arch",
                              cli=f"{path} is an ONNX file: it carries its architecture; drop --arch")
        model, info = _load_onnx(path)
        info.kind, info.normalize = "onnx", normalization
        return _adapted(model, normalization), info
    if _is_torchscript(path):
        if arch:
            raise DltestError(f"{path} is a TorchScript file: it carries its architecture; drop arch",
                              cli=f"{path} is a TorchScript file: it carries its architecture; drop --arch")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch.jit.load's deprecation notice
                model = torch.jit.load(str(path), map_location="cpu")
        except Exception as exc:
            raise DltestError(f"cannot read TorchScript file {path} ({first_line(exc)})") from None
        info = ModelInfo(source=str(path), kind="torchscript", normalize=normalization)
        return _adapted(model.eval(), normalization), info
    if trust:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc:
            raise DltestError(f"cannot read {path} as a model file ({first_line(exc)})") from None
        if isinstance(obj, nn.Module):
            info = ModelInfo(source=str(path), kind="pickled-module", normalize=normalization)
            return _adapted(obj.eval(), normalization), info
    state = _load_weights_only(path)
    if isinstance(state, dict) and state.get("format") == FORMAT:
        _check_given_arch(state, path, arch, kwargs)
        return _from_checkpoint(state, path, normalization, allow_code=trust or arch is not None)
    weights = _state_dict_in(state)
    if weights is None:
        why = f"{path} is not a model file dltest knows (a dltest checkpoint, a state_dict, a TorchScript file, or with "
        raise DltestError(why + "trust=True a pickled nn.Module)", cli=why + "--trust-model a pickled nn.Module)")
    if not arch:
        zoo = ", ".join(ARCHITECTURES)
        raise DltestError(f"{path} is a bare state_dict: pass its architecture as arch='module:Class' (with "
                          f"arch_kwargs) or a zoo name ({zoo})",
                          cli=f"{path} is a bare state_dict: pass its architecture with --arch module:Class "
                          f"(and --arch-kwargs JSON) or a zoo name ({zoo})")
    model = build_architecture(arch, kwargs, weights, input_shape, num_classes, path)
    info = ModelInfo(source=str(path), arch=arch, input_shape=input_shape, num_classes=num_classes,
                     kind="state_dict", arch_kwargs=kwargs, normalize=normalization, digest=state_digest(weights))
    return _adapted(model, normalization), info


def _adapted(model: nn.Module, normalization) -> nn.Module:
    """The model as loaded, wrapped in a :class:`~dltest.adapter.ModelAdapter` only when it needs
    a normalisation in front (every entry point adapts outside models itself)."""
    return adapt(model, normalize=normalization) if normalization is not None else model


def _check_given_arch(state: dict[str, Any], path: Path, arch: str | None, kwargs: dict[str, Any]) -> None:
    """A checkpoint names its own architecture: ``arch`` (and ``arch_kwargs``) given with one must
    repeat what it stores (the user vouching for that code), never replace it."""
    if arch is None:
        return
    stored = state.get("arch")
    if arch != stored:
        why = f"{path} is a dltest checkpoint of architecture {_shown(stored)}, not {arch!r}: drop "
        raise DltestError(why + "arch (or pass that one)", cli=why + "--arch (or pass that one)")
    if kwargs and kwargs != dict(state.get("arch_kwargs") or {}):
        stored_kwargs = _shown(state.get("arch_kwargs"))
        why = f"{path} is a dltest checkpoint: it stores its architecture's arguments ({stored_kwargs}); drop "
        raise DltestError(why + "arch_kwargs", cli=why + "--arch-kwargs")


def _from_checkpoint(state: dict[str, Any], path: Path, normalization,
                     allow_code: bool = False) -> tuple[nn.Module, ModelInfo]:
    check_file_arch(state.get("arch"), path, allowed=allow_code)
    stored = state.get("digest")
    if stored is not None and stored != state_digest(state.get("state_dict", {}), _digest_header(state)):
        raise DltestError(f"{path}: the weights do not match the digest stored in the checkpoint (altered or "
                          "corrupted after saving); use the original file or save the model again")
    if normalization is not None and is_zoo_architecture(state.get("arch")):
        why = (f"{path} is a zoo model that normalises its inputs itself (mean {state.get('mean')}, std "
               f"{state.get('std')}); drop ")
        raise DltestError(why + "normalize", cli=why + "--normalize")
    model = model_from_checkpoint(state, path, allow_code=allow_code)
    saved_norm = state.get("normalize")
    if saved_norm and normalization is None:
        normalization = (tuple(saved_norm[0]), tuple(saved_norm[1]))
    info = ModelInfo(
        source=str(path),
        arch=state["arch"],
        dataset=state.get("dataset"),
        input_shape=tuple(state["input_shape"]),
        num_classes=int(state["num_classes"]),
        meta=dict(state.get("meta", {})),
        arch_kwargs=dict(state.get("arch_kwargs") or {}),
        normalize=normalization,
        digest=stored,
    )
    return _adapted(model, normalization), info


def _load_onnx(path: Path) -> tuple[nn.Module, ModelInfo]:
    """An ONNX file runs through onnxruntime (dltest.onnx_model): inference only, no gradients."""
    model, meta = load_onnx(path)
    shape = meta.get("input_shape") or model.input_shape
    return model, ModelInfo(
        source=str(path), arch="onnx", dataset=meta.get("dataset"),
        input_shape=tuple(shape) if shape else None,
        num_classes=int(meta["num_classes"]) if meta.get("num_classes") else None, meta=meta,
    )


def model_from_checkpoint(state: dict[str, Any], path: str | os.PathLike = "checkpoint", *,
                          allow_code: bool = False) -> nn.Module:
    """Rebuild the model a checkpoint dict describes and load its weights.

    A zoo architecture is built directly; a ``module:Class`` one only with ``allow_code=True``
    (the user named it or trusts the file; :func:`check_file_arch`), as building it runs its code.
    """
    arch = state.get("arch")
    check_file_arch(arch, path, allowed=allow_code)
    if not is_zoo_architecture(arch):
        try:
            kwargs, weights = dict(state.get("arch_kwargs") or {}), state["state_dict"]
            input_shape = tuple(state["input_shape"])
        except (KeyError, TypeError, ValueError) as exc:
            raise DltestError(f"{path}: checkpoint does not match its architecture ({first_line(exc)})") from None
        return build_architecture(arch, kwargs, weights, input_shape, state.get("num_classes"), path)
    try:
        model = build_model(
            state["arch"], state["num_classes"], tuple(state["input_shape"]),
            mean=tuple(state["mean"]), std=tuple(state["std"]),
        )
        model.load_state_dict(state["state_dict"])
    except (KeyError, RuntimeError, TypeError) as exc:
        raise DltestError(f"{path}: checkpoint does not match its architecture ({first_line(exc)})") from None
    return model.eval()


def _state_dict_in(obj: Any) -> dict[str, torch.Tensor] | None:
    """The state_dict in a loaded file: the dict itself, or one nested under a usual key."""
    if isinstance(obj, dict) and obj and all(isinstance(k, str) for k in obj):
        if all(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj
        for key in STATE_DICT_KEYS:
            if key in obj:
                return _state_dict_in(obj[key])
    return None


def pretrained_path(dataset: str, robust: bool = False) -> Path:
    """The bundled checkpoint for ``dataset`` (``models/`` in the repository), named by its profile;
    ``robust=True``: the adversarially trained one."""
    profile = PROFILES.get(dataset)
    name = (profile.pretrained_robust if robust else profile.pretrained) if profile else None
    path = _bundled(name) if name else None
    if path is None:
        kind = "adversarially trained model" if robust else "model"
        available = ", ".join(pretrained_datasets(robust)) or "none"
        raise DltestError(f"no bundled {kind} for dataset {dataset!r} (bundled: {available}); pass --model FILE")
    return path


def pretrained_datasets(robust: bool = False) -> list[str]:
    """The datasets whose profile names a bundled (adversarially trained) checkpoint that is installed."""
    names = {name: (p.pretrained_robust if robust else p.pretrained) for name, p in PROFILES.items()}
    return sorted(name for name, file in names.items() if file and _bundled(file))


def _bundled(name: str) -> Path | None:
    """The installed file ``models/<name>``, or None."""
    try:
        path = Path(str(resources.files(PRETRAINED_PACKAGE).joinpath(name)))
    except ModuleNotFoundError:
        return None
    return path if path.is_file() else None


def _is_torchscript(path: Path) -> bool:
    """TorchScript archives hold a ``code/`` folder; plain ``torch.save`` files do not."""
    try:
        with zipfile.ZipFile(path) as z:
            return any("/code/" in n for n in z.namelist())
    except (zipfile.BadZipFile, OSError):
        return False
