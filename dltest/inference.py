"""One inference pass over a pool: logits, probabilities and penultimate embeddings, cached.

Selectors consume these outputs; only the ones that must (MC dropout, EGL, DFAL) run the
model again.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from dltest.data import ImageDataset
from dltest.progress import progress_bar
from dltest.runtime import eval_mode, on_device, resolve_device

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


def embedding_head(model: nn.Module) -> tuple[nn.Module, nn.Linear] | None:
    """(embed, head) for a model split as penultimate features + final linear layer, else None."""
    embed, head = getattr(model, "embed", None), getattr(model, "head", None)
    if callable(embed) and isinstance(head, nn.Linear):
        return embed, head  # type: ignore[return-value]
    return None


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

    The caller's model is left on its device and in its mode."""
    device = resolve_device(device)
    split = embedding_head(model) if embeddings else None
    n = len(data)
    logits: Tensor | None = None
    feats: Tensor | None = None
    with on_device(model, device), eval_mode(model), progress_bar("inference", total=n, enabled=progress) as advance:
        for start in range(0, n, batch_size):
            x = data.images(slice(start, start + batch_size), device)
            if split is not None:
                z = split[0](x)
                out = split[1](z)
                if feats is None:
                    feats = torch.empty((n, z.shape[1]), dtype=torch.float32)
                feats[start : start + len(x)] = z.float()
            else:
                out = model(x)
            if logits is None:
                logits = torch.empty((n, out.shape[1]), dtype=torch.float32)
            logits[start : start + len(x)] = out.float()
            advance(len(x))
    if logits is None:
        raise ValueError("cannot run inference on an empty pool")
    return PoolOutputs(logits=logits, embeddings=feats)
