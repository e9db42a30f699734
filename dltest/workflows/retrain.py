"""Test selection for retraining, the paper's Section 8 (SPEC §5), as a thin loop.

pretrained model -> ``select`` on the candidate pool (the ``val`` half) -> adversarial examples
of the selected inputs -> ``train`` (the one trainer) on the training data plus those examples
-> accuracy and robustness before and after on the ``holdout`` half.

The caller's model is left as it was (device, mode, weights): a copy is retrained.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from dltest.header import output_header
from dltest.attacks import AdversarialExamples, AttackSpec, attack_preset, generate_adversarial, with_examples
from dltest.checkpoint import ModelInfo, copy_model, save_model
from dltest.data import ImageDataset, load_dataset
from dltest.adapter import prepared
from dltest.errors import DltestError
from dltest.profiles import dataset_profile
from dltest.robustness import RobustnessReport, evaluate_robustness
from dltest.budget import check_budget, parse_budget
from dltest.runtime import MAX_TORCH_SEED, check_seed, resolve_device, seeded
from dltest.selection import SelectionResult, select
from dltest.selectors import get_selector
from dltest.training import TrainConfig, TrainResult, train

RETRAIN_LR = 0.01  # fine-tuning a pretrained model: a fifth of the trainer's default peak rate


def retrain_config(dataset: str, channels: int | None = None, **overrides: Any) -> TrainConfig:
    """Section 8's training settings for ``dataset``: its profile's epochs (10, 20 for SVHN) and
    augmentation, peak lr :data:`RETRAIN_LR`; ``overrides`` (None values ignored) win."""
    profile = dataset_profile(dataset, channels)
    settings = {"epochs": profile.retrain_epochs, "lr": RETRAIN_LR, "augment": profile.augment}
    settings.update({k: v for k, v in overrides.items() if v is not None})
    return TrainConfig(**settings)


def _overlap(pool: ImageDataset, holdout: ImageDataset) -> bool:
    """Whether ``pool`` and ``holdout`` share inputs (both drawn from the test set or one file)."""
    if (pool.split == "train") != (holdout.split == "train"):
        return False  # the training set and the test set never share inputs
    return bool(np.intersect1d(pool.source_index.numpy(), holdout.source_index.numpy()).size)


@dataclass
class RetrainResult:
    """The retrained model and the Section-8 report (before/after, selection, settings)."""

    model: nn.Module
    before: RobustnessReport
    after: RobustnessReport
    selection: SelectionResult | None
    examples: AdversarialExamples
    training: TrainResult
    settings: dict[str, Any]
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        def summary(report: RobustnessReport) -> dict[str, Any]:
            return {"clean_accuracy": report.clean_accuracy,
                    "robust_accuracy": {o.attack: o.robust_accuracy for o in report.attacks}}

        return {
            **output_header("retrain", self.settings.get("seed")),
            "settings": self.settings,
            "before": summary(self.before),
            "after": summary(self.after),
            "gain": {
                "clean_accuracy": self.after.clean_accuracy - self.before.clean_accuracy,
                "robust_accuracy": {o.attack: o.robust_accuracy - self.before.robust_accuracy(o.attack)
                                    for o in self.after.attacks},
            },
            "selection": self.selection.to_dict() if self.selection else None,
            "adversarial_examples": {"n": len(self.examples), "attack": self.examples.attack,
                                     "success_rate": self.examples.success_rate,
                                     "source": self.examples.meta.get("file")},
            "training": self.training.summary(),
            "evaluation_before": self.before.to_dict(),
            "evaluation_after": self.after.to_dict(),
            "seconds": round(self.seconds, 2),
        }

    def save(self, path: str | os.PathLike, source: ModelInfo) -> Path:
        """Write the retrained model, atomically: a dltest checkpoint when ``source`` (the model it
        was retrained from) names a zoo or ``module:Class`` architecture, else TorchScript (see
        :func:`~dltest.checkpoint.save_model`); the report goes into its
        metadata (plain types only, so it loads with ``weights_only=True``)."""
        report = self.to_dict()
        meta = {"command": "dltest retrain", "retrained_from": source.source, "before": report["before"],
                "after": report["after"], "settings": report["settings"]}
        meta = json.loads(json.dumps(meta, default=str))
        return save_model(self.model.cpu(), path, source, dataset=self.settings["dataset"],
                          input_shape=tuple(self.settings["input_shape"]),
                          num_classes=source.num_classes or self.settings["num_classes"], meta=meta)


def retrain_data(dataset: str, train_size: int | None = None, seed: int = 0, *,
                 root: str | os.PathLike | None = None, download: bool | None = None) -> tuple[ImageDataset, ImageDataset]:
    """Section 8's training data (all of it, or a seeded random subset of ``train_size``) and the
    holdout half on which before and after are reported."""
    if train_size is not None and train_size < 1:
        raise DltestError(f"train_size must be >= 1, got {train_size}", cli=f"--train-size must be >= 1, got {train_size}")
    train_data = load_dataset(dataset, "train", root=root, download=download)
    return train_data.sample(train_size, seed), load_dataset(dataset, "holdout", root=root, download=download)


def check_retrain_settings(*, seed: int = 0, eval_n: int | None = None, val_n: int | None = 1000,
                           batch_size: int = 256, device: str | torch.device | None = None,
                           metric: str | None = None, budget: int | str | None = None,
                           metric_options: dict[str, Any] | None = None) -> None:
    """The settings of :func:`retrain` that need no data, checked before any model pass (the CLI
    calls it before it loads anything): the counts, the seed, the device and, where ``retrain``
    selects (``metric`` given), the metric with its options and the budget's syntax."""
    check_seed(seed, maximum=MAX_TORCH_SEED)
    resolve_device(device)
    if metric is not None:
        get_selector(metric, **(metric_options or {}))
        check_budget(budget)
    for name, value in (("eval_n", eval_n), ("val_n", val_n), ("batch_size", batch_size)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            flag = "--" + name.replace("_", "-")
            raise DltestError(f"{name} must be an integer >= 1, got {value!r}", cli=f"{flag} must be >= 1, got {value!r}")


def retrain(
    model: nn.Module,
    *,
    train_data: ImageDataset,
    pool: ImageDataset,
    holdout: ImageDataset,
    metric: str = "dre",
    budget: int | str = "4%",
    attack: AttackSpec | None = None,
    eval_attacks: Sequence[str | AttackSpec] = ("pgd",),
    config: TrainConfig | None = None,
    seed: int = 0,
    eval_n: int | None = None,
    val_n: int | None = 1000,
    val_attack: AttackSpec | None = None,
    selection: SelectionResult | None = None,
    examples: AdversarialExamples | None = None,
    metric_options: dict[str, Any] | None = None,
    device: str | torch.device | None = None,
    batch_size: int = 256,
    progress: bool = False,
    state_path: str | os.PathLike | None = None,
    resume: bool = False,
) -> RetrainResult:
    """Section 8 on ``model`` (left unchanged; a copy is retrained).

    Selects ``budget`` inputs of ``pool`` with ``metric`` (or takes ``selection``), attacks them
    with ``attack`` (default: the dataset's PGD training preset; or takes ready ``examples``),
    retrains on ``train_data`` plus the examples with ``config`` (default: 10 epochs, 20 for
    SVHN, peak lr 0.01), the best epoch chosen by robust accuracy under ``val_attack`` (default:
    the PGD training preset at the attack's eps) on ``val_n`` inputs of the pool, and reports clean and robust accuracy (``eval_attacks``) on ``holdout`` (or a
    seeded subset of ``eval_n``) before and after.
    """
    started = time.perf_counter()
    selecting = examples is None and selection is None  # a bad metric or budget fails before the first evaluation
    check_retrain_settings(seed=seed, eval_n=eval_n, val_n=val_n, batch_size=batch_size, device=device,
                           **(dict(metric=metric, budget=budget, metric_options=metric_options) if selecting else {}))
    device = resolve_device(device)
    for data in (train_data, pool, holdout):
        data.require_labels("retrain")
    if selecting:
        parse_budget(budget, len(pool))
    if pool.name != holdout.name or pool.name != train_data.name:
        raise DltestError(f"train, pool and holdout must be one dataset, got {train_data.name}, {pool.name}, {holdout.name}")
    if _overlap(pool, holdout):
        raise DltestError(f"the candidate pool ({pool.split}) must be disjoint from the holdout data "
                          f"({holdout.split}); use the val half as the pool")
    attack = attack or attack_preset("pgd", pool.name, "train", channels=pool.input_shape[0], seed=seed)
    config = config or retrain_config(pool.name, pool.input_shape[0], seed=seed)
    evaluate = dict(n=eval_n, seed=seed, batch_size=batch_size, device=device, progress=progress)
    with prepared(model, pool, device) as model:  # outside models: one adapter for every step
        before = evaluate_robustness(model, holdout, eval_attacks, **evaluate)
        if examples is None:
            if selection is None:
                selection = select(metric, budget, model=model, data=pool, seed=seed, device=device,
                                   progress=progress, **(metric_options or {}))
            examples = generate_adversarial(model, pool, selection.indices, attack, seed=seed,
                                            batch_size=batch_size, device=device, progress=progress)
        elif examples.dataset != pool.name:
            raise DltestError(f"adversarial examples of {examples.dataset!r} cannot retrain a {pool.name!r} model")
        retrained = copy_model(model)  # copy.deepcopy makes a TorchScript model's parameters non-leaf

    val = pool.sample(val_n, seed)
    val_pgd = val_attack or attack_preset("pgd", pool.name, "train", channels=pool.input_shape[0], eps=attack.eps)
    with seeded(config.seed, device):  # the trainer seeds torch's global RNG: leave the caller's stream alone
        training = train(retrained, with_examples(train_data, examples), val, config,
                         val_adversary=val_pgd.adversary(), device=device, progress=progress,
                         state_path=state_path, resume=resume)
    after = evaluate_robustness(training.model, holdout, eval_attacks, **evaluate)
    settings = {
        "dataset": pool.name, "input_shape": list(pool.input_shape), "num_classes": pool.num_classes,
        "pool_split": pool.split, "pool_size": len(pool), "holdout_split": holdout.split,
        "train_size": len(train_data), "metric": selection.metric if selection else None,
        "budget": selection.budget if selection else len(examples), "seed": seed,
        "attack": examples.attack,
        "eval_attacks": [o.settings for o in before.attacks], "eval_n": before.n,
        "val_n": len(val), "val_attack": val_pgd.to_dict(), "config": config.__dict__,
        "device": str(device), "batch_size": batch_size, "versions": before.versions,
    }
    return RetrainResult(training.model.eval(), before, after, selection, examples, training, settings,
                         time.perf_counter() - started)
