"""ONNX: export a model with a parity check (running an ONNX file is :mod:`dltest.onnx_model`'s).

:func:`export_onnx` writes a model with ``torch.onnx.export`` (the torch.export-based exporter,
which needs ``onnxscript``) with a dynamic batch dimension and dltest's metadata (dataset,
input shape, classes), then runs the file in onnxruntime on real inputs and reports the largest
absolute difference of the logits against torch.

The parity check runs the file as :class:`~dltest.onnx_model.OnnxClassifier`. Needs the optional
extra ``pip install 'dltest[onnx]'`` (onnxruntime, onnxscript).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from dltest.data import ImageDataset
from dltest.errors import DltestError, first_line
from dltest.adapter import prepared
from dltest.io import atomic_path, check_writable
from dltest.onnx_model import METADATA_KEY, OnnxClassifier, _onnxruntime
from dltest.onnx_model import load_onnx  # noqa: F401 - re-exported: ONNX loading lived here before (issue 19)

INPUT_NAME, OUTPUT_NAME = "images", "logits"
PARITY_TOLERANCE = 1e-4  # largest absolute logit difference accepted by the export check


@dataclass
class ExportResult:
    """An exported ONNX file and how closely it matches torch on real inputs."""

    path: str
    max_abs_diff: float
    n_checked: int
    same_predictions: float  # share of checked inputs with the same argmax
    opset: int | None
    seconds: float
    tolerance: float = PARITY_TOLERANCE
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.tolerance


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    check_data: ImageDataset,
    *,
    n_check: int = 512,
    tolerance: float = PARITY_TOLERANCE,
    opset: int | None = None,
    metadata: dict[str, Any] | None = None,
    batch_size: int = 256,
) -> ExportResult:
    """Export ``model`` to ``path`` (written atomically) and compare onnxruntime with torch on the
    first ``n_check`` inputs of ``check_data``; a difference above ``tolerance`` is an error and
    nothing is written. Every argument is checked before the export; the model is prepared by
    :func:`dltest.adapter.prepared` on the CPU (outside models exported as dltest reads them:
    logits), and left on its device and in its mode."""
    check_export(model, path, check_data, n_check=n_check, tolerance=tolerance, opset=opset)
    started = time.perf_counter()
    with prepared(model, check_data, "cpu") as model:
        return _export_checked(model, path, check_data, n_check, tolerance, opset, metadata, batch_size, started)


def check_export(model: nn.Module | None, path: str | os.PathLike, check_data: ImageDataset | None, *,
                 n_check: int = 512,
                 tolerance: float = PARITY_TOLERANCE, opset: int | None = None) -> None:
    """The arguments of :func:`export_onnx`, checked before any work (``dltest export`` calls it
    before it loads anything, with ``model`` and ``check_data`` None): the packages, the file
    name and its folder, the counts, the tolerance, the opset, and a model that is not ONNX already."""
    _onnxruntime()
    try:
        import onnxscript  # noqa: F401  (the torch.export-based exporter needs it)
    except ImportError:
        raise DltestError("exporting to ONNX needs onnxscript: pip install 'dltest[onnx]'") from None
    if Path(path).suffix.lower() != ".onnx":
        raise DltestError(f"path must name an .onnx file, got {path}", param="path")
    if isinstance(n_check, bool) or not isinstance(n_check, int) or n_check < 1:
        raise DltestError(f"n_check must be an integer >= 1, got {n_check!r}", param="n_check")
    if not tolerance > 0:
        raise DltestError(f"tolerance must be > 0, got {tolerance}", param="tolerance")
    check_opset(opset)
    check_writable(path)
    if model is not None and not getattr(model, "has_gradients", True):
        raise DltestError(f"the model is already an ONNX model ({getattr(model, 'path', 'onnxruntime')}): "
                          "export the torch model it came from")
    if check_data is not None and len(check_data) == 0:
        raise DltestError("the parity check needs at least one input")


def _export_checked(model: nn.Module, path, check_data: ImageDataset, n_check: int, tolerance: float,
                    opset: int | None, metadata: dict[str, Any] | None, batch_size: int,
                    started: float) -> ExportResult:
    """The export itself, on a prepared model whose arguments are checked."""
    example = check_data.images(slice(0, 2))
    meta = {"dataset": check_data.name, "input_shape": list(check_data.input_shape),
            "num_classes": check_data.num_classes, "classes": list(check_data.classes), **(metadata or {})}
    with atomic_path(path) as tmp:
        onnx_tmp = tmp.with_suffix(".onnx")
        try:
            _torch_export(model, example, onnx_tmp, opset)
            if opset is not None:
                _convert_opset(onnx_tmp, opset)
            _write_metadata(onnx_tmp, meta)
            onnx_tmp.replace(tmp)
        finally:
            onnx_tmp.unlink(missing_ok=True)
        exported = OnnxClassifier(tmp)
        checked = check_data.subset(torch.arange(min(n_check, len(check_data))))
        diff, agree = parity(model, exported, checked, batch_size)
        if diff > tolerance:
            raise DltestError(f"the ONNX export differs from torch by {diff:.3g} in the logits (more than {tolerance:g}) "
                              "on real inputs; nothing written")
    import onnx

    opset_used = next((o.version for o in onnx.load(str(path), load_external_data=False).opset_import
                       if o.domain in ("", "ai.onnx")), None)
    return ExportResult(path=str(path), max_abs_diff=diff, n_checked=len(checked), same_predictions=agree,
                        opset=opset_used, seconds=round(time.perf_counter() - started, 3), tolerance=tolerance,
                        metadata=meta)


@torch.no_grad()
def parity(model: nn.Module, exported: nn.Module, data: ImageDataset, batch_size: int = 256) -> tuple[float, float]:
    """(largest absolute logit difference, share of equal predictions) of two models on ``data``."""
    worst, agree = 0.0, 0
    for x, _ in data.batches(batch_size):
        a, b = model(x).float(), exported(x).float()
        worst = max(worst, float((a - b).abs().max()))
        agree += int((a.argmax(1) == b.argmax(1)).sum())
    return worst, agree / len(data)


MIN_OPSET = 7  # the oldest opset onnxruntime runs


def check_opset(opset: int | None) -> None:
    """An opset that onnx knows (``MIN_OPSET`` to the installed onnx's newest), before any work."""
    if opset is None:
        return
    import onnx

    newest = onnx.defs.onnx_opset_version()
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= newest:
        raise DltestError(f"opset must be an integer from {MIN_OPSET} to {newest} (the installed onnx's newest), "
                          f"got {opset!r}", cli=f"--opset must be from {MIN_OPSET} to {newest}, got {opset!r}")


def _opset_of(proto: Any) -> int | None:
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)


def _convert_opset(path: Path, opset: int) -> None:
    """Make the file at ``path`` use ``opset``: torch's exporter writes at least its own minimum
    (18) whatever it is asked, so an older opset is reached with onnx's version converter; a
    model the converter cannot express in ``opset`` is an error, never a silent other opset."""
    import onnx
    from onnx import version_converter

    proto = onnx.load(str(path))
    if _opset_of(proto) == opset:
        return
    try:
        converted = version_converter.convert_version(proto, opset)
        onnx.checker.check_model(converted)
    except Exception as exc:
        raise DltestError(f"cannot export with opset {opset}: the exporter wrote opset {_opset_of(proto)} and "
                          f"onnx cannot convert it ({first_line(exc)}); choose another --opset") from None
    if _opset_of(converted) != opset:
        raise DltestError(f"cannot export with opset {opset}: the model needs opset {_opset_of(converted)}")
    onnx.save(converted, str(path))


def _torch_export(model: nn.Module, example: Tensor, path: Path, opset: int | None) -> None:
    batch = torch.export.Dim("batch", min=1)
    kwargs: dict[str, Any] = {"opset_version": opset} if opset is not None else {}
    sink = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(sink):
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model, (example,), str(path), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                dynamic_shapes=({0: batch},), external_data=False, verbose=False, **kwargs,
            )
    except Exception as exc:
        raise DltestError(f"torch.onnx.export failed ({first_line(exc)})") from None


def _write_metadata(path: Path, meta: dict[str, Any]) -> None:
    import onnx

    proto = onnx.load(str(path))
    entry = next((p for p in proto.metadata_props if p.key == METADATA_KEY), None) or proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(meta)
    onnx.save(proto, str(path))
