"""Where and how computations run: the device, model modes, seeds, mixed precision, kernels.

Everything that changes global or caller-owned state is a context manager that restores it on
exit, also on an exception: :func:`eval_mode` and :func:`mc_dropout_mode` (module modes),
:func:`on_device` (where the caller's model lives), :func:`seeded` (torch's global RNG),
:func:`autocast` (CUDA mixed precision) and :func:`native_cpu_backward` (oneDNN on/off).
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

import torch
from torch import Tensor, nn

from dltest.errors import DltestError

DEVICE_ENV = "DLTEST_DEVICE"
DEVICE_KINDS = ("cpu", "cuda", "mps")
DROPOUT_NAMES = {"Dropout", "Dropout1d", "Dropout2d", "Dropout3d", "AlphaDropout", "FeatureAlphaDropout"}


# --- device ------------------------------------------------------------------------------------


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``device``, else ``$DLTEST_DEVICE``, else CUDA when there is a GPU, else the CPU.

    A name torch does not know, or a GPU that is not there, is a one-line :class:`DltestError`
    naming the value and what is allowed.
    """
    name = device if device is not None and device != "" else os.environ.get(DEVICE_ENV) or None
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    allowed = "cpu, cuda, cuda:N or mps"
    try:
        resolved = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        raise DltestError(f"unknown device {str(name)!r}; use {allowed}") from None
    if resolved.type not in DEVICE_KINDS:
        raise DltestError(f"unsupported device {str(name)!r}; use {allowed}")
    if resolved.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise DltestError(f"device {str(name)!r} asked for, but no CUDA GPU is available; use cpu")
        if resolved.index is not None and resolved.index >= count:
            raise DltestError(f"device {str(name)!r} does not exist: {count} CUDA GPU(s), cuda:0..cuda:{count - 1}")
    if resolved.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise DltestError(f"device {str(name)!r} asked for, but MPS is not available; use cpu")
    return resolved


def model_device(model: nn.Module) -> torch.device | None:
    """The device of the model's first parameter (or buffer); None for a model without tensors."""
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return None


@contextlib.contextmanager
def on_device(model: nn.Module, device: torch.device | str) -> Iterator[nn.Module]:
    """The caller's ``model`` on ``device`` inside the block, back where it was after.

    ``nn.Module.to`` moves a model in place; a library function that computes on another device
    wraps its work in this so that the caller's model is where the caller left it.
    """
    device = torch.device(device)
    before = model_device(model)
    if before is None or before == device:
        yield model
        return
    model.to(device)
    try:
        yield model
    finally:
        model.to(before)


# --- model modes -------------------------------------------------------------------------------


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """The model in eval mode (BatchNorm uses running statistics, dropout off); every module's
    mode restored after."""
    saved = [(m, m.training) for m in model.modules()]
    try:
        yield model.eval()
    finally:
        for m, training in saved:
            m.training = training


def dropout_modules(model: nn.Module) -> list[nn.Module]:
    """The model's dropout modules with a rate above 0 (TorchScript ones are found by name)."""
    found = []
    for m in model.modules():
        is_dropout = isinstance(m, nn.modules.dropout._DropoutNd) or (
            isinstance(m, torch.jit.ScriptModule) and getattr(m, "original_name", None) in DROPOUT_NAMES
        )
        if is_dropout and float(getattr(m, "p", 0.5)) > 0:
            found.append(m)
    return found


@contextlib.contextmanager
def mc_dropout_mode(model: nn.Module, modules: list[nn.Module] | None = None) -> Iterator[nn.Module]:
    """Eval mode everywhere except the dropout ``modules`` (default: all of the model's), which
    train; never ``model.train()``, which would let BatchNorm update its statistics. Every
    module's mode restored after."""
    saved = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        for m in dropout_modules(model) if modules is None else modules:
            m.train()
        yield model
    finally:
        for m, training in saved:
            m.training = training


# --- randomness --------------------------------------------------------------------------------


@contextlib.contextmanager
def seeded(seed: int, device: torch.device | str | None = None) -> Iterator[None]:
    """Torch's global RNG seeded with ``seed`` inside the block, and left exactly as it was outside.

    The CPU generator is always forked; the CUDA generators are forked and seeded when CUDA is in
    use (``device`` is a GPU, or CUDA is initialised), and left alone otherwise, so that a CPU
    run neither initialises CUDA nor queues a seed for it.
    """
    device = torch.device(device) if device is not None else None
    use_cuda = torch.cuda.is_available() and (
        (device is not None and device.type == "cuda") or torch.cuda.is_initialized())
    devices = list(range(torch.cuda.device_count())) if use_cuda else []
    with torch.random.fork_rng(devices=devices):
        if use_cuda:
            torch.manual_seed(seed)  # the CPU's and every GPU's generator
        else:
            torch.random.default_generator.manual_seed(seed)
        yield


# --- kernels and precision ---------------------------------------------------------------------


def autocast(device: torch.device | str, enabled: bool = True, dtype: torch.dtype | None = None):
    """CUDA autocast (bfloat16 where the GPU supports it, else float16) when ``enabled`` on a
    CUDA ``device``; a no-op context elsewhere. Autocast restores its state on exit."""
    device = torch.device(device)
    if not enabled or device.type != "cuda":
        return contextlib.nullcontext()
    if dtype is None:
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)


@contextlib.contextmanager
def native_cpu_backward(enabled: bool = True) -> Iterator[None]:
    """Within the block, CPU convolutions run PyTorch's native kernels instead of oneDNN's.

    oneDNN's backward-data kernel is slow for convolutions with few input channels (LeNet-5's
    first layer on grey images: 12 ms against 3.5 ms natively for a batch of 128, measured on
    the benchmark machine), and a PGD step needs exactly that gradient, which training never
    computes. Switching oneDNN off for the backward pass made a PGD step 1.6x faster there. For
    colour models it is the other way round (VGG8 and ResNet18 input gradients took 1.5-1.8x
    longer natively), hence :func:`native_input_grad_pays`.
    """
    getter = getattr(torch._C, "_get_mkldnn_enabled", None)
    setter = getattr(torch._C, "_set_mkldnn_enabled", None)
    if not enabled or getter is None or setter is None:
        yield
        return
    previous = getter()
    setter(False)
    try:
        yield
    finally:
        setter(previous)


def native_input_grad_pays(images: Tensor) -> bool:
    """Whether :func:`native_cpu_backward` speeds up input gradients: CPU tensors of 1-channel images."""
    return images.device.type == "cpu" and images.ndim == 4 and images.shape[1] == 1
