"""Where and how computations run: the device, model modes, seeds, mixed precision, kernels.

Everything that changes global or caller-owned state is a context manager that restores it on
exit, also on an exception: :func:`eval_mode` and :func:`mc_dropout_mode` (module modes),
``prepared`` (a model ready to run on a dataset: :func:`dltest.adapter.prepared`),
:func:`on_device` (where the caller's model lives), :func:`seeded` (torch's global RNG),
:func:`autocast` (CUDA mixed precision) and :func:`native_cpu_backward` (oneDNN on/off).

It also owns the process group: :func:`distributed` joins the one ``torchrun`` describes, and
:func:`rank`, :func:`world_size`, :func:`is_main`, :func:`shard_positions`, :func:`gather` and
:func:`broadcast_object` are all the rest of dltest knows of torch.distributed (selectors never
import it). Outside a process group they answer as a single process would.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import re
from typing import Any, Iterator

import torch
import torch.distributed as dist
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


def __getattr__(name: str) -> Any:
    """``prepared`` (device, adapter, fit check, eval mode, all restored on exit) is defined in
    :mod:`dltest.adapter`, on the model floor, because it needs the adapter; it is found here
    too, imported on first use so that this module imports nothing above it."""
    if name == "prepared":
        from dltest.adapter import prepared

        return prepared
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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


MAX_SEED = 2**32 - 1  # a user's seed (numpy's bound too): the seeds derived from it stay within 63 bits
MAX_TORCH_SEED = 2**63 - 1  # any seed a library function takes (derived ones included)


def check_seed(seed: int | None, name: str = "seed", maximum: int = MAX_SEED) -> int | None:
    """``seed`` unchanged when it is an integer in [0, maximum] (or None); else a one-line error
    naming ``name``, raised before any work that the seed would drive."""
    if seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= maximum:
        raise DltestError(f"{name} must be an integer in [0, {maximum}], got {seed!r:.40}")
    return seed


def stream_seed(value: int) -> int:
    """A seed computed from another (``seed * 1000 + epoch``) folded into torch's 64-bit range;
    unchanged when it already fits."""
    return value % 2**63


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


# --- processes: rank, world size, shard, gather ----------------------------------------------------

DIST_TIMEOUT_ENV = "DLTEST_DIST_TIMEOUT"  # seconds a collective waits for the other ranks (default 1800)
_alone = 0  # depth of single_process() blocks


@contextlib.contextmanager
def distributed() -> Iterator[None]:
    """Inside the block, this process is one rank of the group ``torchrun`` started.

    Reads torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
    ``MASTER_PORT``); with ``WORLD_SIZE`` unset or 1, or a group already joined, it does nothing.
    The backend is gloo for CPU tensors and NCCL for CUDA ones (``cpu:gloo,cuda:nccl`` when there
    is a GPU; each rank then uses GPU ``LOCAL_RANK``). The group is left on exit.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        yield
        return
    backend = "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = "cpu:gloo,cuda:nccl"
    timeout = datetime.timedelta(seconds=float(os.environ.get(DIST_TIMEOUT_ENV, "1800")))
    dist.init_process_group(backend, timeout=timeout)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _grouped() -> bool:
    return _alone == 0 and dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank (0 alone, or inside :func:`single_process`)."""
    return dist.get_rank() if _grouped() else 0


def world_size() -> int:
    """How many processes share the work (1 alone, or inside :func:`single_process`)."""
    return dist.get_world_size() if _grouped() else 1


def is_main() -> bool:
    """Whether this is rank 0, the one process that writes outputs, logs and progress.

    Not affected by :func:`single_process`: rank 0 stays rank 0."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


@contextlib.contextmanager
def single_process() -> Iterator[None]:
    """Inside the block, this process works alone: :func:`shard_positions` gives it every position
    and :func:`gather` returns its input. For work that one rank does (a selector on rank 0)."""
    global _alone
    _alone += 1
    try:
        yield
    finally:
        _alone -= 1


def shard_positions(n: int, block: int = 1) -> range:
    """This rank's contiguous share of positions ``0..n-1``, in whole blocks of ``block``.

    No padding and no duplicates (unlike ``DistributedSampler``, which pads with repeats that
    would corrupt scores): rank r gets blocks ``[r B / W, (r + 1) B / W)`` of the ``B`` blocks,
    so the shards, concatenated in rank order, are the pool in order. With ``block`` the batch
    size, every batch is the batch a single process would run: the outputs are bit-identical.
    """
    blocks = -(-n // block) if n > 0 else 0
    size, r = world_size(), rank()
    first, last = r * blocks // size, (r + 1) * blocks // size
    return range(min(first * block, n), min(last * block, n))


def _collective_failed(exc: BaseException) -> DltestError:
    line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    line = re.sub(r"^\[[^\]]*\]\s*", "", line)  # gloo's "[.../pair.cc:561] " source location
    return DltestError(f"rank {rank()} of {world_size()}: another rank failed or left the run ({line[:120]})")


def gather(tensor: Tensor | None) -> Tensor | None:
    """Every rank's ``tensor`` (its shard's rows; None for an empty shard) concatenated along
    dimension 0 in rank order, i.e. pool order; every rank gets the whole result (None where
    no rank has a tensor).

    Shards may differ in size: sizes are exchanged first, shorter ones are padded for the
    transfer and trimmed after. A rank that died makes this a one-line :class:`DltestError`.
    """
    if world_size() == 1:
        return tensor
    mine = None if tensor is None else (tuple(tensor.shape), tensor.dtype, tensor.device.type)
    shapes: list[Any] = [None] * world_size()
    try:
        dist.all_gather_object(shapes, mine)
        known = next((s for s in shapes if s is not None), None)
        if known is None:
            return None
        _, dtype, device_type = known
        rows = [s[0][0] if s is not None else 0 for s in shapes]
        trailing = known[0][1:]
        device = tensor.device if tensor is not None else (
            torch.device("cuda", torch.cuda.current_device()) if device_type == "cuda" else torch.device("cpu"))
        padded = torch.zeros((max(rows), *trailing), dtype=dtype, device=device)
        if tensor is not None and len(tensor):
            padded[: len(tensor)] = tensor
        parts = [torch.empty_like(padded) for _ in rows]
        dist.all_gather(parts, padded)
    except RuntimeError as exc:  # DistBackendError and gloo's connection errors
        raise _collective_failed(exc) from None
    return torch.cat([part[:k] for part, k in zip(parts, rows)])


def data_parallel(model: nn.Module, device: torch.device | str) -> nn.Module:
    """``model`` wrapped in DistributedDataParallel when there are several ranks, else itself.

    DDP broadcasts rank 0's weights and buffers, then averages gradients across ranks in
    ``backward``; the wrapper shares the model's parameters, so ``model`` stays the one to save."""
    if world_size() == 1:
        return model
    device = torch.device(device)
    return nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (pickled; for small results such as a selection)."""
    if world_size() == 1:
        return obj
    box = [obj if rank() == 0 else None]
    try:
        dist.broadcast_object_list(box, src=0)
    except RuntimeError as exc:
        raise _collective_failed(exc) from None
    return box[0]
