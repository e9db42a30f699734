"""One inference pass over a pool: logits, probabilities and penultimate embeddings, cached.

Selectors consume these outputs; only the ones that must (MC dropout, EGL, DFAL) run the
model again.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from dltest.data import ImageDataset
from dltest.errors import DltestError
from dltest.progress import progress_bar
from dltest.settings import default_device

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

    An outside model goes through :func:`adapt` (tuple/dict/``.logits`` outputs, probabilities).
    Non-finite outputs are a one-line error naming the first such input.
    """
    device = default_device(device)
    if len(data) == 0:
        raise DltestError("cannot run inference on an empty pool")
    model = adapt(model.to(device), data.images(slice(0, PROBE_SIZE), device)).eval()
    split = embedding_head(model) if embeddings and not isinstance(model, ModelAdapter) else None
    n = len(data)
    logits: Tensor | None = None
    feats: Tensor | None = None
    with progress_bar("inference", total=n, enabled=progress) as advance:
        for start in range(0, n, batch_size):
            x = data.images(slice(start, start + batch_size), device)
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
                    feats = torch.empty((n, z.shape[1]), dtype=torch.float32)
                feats[start : start + len(x)] = z.float()
            if logits is None:
                logits = torch.empty((n, out.shape[1]), dtype=torch.float32)
            logits[start : start + len(x)] = out.float()
            advance(len(x))
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
        was_training = self.training
        self.eval()
        with torch.no_grad():
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
        self.train(was_training)
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
                "`embed(x)` and `head` (mark embed with @torch.jit.export), or pass the state_dict with --arch")
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
