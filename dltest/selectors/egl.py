"""EGL: expected gradient length (SPEC §1, "EGL").

score(x) = sum_i p_i(x) * || grad_theta CE(f(x), i) ||_2, over every possible label i, with the
gradient taken with respect to the model's **trainable parameters** (not the input), for the
per-sample loss of x alone (no batch mean).

The exact variant needs no Python loop per input or per label: with J the Jacobian of the C logits
with respect to the parameters (per sample, from ``torch.func``: ``vmap(jacrev(functional_call))``),
the gradient of the cross-entropy for label i is exactly J^T (p - e_i). So one vectorised Jacobian
per chunk of inputs gives all C gradients, and their norms are summed over all parameter tensors.

The ``last-layer`` variant (named as such, never a silent substitute) takes the gradient with
respect to the final linear layer only, which has a closed form from the cached embeddings z and
probabilities p: dW = (p - e_i) z^T and db = p - e_i, so ||g_i||^2 = ||p - e_i||^2 (||z||^2 + 1).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev, vmap

from dltest.errors import DltestError
from dltest.adapter import embedding_head
from dltest.progress import progress_bar
from dltest.runtime import eval_mode, on_device
from dltest.selectors.base import Candidates, ScoreSelector, register

VARIANTS = ("exact", "last-layer")
JACOBIAN_FLOATS = 2**24  # float elements of one chunk's Jacobian (64 MB), bounds the chunk size


def label_residuals(probs: Tensor) -> Tensor:
    """(n, C labels, C classes): row i of input b is p_b - e_i, the logit gradient of CE(., i)."""
    n, c = probs.shape
    return probs.unsqueeze(1) - torch.eye(c, dtype=probs.dtype, device=probs.device).unsqueeze(0)


def egl_from_squared_norms(probs: Tensor, squared: Tensor) -> Tensor:
    """sum_i p_i ||g_i|| from the squared gradient norm of every label (n, C)."""
    return (probs * squared.clamp_min(0).sqrt()).sum(dim=1)


def egl_exact(model: nn.Module, images: Tensor, chunk: int | None = None) -> Tensor:
    """Exact EGL of a batch of images (n, ...) on the model's device, in eval mode; returns (n,) float64."""
    named = dict(model.named_parameters())
    trainable = {k: v.detach() for k, v in named.items() if v.requires_grad}
    if not trainable:
        raise DltestError("egl: the model has no trainable parameters")
    frozen = {k: v.detach() for k, v in named.items() if not v.requires_grad}
    buffers = dict(model.named_buffers())

    def logits(params: dict[str, Tensor], x: Tensor) -> tuple[Tensor, Tensor]:
        out = functional_call(model, (params, frozen, buffers), (x.unsqueeze(0),))[0]
        return out, out

    # torch.func cannot swap the parameters of TorchScript modules: their per-sample Jacobians
    # come from one batched backward pass instead (exact in eval mode, where inputs don't interact).
    scripted = any(isinstance(m, torch.jit.ScriptModule) for m in model.modules())
    per_sample = vmap(jacrev(logits, has_aux=True), in_dims=(None, 0))

    def jacobians(x: Tensor) -> tuple[dict[str, Tensor], Tensor]:
        return _batched_backward_jacobians(model, x) if scripted else per_sample(trainable, x)

    n_params = sum(v.numel() for v in trainable.values())
    scores = []
    with eval_mode(model):
        with torch.no_grad():
            c = model(images[:1]).shape[1]
        chunk = chunk or max(1, JACOBIAN_FLOATS // (c * n_params))
        for s in range(0, len(images), chunk):
            jac, out = jacobians(images[s : s + chunk])
            probs = torch.softmax(out.detach().double(), dim=1)
            residual = label_residuals(probs)  # (B, C labels, C classes)
            squared = torch.zeros(probs.shape, dtype=torch.float64, device=probs.device)
            for j in jac.values():
                g = torch.einsum("bic,bcp->bip", residual, j.detach().flatten(2).double())
                squared += g.pow(2).sum(dim=2)
            scores.append(egl_from_squared_norms(probs, squared).cpu())
    return torch.cat(scores)


def _batched_backward_jacobians(model: nn.Module, images: Tensor) -> tuple[dict[str, Tensor], Tensor]:
    """Per-sample Jacobians {name: (B, C, *shape)} of the logits w.r.t. the trainable parameters,
    from one forward pass and one backward pass batched over the B*C one-hot output gradients."""
    params = {k: v for k, v in model.named_parameters() if v.requires_grad}
    with torch.enable_grad():
        out = model(images.detach())
        b, c = out.shape
        one_hot = torch.eye(b * c, dtype=out.dtype, device=out.device).view(b * c, b, c)
        grads = torch.autograd.grad(out, list(params.values()), one_hot, is_grads_batched=True, allow_unused=True)
    jac = {name: (g if g is not None else torch.zeros((b * c, *p.shape), device=p.device)).view(b, c, *p.shape)
           for (name, p), g in zip(params.items(), grads)}
    return jac, out.detach()


def egl_last_layer(embeddings: Tensor, logits: Tensor, head: nn.Linear, chunk: int = 8192) -> Tensor:
    """EGL over the final linear layer's trainable parameters, in closed form; (n,) float64.

    The probabilities come from the logits in float64: in float32, p_y - 1 of a confident input
    keeps too few digits."""
    weight = head.weight.requires_grad
    bias = head.bias is not None and head.bias.requires_grad
    if not (weight or bias):
        raise DltestError("last-layer egl: the final linear layer has no trainable parameters")
    z2 = embeddings.double().pow(2).sum(dim=1) if weight else torch.zeros(len(embeddings), dtype=torch.float64)
    factor = z2 + (1.0 if bias else 0.0)
    scores = []
    for s in range(0, len(logits), chunk):
        p = torch.softmax(logits[s : s + chunk].double(), dim=1)
        residual_sq = label_residuals(p).pow(2).sum(dim=2)  # ||p - e_i||^2, (B, C)
        scores.append(egl_from_squared_norms(p, residual_sq * factor[s : s + chunk, None]))
    return torch.cat(scores)


@register
class EGL(ScoreSelector):
    name = "egl"
    summary = "EGL: highest expected norm of the parameter gradient, sum_i p_i ||grad CE(x, i)||"
    score_name = "expected gradient length"
    needs_model = True

    def __init__(self, variant: str = "exact"):
        if variant not in VARIANTS:
            raise DltestError(f"egl variant must be one of {', '.join(VARIANTS)}, not {variant!r}")
        self.variant = variant

    def score(self, candidates: Candidates) -> Tensor:
        model = candidates.model
        if model is None:
            raise DltestError("egl needs the model")
        if self.variant == "last-layer":
            split = embedding_head(model)
            if split is None or candidates.outputs.embeddings is None:
                why = "last-layer egl needs a model split into embed + final linear head (every zoo model is); use "
                raise DltestError(why + "variant='exact'", cli=why + "--egl-variant exact")
            return egl_last_layer(candidates.outputs.embeddings, candidates.outputs.logits, split[1])
        if candidates.data is None:
            raise DltestError("exact egl needs the pool's images")
        parts = []
        with on_device(model, candidates.device), \
                progress_bar("egl", total=len(candidates.data), enabled=candidates.progress) as advance:
            for s in range(0, len(candidates.data), 1024):
                parts.append(egl_exact(model, candidates.data.images(slice(s, s + 1024), candidates.device)))
                advance(len(parts[-1]))
        return torch.cat(parts)
