"""Model outputs over a pool: one cached pass, and MC-dropout samples.

:func:`infer` runs the model once: logits, probabilities and penultimate embeddings, cached.
Selectors consume these outputs; only the ones that must (EGL, DFAL) run the model again.
:func:`mc_predictions` draws T stochastic predictions with dropout on, (T, n, C), which the
MC-dropout selectors (BALD, dropout entropy) score, as baal's heuristics score predictions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

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


def embedding_head(model: nn.Module) -> tuple[Callable[[Tensor], Tensor], nn.Module] | None:
    """(embed, head) for a model whose scores are ``head(embed(x))`` with ``head`` a final linear
    layer (every zoo model; an adapted model where that was checked), else None."""
    if isinstance(model, ModelAdapter):
        return (model.embed, model.head) if model.head is not None else None
    embed, head = getattr(model, "embed", None), getattr(model, "head", None)
    if callable(embed) and isinstance(head, nn.Linear):
        return embed, head  # type: ignore[return-value]
    return None


PROBE_SIZE = 8  # inputs on which an outside model's output kind and embeddings are detected


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
    An outside model goes through :func:`adapt` (tuple/dict/``.logits`` outputs, probabilities).
    Non-finite outputs are a one-line error naming the first such input. The caller's model is
    left on its device and in its mode."""
    device = resolve_device(device)
    if len(data) == 0:
        raise DltestError("cannot run inference on an empty pool")
    model = adapt(model, data.images(slice(0, PROBE_SIZE)))
    split = embedding_head(model) if embeddings and not isinstance(model, ModelAdapter) else None
    n = len(data)
    mine = shard_positions(n, block=batch_size)
    logits: Tensor | None = None
    feats: Tensor | None = None
    with on_device(model, device), eval_mode(model), progress_bar("inference", total=len(mine), enabled=progress) as advance:
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


# --- outside models: one adapter gives every command logits and embeddings -----------------------

OUTPUT_KINDS = ("logits", "probabilities", "log-probabilities")
# Presets for --normalize (ImageNet's, the normalisation of most timm / Hugging Face vision models).
NORMALIZE_PRESETS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
_SUM_TOLERANCE = 1e-3  # |row sum - 1| of float32 probabilities stays far below this
_TINY = torch.finfo(torch.float32).tiny


def class_scores(out: Any) -> Tensor:
    """The (batch, classes) tensor in whatever a model's forward returned.

    A tensor; an object with ``.logits`` (Hugging Face outputs); a dict with a ``logits`` key or a
    single tensor value; a tuple or list whose first element is the scores (Hugging Face with
    ``return_dict=False``, torchvision's auxiliary-output tuples).
    """
    if isinstance(out, Tensor):
        return out
    logits = getattr(out, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    if isinstance(out, Mapping):
        if isinstance(out.get("logits"), Tensor):
            return out["logits"]
        tensors = [k for k, v in out.items() if isinstance(v, Tensor)]
        if len(tensors) == 1:
            return out[tensors[0]]
        raise DltestError(f"the model returned a dict with the tensors {tensors[:6]}: name the class scores 'logits'")
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    raise DltestError(f"the model returned {type(out).__name__}, not class scores: return a tensor, a tuple whose "
                      "first element is the scores, a dict with 'logits', or an object with .logits")


def detect_output_kind(scores: Tensor) -> str:
    """``probabilities`` (rows >= 0 summing to 1), ``log-probabilities`` (rows <= 0 whose exp sums
    to 1) or ``logits`` (anything else), judged on a probe batch of at least two inputs."""
    s = scores.detach().double()
    if s.ndim != 2 or s.shape[1] < 2 or not torch.isfinite(s).all():
        return "logits"
    if (s >= 0).all() and ((s.sum(1) - 1).abs() < _SUM_TOLERANCE).all():
        return "probabilities"
    if (s <= 0).all() and ((s.exp().sum(1) - 1).abs() < _SUM_TOLERANCE).all():
        return "log-probabilities"
    return "logits"


def parse_normalize(spec: str | Sequence[Sequence[float]] | None, channels: int | None = None
                    ) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """``"MEAN,STD"`` (one value for every channel), ``"M1,M2,M3,S1,S2,S3"`` (per channel), a
    preset name (``imagenet``) or a ``(mean, std)`` pair, checked against ``channels``."""
    if spec is None:
        return None
    if isinstance(spec, str):
        text = spec.strip().lower()
        if text in NORMALIZE_PRESETS:
            mean, std = NORMALIZE_PRESETS[text]
        else:
            try:
                values = [float(v) for v in text.split(",")]
            except ValueError:
                raise DltestError(f"normalize {spec!r} must be MEAN,STD, per-channel M1,..,Mc,S1,..,Sc, or "
                                  f"{', '.join(NORMALIZE_PRESETS)}") from None
            if len(values) < 2 or len(values) % 2:
                raise DltestError(f"normalize {spec!r} needs as many means as standard deviations (MEAN,STD or "
                                  "M1,..,Mc,S1,..,Sc)")
            half = len(values) // 2
            mean, std = tuple(values[:half]), tuple(values[half:])
    else:
        try:
            mean, std = (tuple(float(v) for v in torch.as_tensor(part, dtype=torch.float64).flatten().tolist()) for part in spec)
        except (TypeError, ValueError):
            raise DltestError(f"normalize must be a (mean, std) pair, not {spec!r}") from None
    if len(mean) != len(std) or not all(math.isfinite(v) for v in mean + std) or not all(s > 0 for s in std):
        raise DltestError(f"normalize needs finite means and positive standard deviations, got mean {mean}, std {std}")
    if channels is not None and len(mean) not in (1, channels):
        raise DltestError(f"normalize gives {len(mean)} means, but the inputs have {channels} channels")
    return mean, std


class ModelAdapter(nn.Module):
    """Any image classifier as images in [0, 1] -> logit-like scores (batch, classes).

    - ``normalize=(mean, std)`` standardises the inputs first, for models trained on normalised
      images (as torchattacks' ``set_normalization_used`` and ART's ``preprocessing``): attacks
      and ``eps`` stay in [0, 1] pixel space.
    - Tuple, dict and ``.logits`` outputs become the score tensor (:func:`class_scores`).
    - A model that outputs probabilities gives their logarithm, one that outputs
      log-probabilities gives them unchanged: softmax of either is the model's own probabilities
      (softmax is never applied twice) and attacks get a logit-like view. The kind is detected on
      a probe batch (:func:`detect_output_kind`) unless given as ``output``.
    - ``embed(x)`` gives penultimate embeddings, found by :meth:`inspect` (``embedding_source``
      says where from): the model's ``embed(x)``; timm's ``forward_head(forward_features(x),
      pre_logits=True)``; else the input of ``get_classifier()`` or of the last ``nn.Linear``,
      caught by a forward hook. ``head`` is that final linear layer when the scores are exactly
      ``head(embed(x))`` (checked on the probe), which lets MC dropout sample the head alone.
    """

    def __init__(self, model: nn.Module, *, normalize: Any = None, output: str | None = None) -> None:
        super().__init__()
        if output is not None and output not in OUTPUT_KINDS:
            raise DltestError(f"output must be one of {', '.join(OUTPUT_KINDS)}, not {output!r}")
        self.model = model
        self.training = model.training  # a new module starts in train mode; take the model's
        self.normalization = parse_normalize(normalize)
        if self.normalization is not None:
            mean, std = self.normalization
            self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
            self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.output_kind = output
        # Set by inspect(): how to get embeddings ("embed", "timm", "hook" or None), the module
        # whose input is the embedding (for "hook") and the verified final linear layer (names
        # inside ``model``, so a deep copy of the adapter refers to its own copy of the model).
        self.embedding_kind: str | None = None
        self.hook_name: str | None = None
        self.head_name: str | None = None
        self.inspected = False

    def __getattr__(self, name: str) -> Any:
        """Attributes the adapter does not have come from the wrapped model (e.g. an ONNX model's
        ``fixed_batch``), so the adapter stands in for it."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model" or (name.startswith("__") and name.endswith("__")):
                raise  # protocols (__deepcopy__, __getstate__) are the adapter's own: a copy stays an adapter
            return getattr(super().__getattr__("model"), name)

    @property
    def has_gradients(self) -> bool:
        """False for a wrapped model nothing can differentiate through (an ONNX model)."""
        return getattr(self.model, "has_gradients", True)

    # -- scores --------------------------------------------------------------------------------
    def prepare(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std if self.normalization is not None else x

    def raw_scores(self, x: Tensor) -> Tensor:
        """The wrapped model's own scores for images in [0, 1] (after the normalisation)."""
        return class_scores(self.model(self.prepare(x)))

    def to_logits(self, scores: Tensor) -> Tensor:
        if self.output_kind is None:
            self.output_kind = detect_output_kind(scores)
        if self.output_kind == "probabilities":
            return scores.float().clamp_min(_TINY).log()
        return scores

    def forward(self, x: Tensor) -> Tensor:
        if self.head_name is not None and self.output_kind != "logits":
            # probabilities from a verified final linear layer: its outputs are the logits (no
            # log of rounded or underflowed probabilities, exact gradients for attacks)
            return self.scores_and_embeddings(x)[0]
        return self.to_logits(self.raw_scores(x))

    # -- embeddings ----------------------------------------------------------------------------
    @property
    def embedding_source(self) -> str | None:
        """Where the embeddings come from, in words (None: the model gives none)."""
        if self.embedding_kind == "embed":
            return "the model's embed()"
        if self.embedding_kind == "timm":
            return "forward_head(forward_features(x), pre_logits=True)"
        if self.embedding_kind == "hook":
            return f"the input of layer {self.hook_name!r}"
        return None

    @property
    def head(self) -> nn.Module | None:
        return _submodule(self.model, self.head_name) if self.head_name is not None else None

    def inspect(self, probe: Tensor) -> "ModelAdapter":
        """Detect the output kind and how to get embeddings, on a probe batch (>= 2 inputs)."""
        with eval_mode(self), torch.no_grad():  # every module's mode restored after
            scores = self.raw_scores(probe)
            if self.output_kind is None:
                self.output_kind = detect_output_kind(scores)
            logits = self.to_logits(scores)
            for kind, hook_name, head_name in self._candidates():
                self.embedding_kind, self.hook_name = kind, hook_name
                try:
                    z = self.embed(probe)
                    ok = z.ndim == 2 and len(z) == len(probe)
                except Exception:  # noqa: BLE001 - a candidate that does not run is not the one
                    ok = False
                if not ok:
                    self.embedding_kind = self.hook_name = None
                    continue
                if head_name is not None:
                    head = _submodule(self.model, head_name)
                    self.head_name = head_name if _same_scores(head(z), logits) else None
                break
        self.inspected = True
        return self

    def _candidates(self) -> Iterator[tuple[str, str | None, str | None]]:
        """(embedding kind, hooked layer, final linear layer) to try, best first."""
        m = self.model
        names = {id(mod): name for name, mod in m.named_modules()}
        if callable(getattr(m, "embed", None)) and not isinstance(m.embed, nn.Embedding):
            yield "embed", None, "head" if _is_linear(getattr(m, "head", None)) else None
        classifier = m.get_classifier() if callable(getattr(m, "get_classifier", None)) else None
        classifier_name = names.get(id(classifier)) if isinstance(classifier, nn.Module) else None
        if callable(getattr(m, "forward_features", None)) and callable(getattr(m, "forward_head", None)):
            yield "timm", None, classifier_name if _is_linear(classifier) else None
        if isinstance(m, torch.jit.ScriptModule):
            return  # forward hooks cannot be registered on TorchScript modules
        if classifier_name and not isinstance(classifier, nn.Identity):
            yield "hook", classifier_name, classifier_name if _is_linear(classifier) else None
        linears = [name for name, mod in m.named_modules() if isinstance(mod, nn.Linear)]
        if linears:
            yield "hook", linears[-1], linears[-1]

    def embed(self, x: Tensor) -> Tensor:
        """Penultimate embeddings (batch, d) of images in [0, 1]."""
        m = self.model
        if self.embedding_kind == "embed":
            return m.embed(self.prepare(x))
        if self.embedding_kind == "timm":
            return m.forward_head(m.forward_features(self.prepare(x)), pre_logits=True)
        if self.embedding_kind == "hook":
            return self.scores_and_embeddings(x)[1]  # type: ignore[return-value]
        raise DltestError(embedding_help(self))

    def scores_and_embeddings(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """Logit-like scores and embeddings of one batch, from one forward pass."""
        if self.embedding_kind is None:
            return self.to_logits(self.raw_scores(x)), None
        if self.embedding_kind == "hook":
            caught: list[Tensor] = []
            layer = _submodule(self.model, self.hook_name)
            handle = layer.register_forward_pre_hook(lambda _m, args: caught.append(args[0]))
            try:
                scores = self.to_logits(self.raw_scores(x))
            finally:
                handle.remove()
            if not caught:
                raise DltestError(f"layer {self.hook_name!r} did not run in the forward pass: no embeddings")
            z = caught[-1].flatten(1)
        else:
            z = self.embed(x)
            scores = None
        head = self.head
        if head is not None:
            return head(z), z
        return (scores if scores is not None else self.to_logits(self.raw_scores(x))), z


def _submodule(model: nn.Module, name: str) -> nn.Module:
    """``model.get_submodule(name)``, also for TorchScript modules (which lack it)."""
    for part in name.split(".") if name else []:
        model = getattr(model, part)
    return model


def _is_linear(module: Any) -> bool:
    return isinstance(module, nn.Linear) or (
        isinstance(module, torch.jit.ScriptModule) and getattr(module, "original_name", None) == "Linear"
    )


def _same_scores(head_out: Tensor, logits: Tensor) -> bool:
    """Whether ``head_out`` are the model's scores up to a per-row shift (equal log-softmax)."""
    if head_out.shape != logits.shape:
        return False
    return torch.allclose(torch.log_softmax(head_out.double(), 1), torch.log_softmax(logits.double(), 1),
                          rtol=1e-4, atol=1e-4)


def embedding_help(model: nn.Module) -> str:
    """One line: why there are no embeddings for ``model`` and what to pass."""
    inner = model.model if isinstance(model, ModelAdapter) else model
    if isinstance(inner, torch.jit.ScriptModule):
        return ("no penultimate embeddings: this TorchScript model has no `embed` method; script a model with "
                "`embed(x)` and `head` (mark embed with @torch.jit.export), or load its state_dict with its "
                "architecture (arch)")
    return ("no penultimate embeddings: the model has no `embed`/`head`, no forward_features/forward_head, "
            "no get_classifier() and no nn.Linear; give it an `embed(x)` method returning (batch, d) features")


def adapt(model: nn.Module, probe: Tensor | None = None, *, normalize: Any = None,
          output: str | None = None) -> nn.Module:
    """``model`` as dltest uses it: a zoo :class:`~dltest.zoo.Classifier` (or a ready adapter)
    unchanged, anything else wrapped in a :class:`ModelAdapter`, inspected on ``probe``."""
    from dltest.zoo import Classifier

    if isinstance(model, ModelAdapter):
        if normalize is not None and parse_normalize(normalize) != model.normalization:
            raise DltestError("the model already has a normalisation; pass normalize once")
        adapter = model
    elif type(model) is Classifier and normalize is None and output in (None, "logits"):
        return model
    else:
        adapter = ModelAdapter(model, normalize=normalize, output=output)
    if probe is not None and not adapter.inspected:
        adapter.inspect(probe.to(next(iter(adapter.parameters()), probe).device))
    return adapter


def unwrap(model: nn.Module) -> nn.Module:
    """The user's own model inside an adapter (for saving it as it came)."""
    return model.model if isinstance(model, ModelAdapter) else model


def output_kind(model: nn.Module) -> str:
    """``logits``, ``probabilities`` or ``log-probabilities``: what ``model`` itself outputs."""
    return (model.output_kind or "logits") if isinstance(model, ModelAdapter) else "logits"


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
