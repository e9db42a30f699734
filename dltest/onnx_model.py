"""ONNX files read as classifiers: :class:`OnnxClassifier` runs an ``.onnx`` file through onnxruntime.

It quacks like an ``nn.Module`` for inference: ``model(images)`` gives logits, so output-based
selectors and the black-box Square attack run on it. It has no gradients (``has_gradients =
False``): gradient attacks and model-dependent selectors refuse it with a one-line error.
:func:`load_onnx` is how :func:`dltest.checkpoint.load_model` reads an ``.onnx`` file (the
loading lives here, on the model floor, beside checkpoint loading; writing ONNX files is
:mod:`dltest.export`'s). Needs the optional extra ``pip install 'dltest[onnx]'`` (onnxruntime).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from dltest.errors import DltestError, first_line

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


def _read_metadata(session) -> dict[str, Any]:
    raw = session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
    if not raw:
        return {}
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError:
        return {}
    return meta if isinstance(meta, dict) else {}

