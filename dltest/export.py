"""ONNX: export a model with a parity check, and run an ONNX file as a classifier.

:func:`export_onnx` writes a model with ``torch.onnx.export`` (the torch.export-based exporter,
which needs ``onnxscript``) with a dynamic batch dimension and dltest's metadata (dataset,
input shape, classes), then runs the file in onnxruntime on real inputs and reports the largest
absolute difference of the logits against torch.

:class:`OnnxClassifier` runs an ``.onnx`` file through onnxruntime and quacks like an
``nn.Module`` for inference: ``model(images)`` gives logits, so output-based selectors and the
black-box Square attack run on it. It has no gradients (``has_gradients = False``): gradient
attacks and model-dependent selectors refuse it with a one-line error. Both need the optional
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
from dltest.io import atomic_path

INPUT_NAME, OUTPUT_NAME = "images", "logits"
PARITY_TOLERANCE = 1e-4  # largest absolute logit difference accepted by the export check
METADATA_KEY = "dltest"  # metadata_props entry holding a JSON dict (dataset, input_shape, classes, ...)


def _onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise DltestError("ONNX models need onnxruntime: pip install 'dltest[onnx]'") from None
    return onnxruntime


def _session(path: str | os.PathLike, threads: int | None = None):
    ort = _onnxruntime()
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only
    if threads is None:
        threads = int(os.environ.get("OMP_NUM_THREADS", "0") or 0)
    options.intra_op_num_threads = threads  # 0: onnxruntime's default (all cores)
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


class OnnxClassifier(nn.Module):
    """An ONNX classifier run by onnxruntime on the CPU: images (N, C, H, W) in [0, 1] -> logits.

    Outputs come back on the device of the inputs. ``has_gradients`` is False: nothing can
    differentiate through it, so only output-based metrics and black-box attacks apply.
    """

    has_gradients = False

    def __init__(self, path: str | os.PathLike, *, threads: int | None = None):
        super().__init__()
        self.path = str(path)
        try:
            self.session = _session(path, threads)
        except DltestError:
            raise
        except Exception as exc:  # onnxruntime raises its own types for corrupt or invalid files
            raise DltestError(f"cannot read ONNX file {path} ({first_line(exc)})") from None
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1:
            raise DltestError(f"{path}: an ONNX classifier must take one input (images), this one takes {len(inputs)}")
        self.input_name, self.output_name = inputs[0].name, outputs[0].name
        self.metadata: dict[str, Any] = _read_metadata(self.session)
        # A zero-size parameter tells torch-based tools (torchattacks, .to(), next(model.parameters()))
        # which device the outputs belong on; it holds no weights.
        self.device_anchor = nn.Parameter(torch.empty(0), requires_grad=False)

    @property
    def input_shape(self) -> tuple[int, ...] | None:
        """(C, H, W) when the file fixes them, else None."""
        shape = self.session.get_inputs()[0].shape[1:]
        return tuple(shape) if shape and all(isinstance(d, int) for d in shape) else None

    @property
    def fixed_batch(self) -> int | None:
        """The batch size the file fixes (e.g. 1 for many exported files), else None (dynamic)."""
        first = self.session.get_inputs()[0].shape[:1]
        return first[0] if first and isinstance(first[0], int) and first[0] > 0 else None

    def forward(self, images: Tensor) -> Tensor:
        if images.requires_grad and torch.is_grad_enabled():
            raise DltestError("an ONNX model gives no gradients: use output-based metrics and black-box attacks "
                              "(square), or the torch model for gradient-based ones")
        x = images.detach().to("cpu", torch.float32).contiguous()
        size = self.fixed_batch
        chunks = [x] if size is None or len(x) == size else list(x.split(size))
        outputs = [self._run(chunk, size) for chunk in chunks]
        return torch.cat(outputs).to(images.device) if len(outputs) > 1 else outputs[0].to(images.device)

    def _run(self, x: Tensor, size: int | None) -> Tensor:
        rows = len(x)
        if size is not None and rows < size:  # the last chunk of a fixed-batch file: pad, then drop the padding
            x = torch.cat([x, x.new_zeros((size - rows, *x.shape[1:]))])
        try:
            out = self.session.run([self.output_name], {self.input_name: x.numpy()})[0]
        except Exception as exc:
            raise DltestError(f"{self.path} cannot take inputs of shape {tuple(x.shape)} ({first_line(exc)})") from None
        return torch.from_numpy(out[:rows])

    def extra_repr(self) -> str:
        return f"path={self.path!r}"


def load_onnx(path: str | os.PathLike) -> tuple[OnnxClassifier, dict[str, Any]]:
    """An :class:`OnnxClassifier` and the dltest metadata stored in the file (empty for foreign files)."""
    path = Path(path)
    if not path.is_file():
        raise DltestError(f"model file not found: {path}")
    model = OnnxClassifier(path)
    return model.eval(), model.metadata


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
    nothing is written."""
    _onnxruntime()
    try:
        import onnxscript  # noqa: F401  (the torch.export-based exporter needs it)
    except ImportError:
        raise DltestError("exporting to ONNX needs onnxscript: pip install 'dltest[onnx]'") from None
    check_opset(opset)
    started = time.perf_counter()
    model = model.eval().cpu()
    if len(check_data) == 0:
        raise DltestError("the parity check needs at least one input")
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


def _read_metadata(session) -> dict[str, Any]:
    raw = session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
    if not raw:
        return {}
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError:
        return {}
    return meta if isinstance(meta, dict) else {}

