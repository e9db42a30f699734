"""Outside models as dltest reads them: one adapter gives every command logits and embeddings.

:class:`ModelAdapter` wraps any image classifier (tuple/dict/``.logits`` outputs, probabilities,
normalised inputs) so that it maps images in [0, 1] to logit-like scores and, where it can be
found, penultimate embeddings; :func:`adapt` wraps and inspects a model once, and
:func:`check_fits` fails with one line when a model cannot classify a dataset.

:func:`prepared` is the one way a dltest function gets a model ready to run on a dataset: device
resolved, outside model adapted, fit checked, moved, eval mode, and the caller's model put back
as it was on exit. (It is also :func:`dltest.runtime.prepared`, where the other context
managers live; it is defined here, on the model floor, because it needs the adapter.)
"""

from __future__ import annotations

import contextlib
import math
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from dltest.data import BUILTINS, ImageDataset
from dltest.errors import DltestError, first_line
from dltest.runtime import eval_mode, on_device, resolve_device
from dltest.zoo import Classifier

if TYPE_CHECKING:
    from dltest.checkpoint import ModelInfo

PROBE_SIZE = 8  # inputs on which an outside model's output kind and embeddings are detected

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
        return embedding_candidates(self.model)

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


def embedding_candidates(m: nn.Module) -> Iterator[tuple[str, str | None, str | None]]:
    """(embedding kind, hooked layer, final linear layer) to try on ``m``, best first; found
    without running it."""
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


def may_give_embeddings(model: nn.Module) -> bool:
    """Whether ``model`` can give penultimate embeddings, decided without running it: a zoo model
    (embed/head), an inspected adapter that found them, or any model with a place to find them
    (``embed``, timm's forward_features/forward_head, a classifier or an ``nn.Linear``)."""
    if isinstance(model, ModelAdapter):
        return model.embedding_kind is not None if model.inspected else any(embedding_candidates(model.model))
    return embedding_head(model) is not None or any(embedding_candidates(model))


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


def embedding_head(model: nn.Module) -> tuple[Callable[[Tensor], Tensor], nn.Module] | None:
    """(embed, head) for a model whose scores are ``head(embed(x))`` with ``head`` a final linear
    layer (every zoo model; an adapted model where that was checked), else None."""
    if isinstance(model, ModelAdapter):
        return (model.embed, model.head) if model.head is not None else None
    embed, head = getattr(model, "embed", None), getattr(model, "head", None)
    if callable(embed) and isinstance(head, nn.Linear):
        return embed, head  # type: ignore[return-value]
    return None


def check_fits(model: nn.Module, data: ImageDataset, info: ModelInfo | None = None) -> nn.Module:
    """Fail with one line when ``model`` cannot classify ``data`` (input shape, class count,
    non-finite outputs); return it ready for dltest (outside models adapted and inspected on a
    probe of ``data``: output kind, embeddings)."""
    name = info.source if info else "model"
    if info and info.input_shape and tuple(info.input_shape) != tuple(data.input_shape):
        raise DltestError(
            f"{name} takes inputs of shape {tuple(info.input_shape)}, but {data.name} has {tuple(data.input_shape)}"
        )
    if len(data) == 0:
        raise DltestError(f"{data.name} holds no inputs")
    probe = data.images(slice(0, PROBE_SIZE))
    try:
        device = next(iter(model.parameters()), probe).device
        model = adapt(model, probe.to(device))
        with eval_mode(model), torch.inference_mode():  # every module's mode restored after
            out = model(probe.to(device))
    except DltestError:
        raise
    except Exception as exc:
        raise DltestError(f"{name} cannot take {data.name} inputs of shape {tuple(data.input_shape)} ({first_line(exc)})") from None
    if out.ndim != 2:
        raise DltestError(f"{name} must output (batch, classes) scores, got shape {tuple(out.shape)}")
    if not torch.isfinite(out).all():
        why = (f"{name} gives NaN or infinite outputs on the first {len(probe)} inputs of {data.name}; check its "
               "weights and the input range it expects ")
        raise DltestError(why + "(normalize=)", cli=why + "(--normalize)")
    exact = data.name in BUILTINS  # a user file may lack some classes in its labels
    if out.shape[1] < data.num_classes or (exact and out.shape[1] != data.num_classes):
        raise DltestError(f"{name} outputs {out.shape[1]} classes, but {data.name} has {data.num_classes}")
    if info is not None:
        info.outputs = output_kind(model)
        info.embeddings = (model.embedding_source if isinstance(model, ModelAdapter)
                           else "embed/head" if embedding_head(model) else None)
    if info is not None and info.num_classes is None:
        info.num_classes = int(out.shape[1])
    if info is not None and info.input_shape is None:
        info.input_shape = tuple(data.input_shape)
    return model


_PREPARED: dict[int, int] = {}  # id of a model inside a prepared() block -> how many blocks hold it


@contextlib.contextmanager
def prepared(model: nn.Module, data: ImageDataset, device: str | torch.device | None = None, *,
             info: ModelInfo | None = None, check: bool = True) -> Iterator[nn.Module]:
    """``model`` ready to run on ``data`` inside the block; the caller's model as it was after.

    The one way dltest prepares a model: the device resolved (:func:`~dltest.runtime.resolve_device`),
    an outside model adapted (tuple/dict/``.logits`` outputs, probabilities, TorchScript, ONNX:
    :func:`adapt`, probed on ``data``), checked to fit ``data`` (:func:`check_fits`, one line when
    it does not; ``check=False`` only adapts, for the per-epoch passes of a training loop), moved
    to the device and put in eval mode. On exit, also on an exception, the model is back on its
    device and every module in its mode. Yields the model to run (an adapter for outside models).

    Blocks nest: a model already inside a block (a workflow that prepared it and then calls
    :func:`~dltest.inference.infer`) is not checked again.
    """
    device = resolve_device(device)
    inside = id(model) in _PREPARED
    with eval_mode(model):  # the caller's modes, saved before the fit check runs its probe
        if check and not inside:
            ready = check_fits(model, data, info)
        else:
            ready = adapt(model, data.images(slice(0, PROBE_SIZE))) if len(data) else model
        with on_device(ready, device), eval_mode(ready):
            _PREPARED[id(ready)] = _PREPARED.get(id(ready), 0) + 1
            try:
                yield ready
            finally:
                _PREPARED[id(ready)] -= 1
                if not _PREPARED[id(ready)]:
                    del _PREPARED[id(ready)]


def trainable(model: nn.Module, data: ImageDataset, device: str | torch.device | None = None) -> nn.Module:
    """``model`` moved to the resolved device and read as :func:`prepared` reads it (adapted, probed
    on ``data``), for a training loop that keeps the model there and sets train mode itself.
    Returns the scorer to call (the adapter of an outside model; the model itself otherwise)."""
    device = resolve_device(device)
    model.to(device)
    return adapt(model, data.images(slice(0, PROBE_SIZE), device)) if len(data) else model
