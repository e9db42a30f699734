"""``select``: the Python API behind ``dltest select``.

model + pool -> one inference pass -> a registered selector -> a :class:`SelectionResult`
that knows its seed, budget and options and writes itself as JSON.
"""

from __future__ import annotations

import contextlib
import math
from collections import Counter
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from dltest._version import __version__
from dltest.adapter import embedding_help, may_give_embeddings, prepared
from dltest.budget import check_budget, parse_budget
from dltest.data import ImageDataset
from dltest.errors import DltestError
from dltest.inference import INFERENCE_BATCH, PoolOutputs, infer
from dltest.io import read_json, write_json
from dltest.selectors import REGISTRY, Candidates, Selector, get_selector
from dltest.selectors.base import ProbabilityOutputs
from dltest.runtime import MAX_TORCH_SEED, broadcast_object, check_seed, is_main, resolve_device, single_process, world_size


@dataclass
class SelectionResult:
    """A selection, with everything needed to reproduce it.

    ``indices`` are positions in the pool (the dataset split as loaded), distinct, in selection
    order; ``scores[i]`` is the metric's score of ``indices[i]`` where the metric has one.
    """

    metric: str
    budget: int
    budget_spec: str
    pool_size: int
    seed: int | None
    indices: list[int]
    scores: list[float | None] | None = None
    score_name: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    dataset: str | None = None
    split: str | None = None
    model: str | None = None
    labeled: int = 0
    predicted_counts: dict[str, int] = field(default_factory=dict)
    label_counts: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    dltest_version: str = __version__
    command: str = "dltest select"
    model_info: dict[str, Any] | None = None  # how the model was loaded and read (ModelInfo.describe)

    def to_dict(self) -> dict[str, Any]:
        fields = asdict(self)
        return {"command": fields.pop("command"), "dltest_version": fields.pop("dltest_version"),
                "seed": fields.pop("seed"), **fields}

    def save(self, path: str) -> None:
        """Write the selection as JSON, atomically."""
        write_json(path, self.to_dict())

    @property
    def tensor(self) -> Tensor:
        return torch.tensor(self.indices, dtype=torch.long)


def select(
    metric: str,
    budget: int | str,
    *,
    model: nn.Module | None = None,
    data: ImageDataset | None = None,
    outputs: PoolOutputs | Tensor | None = None,
    seed: int = 0,
    labeled: Sequence[int] | Tensor | None = None,
    device: str | torch.device | None = None,
    batch_size: int = INFERENCE_BATCH,
    progress: bool = False,
    model_name: str | None = None,
    reference: ImageDataset | None = None,
    **options: Any,
) -> SelectionResult:
    """Select ``budget`` inputs of a pool with the metric (acquisition function) ``metric``.

    The pool is ``data`` (with ``model``), or precomputed ``outputs`` (a :class:`PoolOutputs` or a
    probability matrix) for the selectors that need no model. ``budget`` is a count or a
    percentage string (``"4%"``). ``labeled`` are pool positions already labeled: they are never
    selected, and core-set starts its centers from them. ``reference`` is the training data, for
    the selectors that compare with it (``dsa``, ``lsa``, ``mdsa``). ``options`` go to the selector
    (e.g. ``samples=10`` for ``bald``; ``sampling="power"`` for any score-based one).
    """
    started = time.perf_counter()
    selector = check_request(metric, budget, seed=seed, device=device, reference=reference is not None, **options)
    device = resolve_device(device)
    if outputs is None and (model is None or data is None):
        raise DltestError("select needs either model and data, or precomputed outputs")
    if selector.needs_model and (model is None or data is None):
        raise DltestError(f"metric {metric!r} runs the model again: pass model and data")
    if model is not None:
        check_model_fits_metric(selector, model, outputs)
    if data is not None:  # a bad budget or labeled set fails before the pool is run through the model
        parse_budget(budget, len(_complement(_labeled_positions(labeled, len(data)), len(data))))
    # the selectors that run the model again find it prepared on ``device``; the caller's model stays as it was
    ready = prepared(model, data, device) if model is not None and data is not None else contextlib.nullcontext(model)
    with ready as model:
        if outputs is None:
            outputs = infer(model, data, batch_size=batch_size, device=device, progress=progress)
        elif isinstance(outputs, Tensor):
            outputs = ProbabilityOutputs.of(outputs)  # scored from the given values, exactly
        n = len(outputs)
        if data is not None and len(data) != n:
            raise DltestError(f"outputs cover {n} inputs but the pool has {len(data)}")
        if selector.needs_embeddings and outputs.embeddings is None:
            raise DltestError(f"{metric}: " + (embedding_help(model) if model is not None else
                                                "pass the model, or outputs with embeddings"))
        labeled_t = _labeled_positions(labeled, n)
        unlabeled = _complement(labeled_t, n)
        budget_int = parse_budget(budget, len(unlabeled))
        candidates = Candidates(
            outputs=_subset_outputs(outputs, unlabeled),
            model=model,
            data=(data if len(unlabeled) == n else data.subset(unlabeled)) if data is not None else None,
            labeled_embeddings=(
                outputs.embeddings[labeled_t] if outputs.embeddings is not None and len(labeled_t) else None
            ),
            device=device,
            progress=progress,
            reference=reference,
        )
        generator = torch.Generator().manual_seed(seed)
        if selector.needs_mc_samples or world_size() == 1:
            # MC-dropout sampling is sharded across ranks: every rank takes part, with the same
            # gathered samples and seed, so every rank computes the same selection
            chosen = selector(candidates, budget_int, generator)
        else:  # under torchrun the selector runs once, on rank 0, and the others receive its choice
            with single_process():
                chosen = selector(candidates, budget_int, generator) if is_main() else None
            chosen = broadcast_object(chosen)
    indices = unlabeled[chosen.indices]
    if len(indices) != budget_int or len(torch.unique(indices)) != budget_int:
        raise RuntimeError(f"selector {metric} returned {len(indices)} positions for a budget of {budget_int}")

    preds = outputs.predictions[indices]
    classes = data.classes if data is not None else None
    return SelectionResult(
        metric=metric,
        budget=budget_int,
        budget_spec=str(budget),
        pool_size=n,
        seed=seed,
        indices=indices.tolist(),
        scores=_finite_or_none(chosen.scores),
        score_name=selector.score_name,
        options=selector.options(),
        dataset=data.name if data is not None else None,
        split=data.split if data is not None else None,
        model=model_name,
        labeled=len(labeled_t),
        predicted_counts=_counts(preds, classes),
        label_counts=_counts(data.y[indices], classes) if data is not None and data.labeled else {},
        seconds=round(time.perf_counter() - started, 4),
    )


def check_request(metric: str, budget: int | str, *, seed: int = 0, device: str | torch.device | None = None,
                  reference: bool | None = None, **options: Any) -> Selector:
    """The arguments of :func:`select` that need neither the pool nor the model, checked before
    any loading or model pass (``dltest select`` calls it before it loads anything): the metric
    and its options, the budget's syntax, the seed, the device, and whether the metric takes
    ``reference`` (given or not; None: not known yet). Returns the selector."""
    selector = get_selector(metric, **options)
    check_budget(budget)
    check_seed(seed, maximum=MAX_TORCH_SEED)
    resolve_device(device)
    if reference is True and not selector.needs_reference:
        why = "apply to the metrics that compare with the training data (dsa, lsa, mdsa), not to " + repr(metric)
        raise DltestError(f"reference= and its options {why}", cli=f"--reference-split and --reference {why}")
    if reference is False and selector.needs_reference:
        raise DltestError(f"metric {metric!r} compares with the training data: pass reference= "
                          "(dltest select --reference-split train, or --reference FILE)",
                          cli=f"metric {metric!r} compares with the data the model was trained on: pass "
                          "--reference-split train (or --reference FILE)")
    return selector


def check_model_fits_metric(selector: Selector, model: nn.Module, outputs: PoolOutputs | Tensor | None = None) -> None:
    """What a metric needs of the model, decided without running it: gradients (not an ONNX
    model) for the metrics that run it again, a place to find embeddings for those that use them."""
    metric = selector.name
    if selector.needs_model and not getattr(model, "has_gradients", True):
        usable = ", ".join(name for name, cls in REGISTRY.items() if not cls.needs_model and not cls.needs_embeddings)
        raise DltestError(f"metric {metric!r} runs the model again (gradients or dropout), which an ONNX model "
                          f"does not allow; metrics that work on ONNX models: {usable}")
    given = getattr(outputs, "embeddings", None) is not None
    if selector.needs_embeddings and not given and not may_give_embeddings(model):
        raise DltestError(f"{metric}: " + embedding_help(model))


MAX_POOL = 2**40  # no pool is larger; a position beyond is a malformed file (and overflows int64 at 2**63)


def load_selection(path: str, data: ImageDataset | None = None) -> SelectionResult:
    """Read a selection JSON; with ``data``, check it was made on that dataset and split."""
    raw = read_json(path)
    known = SelectionResult.__dataclass_fields__
    if not isinstance(raw, dict) or "indices" not in raw:
        raise DltestError(f"{path} is not a dltest selection file (no 'indices')")
    indices = raw["indices"]
    if not isinstance(indices, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in indices):
        raise DltestError(f"{path}: 'indices' must be a list of integers (not booleans, floats or strings)")
    if len(set(indices)) != len(indices):
        repeated = Counter(indices).most_common(1)[0][0]
        raise DltestError(f"{path}: 'indices' repeats an input ({repeated}); a selection holds each input once")
    out_of_range = [i for i in indices if not 0 <= i < MAX_POOL]
    if out_of_range:
        raise DltestError(f"{path}: index {out_of_range[0]} is not a pool position (0 <= index < {MAX_POOL})")
    for name in ("dataset", "split", "model", "metric", "budget_spec"):
        if raw.get(name) is not None and not isinstance(raw[name], str):
            raise DltestError(f"{path}: {name!r} must be a string, got {raw[name]!r:.40}")
    defaults = {"metric": "unknown", "budget": len(indices), "budget_spec": str(len(indices)),
                "pool_size": len(data) if data is not None else 0, "seed": None}
    result = SelectionResult(**{**defaults, **{k: v for k, v in raw.items() if k in known}})
    if data is not None:
        if result.dataset and result.dataset != data.name:
            raise DltestError(f"{path} selects from dataset {result.dataset!r}, not {data.name!r}")
        if result.split and result.split != data.split:
            raise DltestError(f"{path} selects from split {result.split!r}, not {data.split!r}")
        bad = [i for i in result.indices if not 0 <= int(i) < len(data)]
        if bad:
            raise DltestError(f"{path} holds indices outside the pool of {len(data)}: {bad[:5]}")
    return result


def _finite_or_none(scores: Tensor | None) -> list[float | None] | None:
    """Scores as plain floats; +-inf and NaN (e.g. DFAL's never-flipped inputs) become None (JSON null)."""
    if scores is None:
        return None
    return [v if math.isfinite(v) else None for v in scores.double().tolist()]


def _labeled_positions(labeled: Sequence[int] | Tensor | None, n: int) -> Tensor:
    if labeled is None:
        return torch.empty(0, dtype=torch.long)
    t = torch.as_tensor(labeled, dtype=torch.long).flatten().unique()
    if len(t) and (t.min() < 0 or t.max() >= n):
        bad = t[(t < 0) | (t >= n)][:5].tolist()
        raise DltestError(f"labeled indices outside the pool of {n}: {bad}")
    return t


def _complement(labeled: Tensor, n: int) -> Tensor:
    keep = torch.ones(n, dtype=torch.bool)
    keep[labeled] = False
    return torch.nonzero(keep).flatten()


def _subset_outputs(outputs: PoolOutputs, positions: Tensor) -> PoolOutputs:
    if len(positions) == len(outputs):
        return outputs
    if isinstance(outputs, ProbabilityOutputs):
        return outputs.subset(positions)
    return PoolOutputs(
        logits=outputs.logits[positions],
        embeddings=outputs.embeddings[positions] if outputs.embeddings is not None else None,
        _probs=outputs._probs[positions] if outputs._probs is not None else None,
    )


def _counts(labels: Tensor, classes: list[str] | None) -> dict[str, int]:
    values, counts = torch.unique(labels, return_counts=True)
    return {(classes[v] if classes and v < len(classes) else str(v)): int(c) for v, c in zip(values.tolist(), counts.tolist())}
