"""The one trainer: standard training, and adversarial training (PGD, FGSM-RS, N-FGSM, TRADES).

The best epoch is chosen on the validation data (clean accuracy, or robust accuracy under a
PGD check when training adversarially), never among *degenerate* epochs: an epoch whose most
predicted class takes more of the validation inputs than halfway from that class's true share
to all of them (more than 55% on a balanced 10-class set) is near-constant, and a constant
predictor can win on robust accuracy (about 10%) against a model that learned something. A fall of that robust accuracy to less than half its
best after the eps warm-up is *catastrophic overfitting* (Wong et al. 2020; single-step
methods are prone to it): training stops there and keeps the best epoch. Every epoch is
checkpointed to ``state_path`` so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import time
from dataclasses import asdict, dataclass, field, is_dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dltest.adversarial_training import AdversarialTraining
from dltest.attacks import pgd_check
from dltest.data import ImageDataset, fingerprint
from dltest.errors import DltestError
from dltest.adapter import prepared, trainable
from dltest.progress import progress_bar
from dltest.resume import ResumeState
from dltest.runtime import MAX_TORCH_SEED, check_seed, data_parallel, stream_seed, gather, rank, resolve_device, seeded, shard_positions, world_size

# An adversary maps (model, images in [0, 1], labels) to perturbed images, model in eval mode.
Adversary = Callable[[nn.Module, Tensor, Tensor], Tensor]


@dataclass
class TrainConfig:
    """Hyper-parameters of one training run (all written into the checkpoint's metadata)."""

    epochs: int = 20
    batch_size: int = 128
    lr: float = 0.05
    optimizer: str = "sgd"  # "sgd" (Nesterov momentum) or "adam"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    augment: str = "none"  # "none", "crop", "crop-flip"
    seed: int = 0
    amp: bool = True  # mixed precision (bfloat16, else float16 with loss scaling), on CUDA only
    channels_last: bool = True  # channels_last memory format, on CUDA only

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise DltestError(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise DltestError(f"batch size must be >= 1, got {self.batch_size}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise DltestError(f"learning rate must be a finite number > 0, got {self.lr}")
        if self.optimizer not in ("sgd", "adam"):
            raise DltestError(f"unknown optimizer {self.optimizer!r}; choose sgd or adam")
        if self.augment not in ("none", "crop", "crop-flip"):
            raise DltestError(f"unknown augmentation {self.augment!r}; choose none, crop or crop-flip")
        check_seed(self.seed, maximum=MAX_TORCH_SEED)


@dataclass
class TrainResult:
    """The trained model (best epoch's weights) and how it got there."""

    model: nn.Module
    best_epoch: int
    best_score: float
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0
    stopped_early: str | None = None  # why training stopped before its last epoch

    @property
    def seconds_per_epoch(self) -> float:
        """Mean time of an epoch's training steps (validation excluded)."""
        times = [r["seconds"] for r in self.history if "seconds" in r]
        return sum(times) / len(times) if times else float("nan")

    def summary(self) -> dict[str, Any]:
        return {"best_epoch": self.best_epoch, "best_score": self.best_score, "history": self.history,
                "seconds": round(self.seconds, 2), "stopped_early": self.stopped_early}


def train(
    model: nn.Module,
    train_data: ImageDataset,
    val_data: ImageDataset | None = None,
    config: TrainConfig | None = None,
    *,
    adversary: AdversarialTraining | Adversary | None = None,
    val_adversary: Adversary | None = None,
    device: str | torch.device | None = None,
    state_path: str | os.PathLike | None = None,
    resume: bool = False,
    progress: bool = True,
) -> TrainResult:
    """Train ``model`` in place on ``train_data``; return it with its best validation epoch's weights.

    ``adversary`` is an :class:`AdversarialTraining` method (PGD, FGSM-RS, N-FGSM, TRADES, with
    an eps warm-up), or any ``(model, images, labels) -> images`` callable whose outputs replace
    the clean batch (Madry et al.: used even where the attack fails). When training
    adversarially the best epoch is the one with the highest robust accuracy on ``val_data``
    under ``val_adversary`` (default: :func:`~dltest.attacks.pgd_check`, a 10-step PGD at the
    training eps), and a collapse of that figure stops training (catastrophic overfitting).
    ``state_path`` keeps per-epoch state for ``resume``. torch's global random state is restored
    on return.

    On CUDA, ``config.amp`` runs the forward passes under autocast and ``config.channels_last``
    uses the channels_last memory format; on the CPU both are off.

    Under torchrun (:func:`dltest.runtime.distributed`) the model trains with
    DistributedDataParallel: every global batch (same order on every rank) is augmented as a
    whole from a seed of its own and split into contiguous rank shares; the loss is scaled so
    that DDP's averaged gradient is the gradient of the global batch's mean loss. What still
    depends on the rank count: float summation order, dropout masks and attack random starts
    (each rank draws its own), BatchNorm statistics (per rank share, rank 0's kept) and the
    final global batches smaller than the rank count (skipped). See docs/distributed.md.
    """
    config = config or TrainConfig()
    for data in (train_data, val_data):
        if data is not None:
            data.require_labels("train")
    method = adversary if isinstance(adversary, AdversarialTraining) else None
    if adversary is not None and val_adversary is None:
        val_adversary = pgd_check(method.eps if method else getattr(adversary, "eps", None))
    device = resolve_device(device)
    with seeded(config.seed, device):
        return _train(model, train_data, val_data, config, adversary, method, val_adversary, device, state_path,
                      resume, progress)


def _train(model, train_data, val_data, config, adversary, method, val_adversary, device, state_path, resume,
           progress) -> TrainResult:
    # the user's module trains (on the device, where it stays) and is saved; its scores are read as
    # every dltest function reads them (tuple, dict, .logits or probability outputs -> logits); a
    # zoo model is its own scorer
    scorer = trainable(model, train_data, device)
    fast = _CudaSpeedups(config, device)
    model = fast.prepare_model(model)
    optimizer = _optimizer(model, config)
    steps_per_epoch = math.ceil(len(train_data) / config.batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=config.lr, epochs=config.epochs, steps_per_epoch=steps_per_epoch, pct_start=0.15
    )
    partial = _partial(state_path, _settings(config, adversary, train_data, val_data, val_adversary))
    start_epoch, history, stopped = 0, [], None
    best_state, best_epoch, best_score = copy.deepcopy(model.state_dict()), -1, -1.0
    state = partial.load() if resume and partial is not None else None
    if state is not None:
        _check_partial(state, partial)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, history, stopped = state["epoch"] + 1, state["history"], state.get("stopped")
        best_state, best_epoch, best_score = state["best_model"], state["best_epoch"], state["best_score"]

    started = time.perf_counter()
    warmup = method.warmup_epochs if method else 0.0
    ranks = world_size()
    net = data_parallel(scorer, device)  # ``scorer`` itself where there is one process
    for epoch in range(start_epoch, config.epochs):
        if stopped:
            break
        torch.manual_seed(stream_seed(config.seed * 1000 + epoch + 7919 * rank()))  # dropout, random starts: same stream when resumed
        order = torch.randperm(len(train_data), generator=torch.Generator().manual_seed(stream_seed(config.seed * 1000 + epoch)))
        loss_sum, correct, seen = 0.0, 0, 0
        epoch_started = time.perf_counter()
        with progress_bar(f"epoch {epoch + 1}/{config.epochs}", total=len(order), enabled=progress) as advance:
            for step, batch in enumerate(order.split(config.batch_size)):
                global_size = len(batch)
                if ranks == 1:
                    x = augment(train_data.images(batch, device), config.augment)
                elif global_size < ranks:  # a rank would have nothing to run
                    continue
                else:
                    with seeded(stream_seed(config.seed * 1000003 + epoch * 100003 + step), device):  # same draws for any rank count
                        x = augment(train_data.images(batch, device), config.augment)
                    mine = shard_positions(global_size)
                    x, batch = x[mine.start:mine.stop], batch[mine.start:mine.stop]
                x = fast.prepare_input(x)
                y = train_data.y[batch].to(device)
                with fast.autocast():
                    if method is not None:
                        eps = method.eps_at(epoch + (step + 1) / steps_per_epoch)
                        loss, logits = method.loss(net, x, y, eps)
                    else:
                        if adversary is not None:
                            scorer.eval()
                            x = adversary(scorer, x, y).detach()
                        scorer.train()
                        logits = net(x)
                        loss = F.cross_entropy(logits.float(), y)
                    if ranks > 1:  # this share's mean x its size x ranks / global batch: DDP's average is the global mean
                        loss = loss * (len(y) * ranks / global_size)
                optimizer.zero_grad(set_to_none=True)
                fast.backward_and_step(loss, optimizer)
                scheduler.step()
                loss_sum += float(loss.detach()) * global_size / ranks
                correct += int((logits.detach().argmax(1) == y).sum())
                seen += len(y)
                advance(len(y))
        if ranks > 1:  # the epoch's totals over all ranks
            loss_sum, correct, seen = gather(torch.tensor([[loss_sum, correct, seen]], dtype=torch.float64)).sum(0).tolist()
            correct, seen = int(correct), int(seen)
        record = {"epoch": epoch, "loss": loss_sum / seen, "train_accuracy": correct / seen,
                  "seconds": round(time.perf_counter() - epoch_started, 3)}
        if method is not None:
            record["eps"] = method.eps_at(epoch + 1)
        score = record["train_accuracy"]
        degenerate = False
        if val_data is not None:
            predicted = predictions(scorer, val_data, device=device)
            record["val_accuracy"] = float((predicted == val_data.y).double().mean()) if len(val_data) else 0.0
            record["val_top_class_share"] = round(top_class_share(predicted), 6)
            degenerate = is_degenerate(predicted, val_data.y)
            if degenerate:
                record["degenerate"] = True
            score = record["val_accuracy"]
            if val_adversary is not None:
                record["val_robust_accuracy"] = accuracy(scorer, val_data, device=device, adversary=val_adversary)
                score = record["val_robust_accuracy"]
        history.append(record)
        warmed_up = epoch + 1 >= warmup
        if val_data is not None and adversary is not None and val_adversary is not None and warmed_up \
                and best_score > 0.2 and score < 0.5 * best_score:
            stopped = (f"catastrophic overfitting at epoch {epoch + 1}: robust accuracy fell to "
                       f"{100 * score:.1f}% from {100 * best_score:.1f}%; kept epoch {best_epoch + 1}")
        elif not degenerate and (score > best_score or (adversary is not None and not warmed_up)):
            # during the eps warm-up the latest epoch is the best: earlier ones saw a smaller eps
            best_state, best_epoch, best_score = copy.deepcopy(model.state_dict()), epoch, score
        if partial is not None:
            partial.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                          "scheduler": scheduler.state_dict(), "epoch": epoch, "history": history,
                          "best_model": best_state, "best_epoch": best_epoch, "best_score": best_score,
                          "stopped": stopped})
    if best_epoch < 0 and any(r.get("degenerate") for r in history) and not stopped:
        stopped = "every epoch's predictions were near-constant on the validation data; kept the starting weights"
    model.load_state_dict(best_state)
    model.eval()
    return TrainResult(model, best_epoch, best_score, history, time.perf_counter() - started, stopped)


def _optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    if config.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                           weight_decay=config.weight_decay, nesterov=True)


def _settings(config: TrainConfig, adversary, train_data: ImageDataset, val_data: ImageDataset | None,
              val_adversary) -> dict[str, Any]:
    """What a resumed run must share with the run that wrote the state: the hyper-parameters, the
    data (fingerprints) and the adversaries."""
    def describe(adv) -> Any:
        if isinstance(adv, AdversarialTraining):
            return adv.to_dict()
        return None if adv is None else repr(adv) if is_dataclass(adv) else getattr(adv, "__qualname__", type(adv).__name__)

    return {**asdict(config), "adversarial": describe(adversary), "val_adversary": describe(val_adversary),
            "train_data": fingerprint(train_data),
            "val_data": fingerprint(val_data) if val_data is not None else None}


PARTIAL_KEYS = ("model", "optimizer", "scheduler", "epoch", "history", "best_model", "best_epoch", "best_score")


def _partial(state_path: str | os.PathLike | None, settings: dict[str, Any]) -> ResumeState | None:
    """The per-epoch state file of a run with ``settings`` (None: none kept)."""
    if not state_path:
        return None
    return ResumeState(state_path, "dltest train partial", 2, settings, legacy=_partial_format_1)


def _partial_format_1(raw: dict[str, Any], partial: ResumeState) -> dict[str, Any] | None:
    """A partial of dltest before issue 19: no format, the settings under ``config``, no digest."""
    if "format" in raw or "config" not in raw:
        return None
    settings = dict(raw["config"]) if isinstance(raw["config"], dict) else raw["config"]
    if isinstance(settings, dict):  # its data fingerprints were named train and val
        settings.update(train_data=settings.pop("train", None), val_data=settings.pop("val", None))
    partial.check_settings(settings)
    return {k: v for k, v in raw.items() if k != "config"}


def _check_partial(state: dict[str, Any], partial: ResumeState) -> None:
    missing = [k for k in PARTIAL_KEYS if k not in state]
    if missing:
        raise partial.refuse(f"not a dltest partial training state (it lacks {', '.join(missing)})")


def predictions(model: nn.Module, data: ImageDataset, *, device: str | torch.device | None = None,
                batch_size: int = 256) -> Tensor:
    """The model's predicted class of every input of ``data`` (on the CPU), model in eval mode.

    Prepared by :func:`dltest.adapter.prepared` without the fit check: the training loop calls it
    every epoch, and an epoch whose weights went bad is recorded, not refused."""
    device = resolve_device(device)
    parts = [torch.empty(0, dtype=torch.long)]
    with prepared(model, data, device, check=False) as model, torch.inference_mode():
        for x, _ in data.batches(batch_size, device):
            parts.append(model(x).argmax(1).cpu())
    return torch.cat(parts)


def top_class_share(predicted: Tensor) -> float:
    """The share of inputs given the most frequent predicted class (1.0: a constant predictor)."""
    if len(predicted) == 0:
        return 0.0
    return float(torch.bincount(predicted).max()) / len(predicted)


def is_degenerate(predicted: Tensor, labels: Tensor) -> bool:
    """Whether predictions are near-constant: the most predicted class takes more than halfway
    from the largest true class share to all inputs ((1 + 0.1) / 2 = 55% on a balanced
    10-class set). Such an epoch is never chosen as the best one."""
    if len(predicted) == 0:
        return False
    largest_true = float(torch.bincount(labels.cpu()).max()) / len(labels)
    return top_class_share(predicted) > (1 + largest_true) / 2


def accuracy(
    model: nn.Module,
    data: ImageDataset,
    *,
    device: str | torch.device | None = None,
    batch_size: int = 256,
    adversary: Adversary | None = None,
) -> float:
    """Share of ``data`` classified correctly, model in eval mode; under ``adversary`` if given.

    Prepared as :func:`predictions` prepares it (no fit check: the training loop's per-epoch figure)."""
    device = resolve_device(device)
    correct = 0
    with prepared(model, data, device, check=False) as model:
        for x, y in data.batches(batch_size, device):
            if adversary is not None:
                x = adversary(model, x, y).detach()
            with torch.inference_mode():
                correct += int((model(x).argmax(1) == y).sum())
    return correct / max(len(data), 1)


class _CudaSpeedups:
    """Mixed precision and channels_last, switched on only for CUDA devices.

    bfloat16 where the GPU supports it (no loss scaling needed), else float16 with a GradScaler.
    """

    def __init__(self, config: TrainConfig, device: torch.device):
        cuda = device.type == "cuda"
        self.amp = bool(config.amp and cuda)
        self.channels_last = bool(config.channels_last and cuda)
        self.dtype = torch.float16
        if self.amp and torch.cuda.is_bf16_supported():
            self.dtype = torch.bfloat16
        self.scaler = torch.amp.GradScaler("cuda") if self.amp and self.dtype == torch.float16 else None

    def prepare_model(self, model: nn.Module) -> nn.Module:
        return model.to(memory_format=torch.channels_last) if self.channels_last else model

    def prepare_input(self, x: Tensor) -> Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.ndim == 4 else x

    def autocast(self):
        return torch.autocast("cuda", dtype=self.dtype) if self.amp else contextlib.nullcontext()

    def backward_and_step(self, loss: Tensor, optimizer: torch.optim.Optimizer) -> None:
        if self.scaler is None:
            loss.backward()
            optimizer.step()
        else:
            self.scaler.scale(loss).backward()
            self.scaler.step(optimizer)
            self.scaler.update()


def augment(x: Tensor, kind: str) -> Tensor:
    """Random 4-pixel-padded crops (and horizontal flips), drawn per image from torch's RNG."""
    if kind == "none":
        return x
    n, _, h, w = x.shape
    padded = F.pad(x, (4, 4, 4, 4), mode="reflect")
    dy = torch.randint(0, 9, (n,), device=x.device)
    dx = torch.randint(0, 9, (n,), device=x.device)
    rows = (dy.view(n, 1) + torch.arange(h, device=x.device)).view(n, 1, h, 1).expand(n, x.shape[1], h, w + 8)
    out = padded.gather(2, rows)
    cols = (dx.view(n, 1) + torch.arange(w, device=x.device)).view(n, 1, 1, w).expand(n, x.shape[1], h, w)
    out = out.gather(3, cols)
    if kind == "crop-flip":
        flip = torch.rand(n, device=x.device) < 0.5
        out = torch.where(flip.view(n, 1, 1, 1), out.flip(3), out)
    return out
