"""MC-dropout selectors: BALD and dropout entropy (SPEC §1, "MC dropout").

Both draw T stochastic predictions per input with dropout switched on, and score

- ``bald``: H(mean_t p_t) - mean_t H(p_t), the mutual information between label and weights;
- ``dropout-entropy``: H(mean_t p_t), the entropy of the averaged prediction,

with ``xlogy`` so that a zero probability gives 0, never NaN. How the T samples are drawn
depends on the model:

1. A model with its own ``nn.Dropout*`` modules: only those modules go to train mode (never
   ``model.train()``, which would let BatchNorm update its running statistics); T full passes;
   the modes are restored afterwards. The model's own dropout rates are used.
2. A model split into ``embed`` + ``head`` (every zoo model) without dropout: dropout(p) on the
   penultimate features, before the final linear layer. The features are the cached embeddings
   of the one inference pass, so only the head is applied T times, to T inverted-dropout masks
   drawn from the selection's generator. This is exactly T full passes with a dropout layer
   inserted before the head, at a fraction of the cost.
3. Any other model without dropout: T full passes with dropout(p) on the input of its last
   ``nn.Linear`` (or, with none to hook, on the input images), announced by a one-line notice.

Random draws come from the selection's seeded generator (directly for the masks of case 2,
through a derived seed in a forked RNG for the dropout modules of cases 1 and 3), so a
selection is reproducible from its seed.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dltest.errors import DltestError
from dltest.inference import embedding_head
from dltest.progress import console
from dltest.runtime import dropout_modules, mc_dropout_mode, seeded
from dltest.selectors.base import Candidates, Selection, Selector, rank, register
from dltest.selectors.uncertainty import entropy

BATCH_SIZE = 512  # images per batch for the full-pass cases; the draw order depends on it
HEAD_CHUNK = 16384  # rows of embeddings per head application (bounds memory, not the draws)

Sink = Callable[[int, slice, Tensor], None]  # (sample t, pool rows, probabilities of those rows)


def notice(message: str) -> None:
    """A one-line notice on stderr (never wrapped)."""
    console.print(f"notice: {message}", soft_wrap=True, markup=False, highlight=False)


def derived_seed(generator: torch.Generator) -> int:
    return int(torch.randint(0, 2**62, (1,), generator=generator))


def dropout_masks(n: int, d: int, dropout: float, generator: torch.Generator) -> Tensor:
    """One inverted-dropout mask (n, d): 0 with probability ``dropout``, else 1 / (1 - dropout)."""
    keep = torch.rand((n, d), generator=generator) >= dropout
    return keep.float().div_(1.0 - dropout)


def _embeddings(candidates: Candidates, embed: Callable[[Tensor], Tensor]) -> Tensor:
    if candidates.outputs.embeddings is not None:
        return candidates.outputs.embeddings
    if candidates.data is None:
        raise DltestError("MC dropout on the head needs the pool's embeddings or its images")
    with torch.inference_mode():
        parts = [embed(candidates.data.images(slice(s, s + BATCH_SIZE), candidates.device)).float().cpu()
                 for s in range(0, len(candidates.data), BATCH_SIZE)]
    return torch.cat(parts)


def _head_samples(embeddings: Tensor, head: nn.Linear, samples: int, dropout: float,
                  generator: torch.Generator, device: torch.device, sink: Sink) -> None:
    """Case 2: T masks on the cached penultimate features, the head applied to each."""
    n, d = embeddings.shape
    z = embeddings.to(device, torch.float32)
    with torch.inference_mode():
        for t in range(samples):
            mask = dropout_masks(n, d, dropout, generator).to(device)
            for s in range(0, n, HEAD_CHUNK):
                rows = slice(s, min(s + HEAD_CHUNK, n))
                sink(t, rows, torch.softmax(head(z[rows] * mask[rows]).float(), dim=1))


def _full_samples(model: nn.Module, candidates: Candidates, samples: int, generator: torch.Generator, sink: Sink) -> None:
    """Cases 1 and 3: T full passes per batch, dropout drawn from a seed derived from ``generator``."""
    if candidates.data is None:
        raise DltestError("MC dropout through the whole model needs the pool's images")
    n = len(candidates.data)
    with seeded(derived_seed(generator), candidates.device), torch.inference_mode():
        for s in range(0, n, BATCH_SIZE):
            rows = slice(s, min(s + BATCH_SIZE, n))
            x = candidates.data.images(rows, candidates.device)
            for t in range(samples):
                sink(t, rows, torch.softmax(model(x).float(), dim=1))


def _last_linear(model: nn.Module) -> nn.Linear | None:
    if isinstance(model, torch.jit.ScriptModule):
        return None  # hooks cannot be registered on TorchScript modules
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linears[-1] if linears else None


def mc_sample(candidates: Candidates, samples: int, dropout: float, generator: torch.Generator, sink: Sink) -> str:
    """Draw ``samples`` MC-dropout predictions of every pool input into ``sink``; returns the case used."""
    model = candidates.model
    if model is None:
        raise DltestError("MC dropout needs the model")
    model.to(candidates.device)
    own = dropout_modules(model)
    if own:
        with mc_dropout_mode(model, own):
            _full_samples(model, candidates, samples, generator, sink)
        return "model-dropout"
    split = embedding_head(model)
    if split is not None:
        embed, head = split
        with mc_dropout_mode(model, []):
            _head_samples(_embeddings(candidates, embed), head, samples, dropout, generator, candidates.device, sink)
        return "head"
    last = _last_linear(model)
    where = "the input of its last linear layer" if last is not None else "its input images"
    notice(f"the model has no dropout and no embed/head split: MC dropout runs {samples} full passes "
           f"with dropout p={dropout} on {where}")

    def drop(_module: nn.Module, args: tuple) -> tuple:
        return (F.dropout(args[0], dropout, training=True), *args[1:])

    if last is not None:
        handle = last.register_forward_pre_hook(drop)
        try:
            with mc_dropout_mode(model, []):
                _full_samples(model, candidates, samples, generator, sink)
        finally:
            handle.remove()
        return "last-linear"

    class InputDropout(nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            return model(F.dropout(x, dropout, training=True))

    with mc_dropout_mode(model, []):
        _full_samples(InputDropout(), candidates, samples, generator, sink)
    return "input"


def mc_probabilities(candidates: Candidates, samples: int = 10, dropout: float = 0.1,
                     generator: torch.Generator | None = None) -> Tensor:
    """All sampled probabilities, (T, n, C), float64: for inspection and small pools."""
    generator = generator or torch.Generator().manual_seed(0)
    store: dict[int, list[tuple[slice, Tensor]]] = {t: [] for t in range(samples)}
    mc_sample(candidates, samples, dropout, generator, lambda t, rows, p: store[t].append((rows, p.double().cpu())))
    n = len(candidates)
    c = store[0][0][1].shape[1]
    out = torch.empty((samples, n, c), dtype=torch.float64)
    for t, parts in store.items():
        for rows, p in parts:
            out[t, rows] = p
    return out


def bald_from_samples(probs: Tensor) -> Tensor:
    """BALD of (T, n, C) sampled probabilities: H(mean_t p_t) - mean_t H(p_t)."""
    probs = probs.double()
    return entropy(probs.mean(0)) - entropy(probs).mean(0)


def dropout_entropy_from_samples(probs: Tensor) -> Tensor:
    """H(mean_t p_t) of (T, n, C) sampled probabilities."""
    return entropy(probs.double().mean(0))


class _MCDropoutSelector(Selector):
    needs_model = True

    def __init__(self, samples: int = 10, dropout: float = 0.1):
        if int(samples) != samples or samples < 1:
            raise DltestError(f"samples (T) must be a whole number >= 1, not {samples}")
        if not 0.0 <= float(dropout) < 1.0:
            raise DltestError(f"dropout must lie in [0, 1), not {dropout}")
        self.samples = int(samples)
        self.dropout = float(dropout)

    def mc_statistics(self, candidates: Candidates, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """(mean_t p_t (n, C), mean_t H(p_t) (n,)), accumulated in float64 without keeping the samples."""
        n = len(candidates)
        state: dict[str, Tensor] = {}

        def sink(t: int, rows: slice, p: Tensor) -> None:
            p = p.double().cpu()
            if not state:
                state["p"] = torch.zeros((n, p.shape[1]), dtype=torch.float64)
                state["h"] = torch.zeros(n, dtype=torch.float64)
            state["p"][rows] += p
            state["h"][rows] += entropy(p)

        mc_sample(candidates, self.samples, self.dropout, generator, sink)
        return state["p"] / self.samples, state["h"] / self.samples

    def mc_scores(self, mean_p: Tensor, mean_h: Tensor) -> Tensor:
        raise NotImplementedError

    def __call__(self, candidates: Candidates, budget: int, generator: torch.Generator) -> Selection:
        scores = self.mc_scores(*self.mc_statistics(candidates, generator))
        indices = rank(scores, budget, highest=True)
        return Selection(indices, scores[indices])


@register
class BALD(_MCDropoutSelector):
    name = "bald"
    summary = "BALD: highest mutual information H(mean p) - mean H(p) over T MC-dropout samples"
    score_name = "BALD (nats)"

    def mc_scores(self, mean_p: Tensor, mean_h: Tensor) -> Tensor:
        return entropy(mean_p) - mean_h


@register
class DropoutEntropy(_MCDropoutSelector):
    name = "dropout-entropy"
    summary = "MC-dropout entropy: highest entropy of the mean of T MC-dropout predictions"
    score_name = "entropy of the MC-dropout mean (nats)"

    def mc_scores(self, mean_p: Tensor, mean_h: Tensor) -> Tensor:
        return entropy(mean_p)
