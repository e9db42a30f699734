"""Training a model on a whole dataset: the job behind ``dltest train``.

training split (or a seeded subset) -> a fresh zoo model -> the one trainer (standard, or
adversarial with one of :mod:`dltest.adversarial_training`'s methods) with its best epoch
chosen on the ``val`` half -> accuracy (and PGD robust accuracy) on the ``holdout`` half -> a
self-describing checkpoint and a JSON report.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from dltest.header import output_header
from dltest.adversarial_training import adversarial_training
from dltest.attacks import attack_preset
from dltest.adapter import check_fits
from dltest.checkpoint import load_model, save_checkpoint
from dltest.data import load_dataset
from dltest.errors import DltestError
from dltest.io import check_writable
from dltest.profiles import dataset_profile
from dltest.resume import discard, partial_path
from dltest.robustness import evaluate_robustness
from dltest.runtime import check_seed, seeded
from dltest.training import TrainConfig, TrainResult, accuracy, train
from dltest.zoo import default_arch, model_for_dataset


@dataclass
class PretrainResult:
    """The trained model, its holdout figures and the report written beside the checkpoint."""

    model: nn.Module
    arch: str
    training: TrainResult
    holdout_accuracy: float
    holdout_robust_accuracy: float | None
    report: dict[str, Any]


def pretrain(
    dataset: str,
    *,
    epochs: int = 20,
    batch_size: int = 128,
    optimizer: str | None = None,
    lr: float | None = None,
    augment: str | None = None,
    seed: int = 0,
    at: str | None = None,
    at_options: dict[str, Any] | None = None,
    arch: str | None = None,
    init: str | os.PathLike | None = None,
    train_size: int | None = None,
    eval_n: int | None = 1000,
    val_n: int | None = 1000,
    out: str | os.PathLike | None = None,
    resume: bool = False,
    data_root: str | os.PathLike | None = None,
    download: bool | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> PretrainResult:
    """Train ``arch`` (default: the paper's model) on ``dataset`` and report it on the holdout half.

    ``at`` names an adversarial-training method (:data:`~dltest.adversarial_training.AT_METHODS`)
    with ``at_options`` (eps, alpha, steps, warmup_epochs, beta) over the dataset's preset; then
    the report adds PGD robust accuracy (SPEC §2 evaluation preset at the training eps) on
    ``eval_n`` seeded holdout inputs. ``optimizer``, ``lr`` default to the profile's :meth:`~dltest.profiles.TrainingDefaults.recipe`,
    ``augment`` to the dataset's. ``init`` starts from a dltest checkpoint's weights instead of a
    fresh model (fine-tuning, e.g. hardening a standard model adversarially). The best epoch is chosen on the val half (adversarially: on
    ``val_n`` seeded val inputs under a 10-step PGD check). With ``out``, the checkpoint is written there (and per-epoch
    state to ``<out>.partial`` for ``resume``).
    """
    if train_size is not None and train_size < 1:
        raise DltestError(f"train_size must be >= 1, got {train_size}")
    if eval_n is not None and eval_n < 1:  # before the training, not after it
        raise DltestError(f"eval_n must be >= 1, got {eval_n}", cli=f"--eval-n must be >= 1, got {eval_n}")
    check_seed(seed)
    if out is not None:
        check_writable(out)  # a checkpoint that cannot be written fails before the training, not after it
    if at is None and at_options:
        raise DltestError(f"{', '.join(sorted(at_options))} set adversarial training: give a method with at=")
    load = dict(root=data_root, download=download)
    train_data = load_dataset(dataset, "train", **load)
    val_data = load_dataset(dataset, "val", **load)
    holdout = load_dataset(dataset, "holdout", **load)
    if train_size is not None:
        if train_size > len(train_data):
            raise DltestError(f"train_size {train_size} exceeds the {len(train_data)} training inputs")
        train_data = train_data.sample(train_size, seed)
    profile = dataset_profile(train_data.name, train_data.input_shape[0])
    family = profile.attack.name
    adversarial = adversarial_training(at, family, **(at_options or {})) if at is not None else None
    defaults = profile.attack.training.recipe(adversarial is not None, optimizer)
    config = TrainConfig(epochs=epochs, batch_size=batch_size, optimizer=defaults.optimizer,
                         lr=lr if lr is not None else defaults.lr, weight_decay=defaults.weight_decay,
                         augment=augment or profile.augment, seed=seed)
    if init is not None:
        model, arch_name = _initial_weights(init, arch, train_data)
    else:
        arch_name = arch or default_arch(train_data.name, train_data.input_shape)
        with seeded(seed):
            model = model_for_dataset(train_data.name, arch_name, train_data.num_classes, train_data.input_shape)
    if adversarial is not None:
        val_data = val_data.sample(val_n, seed)
    partial = partial_path(out) if out is not None else None
    result = train(model, train_data, val_data, config, adversary=adversarial, device=device, state_path=partial,
                   resume=resume, progress=progress)
    holdout_accuracy = accuracy(result.model, holdout, device=device)
    robust, evaluation = None, None
    if adversarial is not None:
        pgd = attack_preset("pgd", train_data.name, "eval", channels=train_data.input_shape[0], eps=adversarial.eps,
                            seed=config.seed)
        evaluation = evaluate_robustness(result.model, holdout, [pgd], n=eval_n, seed=config.seed, device=device)
        robust = evaluation.attacks[0].robust_accuracy
    report = {
        **output_header("train", config.seed), "dataset": train_data.name,
        "arch": arch_name, "init": str(init) if init is not None else None, "train_size": len(train_data), "config": asdict(config),
        "adversarial": adversarial.to_dict() if adversarial else None,
        "holdout_accuracy": holdout_accuracy, "holdout_robust_accuracy": robust,
        "holdout_robust_n": evaluation.n if evaluation else None,
        "holdout_robust_attack": evaluation.attacks[0].settings if evaluation else None,
        **result.summary(),
    }
    if out is not None:
        meta = {k: v for k, v in report.items() if k not in ("history",)}
        save_checkpoint(result.model.cpu(), out, arch=arch_name, dataset=train_data.name,
                        input_shape=train_data.input_shape, num_classes=train_data.num_classes, meta=meta)
        discard(partial)
        report["checkpoint"] = str(out)
    return PretrainResult(result.model, arch_name, result, holdout_accuracy, robust, report)



def _initial_weights(init: str | os.PathLike, arch: str | None, data) -> tuple[nn.Module, str]:
    """The model of a dltest checkpoint to fine-tune, checked to fit ``data``."""
    model, info = load_model(init)
    if info.arch is None:
        raise DltestError(f"init={init} must be a dltest checkpoint (it is rebuilt and saved as one), "
                          "not a TorchScript or pickled model")
    if arch is not None and arch != info.arch:
        raise DltestError(f"init={init} is a {info.arch}, not the asked arch {arch!r}")
    check_fits(model, data, info)
    return model, info.arch
