"""Model outputs over a pool: one cached pass, and MC-dropout samples.

:func:`infer` runs the model once: logits, probabilities and penultimate embeddings, cached.
Selectors consume these outputs; only the ones that must (EGL, DFAL) run the model again.
:func:`mc_predictions` draws T stochastic predictions with dropout on, (T, n, C), which the
MC-dropout selectors (BALD, dropout entropy) score, as baal's heuristics score predictions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dltest.adapter import ModelAdapter, embedding_head, prepared
from dltest.adapter import (  # noqa: F401 - re-exported: the adapter's names lived here before (issue 19)
    NORMALIZE_PRESETS, OUTPUT_KINDS, PROBE_SIZE, adapt, class_scores, detect_output_kind, embedding_help, output_kind,
    parse_normalize, unwrap,
)
from dltest.data import ImageDataset
from dltest.errors import DltestError
from dltest.progress import console, progress_bar
from dltest.runtime import (
    dropout_modules, eval_mode, gather, mc_dropout_mode, on_device, resolve_device, seeded, shard_positions,
)

# 256, not more: at 1024 a LeNet-5 pass over 60k images took 740k page faults (glibc hands the
# large activations back to the OS after every batch) and ran 1.6x slower on the CPU; at 256
# the activations are reused and it took none (measured here, see docs/benchmarks-selection.md).
INFERENCE_BATCH = 256


@dataclass
class PoolOutputs:
    """Model outputs for every pool input, on the CPU, in pool order."""

    logits: Tensor
    embeddings: Tensor | None = None
    _probs: Tensor | None = None

    @property
    def probs(self) -> Tensor:
        """Softmax probabilities (n, C), float32."""
        if self._probs is None:
            self._probs = torch.softmax(self.logits.float(), dim=1)
        return self._probs

    @property
    def predictions(self) -> Tensor:
        return self.logits.argmax(dim=1)

    @classmethod
    def from_probs(cls, probs: Tensor, embeddings: Tensor | None = None) -> "PoolOutputs":
        """Outputs built from probabilities alone (their log stands in for the logits)."""
        probs = torch.as_tensor(probs, dtype=torch.float32)
        return cls(logits=probs.clamp_min(1e-45).log(), embeddings=embeddings, _probs=probs)

    def __len__(self) -> int:
        return len(self.logits)



@torch.inference_mode()
def infer(
    model: nn.Module,
    data: ImageDataset,
    *,
    batch_size: int = INFERENCE_BATCH,
    device: torch.device | str | None = None,
    embeddings: bool = True,
    progress: bool = False,
) -> PoolOutputs:
    """Run ``model`` (in eval mode) once over ``data``; embeddings come from the same pass.

    Under torchrun each rank runs its contiguous share of whole batches
    (:func:`dltest.runtime.shard_positions`) and every rank gets all outputs back in pool order
    (:func:`dltest.runtime.gather`): the same tensors, bit for bit, as one process computes.
    Non-finite outputs are a one-line error naming the first such input. The model is prepared
    by :func:`dltest.adapter.prepared` (checked to fit ``data``); the caller's model is left on
    its device and in its mode."""
    device = resolve_device(device)
    if len(data) == 0:
        raise DltestError("cannot run inference on an empty pool")
    n = len(data)
    mine = shard_positions(n, block=batch_size)
    logits: Tensor | None = None
    feats: Tensor | None = None
    with prepared(model, data, device) as model, \
            progress_bar("inference", total=len(mine), enabled=progress) as advance:
        split = embedding_head(model) if embeddings and not isinstance(model, ModelAdapter) else None
        for start in range(mine.start, mine.stop, batch_size):
            x = data.images(slice(start, min(start + batch_size, mine.stop)), device)
            rows = slice(start - mine.start, start - mine.start + len(x))
            z = None
            if isinstance(model, ModelAdapter):
                out, z = model.scores_and_embeddings(x) if embeddings else (model(x), None)
            elif split is not None:
                z = split[0](x)
                out = split[1](z)
            else:
                out = model(x)
            if z is not None:
                if feats is None:
                    feats = torch.empty((len(mine), z.shape[1]), dtype=torch.float32)
                feats[rows] = z.float()
            if logits is None:
                logits = torch.empty((len(mine), out.shape[1]), dtype=torch.float32)
            logits[rows] = out.float()
            advance(len(x))
    logits, feats = gather(logits), gather(feats)
    assert logits is not None
    bad = ~torch.isfinite(logits).all(dim=1)
    if bad.any():
        first = int(bad.nonzero()[0])
        raise DltestError(f"the model gave NaN or infinite outputs for {int(bad.sum())} of {n} inputs "
                          f"(first: input {first} of {data.name}/{data.split}); check its weights and input range")
    return PoolOutputs(logits=logits, embeddings=feats)


# --- MC dropout ----------------------------------------------------------------------------------

MC_BATCH = 512  # images per batch for the full-pass placements; the draw order depends on it
HEAD_CHUNK = 16384  # rows of embeddings per head application (bounds memory, not the draws)
PLACEMENTS = ("model", "head", "last-linear", "input")


def dropout_placement(model: nn.Module) -> str:
    """Where :func:`mc_predictions` puts dropout on ``model``.

    - ``model``: the model has its own ``nn.Dropout*`` modules; only those train (never
      ``model.train()``, which would let BatchNorm update its statistics) and their own rates
      are used; T full passes.
    - ``head``: a model split into ``embed`` + ``head`` (every zoo model) without dropout:
      dropout(p) on the penultimate features; the head alone runs T times on the cached
      embeddings, which is exactly T full passes with a dropout layer before the head.
    - ``last-linear``: any other model without dropout: dropout(p) on the input of its last
      ``nn.Linear``, T full passes.
    - ``input``: nothing to hook (e.g. TorchScript): dropout(p) on the input images.
    """
    if dropout_modules(model):
        return "model"
    if embedding_head(model) is not None:
        return "head"
    return "last-linear" if _last_linear(model) is not None else "input"


def dropout_masks(n: int, d: int, dropout: float, generator: torch.Generator) -> Tensor:
    """One inverted-dropout mask (n, d): 0 with probability ``dropout``, else 1 / (1 - dropout)."""
    keep = torch.rand((n, d), generator=generator) >= dropout
    return keep.float().div_(1.0 - dropout)


def derived_seed(generator: torch.Generator) -> int:
    """A seed for torch's global RNG drawn from ``generator`` (dropout modules draw from there)."""
    return int(torch.randint(0, 2**62, (1,), generator=generator))


def mc_predictions(
    model: nn.Module,
    data: ImageDataset | None,
    samples: int = 10,
    dropout: float = 0.1,
    generator: torch.Generator | None = None,
    *,
    embeddings: Tensor | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """T = ``samples`` MC-dropout predictions of every input of ``data``: probabilities (T, n, C).

    Dropout goes where :func:`dropout_placement` says (``dropout`` is the rate where dltest places
    it; a model's own dropout keeps its own rates). ``embeddings`` are the cached penultimate
    features of ``data`` (from :func:`infer`), used by the ``head`` placement instead of a pass
    over the images. Draws come from ``generator`` (default: seeded with 0): directly for the
    head's masks, through a derived seed in a forked global RNG for dropout modules, so the
    samples are reproducible and the caller's RNG is left alone. The model's device and its
    modules' modes are restored afterwards.
    """
    if int(samples) != samples or samples < 1:
        raise DltestError(f"samples (T) must be a whole number >= 1, not {samples}")
    if not 0.0 <= float(dropout) < 1.0:
        raise DltestError(f"dropout must lie in [0, 1), not {dropout}")
    generator = generator or torch.Generator().manual_seed(0)
    device = resolve_device(device)
    placement = dropout_placement(model)
    with on_device(model, device):
        if placement == "model":
            with mc_dropout_mode(model):
                return _full_samples(model, data, int(samples), generator, device)
        if placement == "head":
            embed, head = embedding_head(model)  # type: ignore[misc]
            with eval_mode(model):
                z = embeddings if embeddings is not None else _embed(embed, data, device)
                return _head_samples(z, head, int(samples), float(dropout), generator, device)
        rate = float(dropout)
        last = _last_linear(model)
        where = "the input of its last linear layer" if placement == "last-linear" else "its input images"
        console.print(f"notice: the model has no dropout and no embed/head split: MC dropout runs {samples} full "
                      f"passes with dropout p={rate} on {where}", soft_wrap=True, markup=False, highlight=False)
        with eval_mode(model):
            if last is not None:
                handle = last.register_forward_pre_hook(lambda _m, args: (F.dropout(args[0], rate, training=True), *args[1:]))
                try:
                    return _full_samples(model, data, int(samples), generator, device)
                finally:
                    handle.remove()
            return _full_samples(lambda x: model(F.dropout(x, rate, training=True)), data, int(samples), generator, device)


def _embed(embed, data: ImageDataset | None, device: torch.device) -> Tensor:
    if data is None:
        raise DltestError("MC dropout on the head needs the cached embeddings or the images")
    with torch.inference_mode():
        return torch.cat([embed(data.images(slice(s, s + MC_BATCH), device)).float().cpu()
                          for s in range(0, len(data), MC_BATCH)])


def _head_samples(embeddings: Tensor, head: nn.Linear, samples: int, dropout: float,
                  generator: torch.Generator, device: torch.device) -> Tensor:
    """T masks on the cached penultimate features, the head applied to each."""
    n, d = embeddings.shape
    z = embeddings.to(device, torch.float32)
    out: Tensor | None = None
    with torch.inference_mode():
        for t in range(samples):
            mask = dropout_masks(n, d, dropout, generator).to(device)
            for s in range(0, n, HEAD_CHUNK):
                rows = slice(s, min(s + HEAD_CHUNK, n))
                p = torch.softmax(head(z[rows] * mask[rows]).float(), dim=1).cpu()
                if out is None:
                    out = torch.empty((samples, n, p.shape[1]), dtype=torch.float32)
                out[t, rows] = p
    if out is None:
        raise DltestError("cannot draw MC-dropout samples of an empty pool")
    return out


def _full_samples(model, data: ImageDataset | None, samples: int, generator: torch.Generator,
                  device: torch.device) -> Tensor:
    """T full passes per batch of :data:`MC_BATCH` images; batch b draws its dropout from the seed
    ``s + b`` (``s`` derived from ``generator``), so a batch's draws do not depend on which rank
    runs it: under torchrun each rank runs its share of whole batches and the (T, n, C) samples,
    gathered in pool order, are the ones a single process draws."""
    if data is None:
        raise DltestError("MC dropout through the whole model needs the images")
    n = len(data)
    if n == 0:
        raise DltestError("cannot draw MC-dropout samples of an empty pool")
    base = derived_seed(generator)
    mine = shard_positions(n, block=MC_BATCH)
    out: Tensor | None = None  # (m, T, C): rows first, for the gather
    with torch.inference_mode():
        for s in range(mine.start, mine.stop, MC_BATCH):
            x = data.images(slice(s, min(s + MC_BATCH, mine.stop)), device)
            rows = slice(s - mine.start, s - mine.start + len(x))
            with seeded(base + s // MC_BATCH, device):
                for t in range(samples):
                    p = torch.softmax(model(x).float(), dim=1).cpu()
                    if out is None:
                        out = torch.empty((len(mine), samples, p.shape[1]), dtype=torch.float32)
                    out[rows, t] = p
    return gather(out).transpose(0, 1).contiguous()


def _last_linear(model: nn.Module) -> nn.Linear | None:
    if isinstance(model, torch.jit.ScriptModule):
        return None  # hooks cannot be registered on TorchScript modules
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linears[-1] if linears else None
