"""Test selection for retraining, the paper's Section 8 (SPEC §5), as a thin loop.

pretrained model -> ``select`` on the candidate pool (the ``val`` half) -> adversarial examples
of the selected inputs -> ``train`` (the one trainer) on the training data plus those examples
-> accuracy and robustness before and after on the ``holdout`` half.

:class:`AdversarialExamples` is also what ``dltest attack`` writes: an ``.npz`` with ``x``
(N, H, W, C float32 in [0, 1]) and ``y`` like any dltest data file (so ``--dataset adv.npz``
reads it), plus the source positions, the predictions and the settings.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from dltest import __version__
from dltest.attacks import AttackSpec, attack_preset
from dltest.checkpoint import copy_model
from dltest.data import ImageDataset, check_examples, to_float_images
from dltest.errors import DltestError
from dltest.inference import PROBE_SIZE, adapt
from dltest.io import atomic_path, parse_json_text
from dltest.progress import progress_bar
from dltest.robustness import RobustnessReport, evaluate_robustness, seeded_subset
from dltest.selection import SelectionResult, select
from dltest.settings import default_device
from dltest.training import DEFAULT_AUGMENT, TrainConfig, TrainResult, train

# Section 8: 10 retraining epochs, 20 for SVHN.
RETRAIN_EPOCHS = {"svhn": 20}
DEFAULT_RETRAIN_EPOCHS = 10
RETRAIN_LR = 0.01  # fine-tuning a pretrained model: a fifth of the trainer's default peak rate


def retrain_epochs(dataset: str) -> int:
    return RETRAIN_EPOCHS.get(dataset, DEFAULT_RETRAIN_EPOCHS)


@dataclass
class AdversarialExamples:
    """Adversarial versions of pool inputs: images (N, C, H, W, float in [0, 1]) and labels.

    ``indices`` are the positions of the source inputs in the pool (``dataset``/``split``),
    ``source_index`` their positions in the file or torchvision split they come from.
    """

    x: Tensor
    y: Tensor
    indices: Tensor
    source_index: Tensor
    clean_pred: Tensor
    adv_pred: Tensor
    dataset: str
    split: str
    attack: dict[str, Any]
    seed: int
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.y)

    @property
    def success_rate(self) -> float:
        """Share of the inputs the model got right before the attack and wrong after it."""
        flipped = (self.clean_pred == self.y) & (self.adv_pred != self.y)
        return float(flipped.float().mean()) if len(self) else 0.0

    def as_dataset(self, classes: list[str]) -> ImageDataset:
        return ImageDataset(self.dataset, "adversarial", self.x, self.y, classes, self.source_index)

    def save(self, path: str | os.PathLike) -> Path:
        """Write an ``.npz`` (``x`` as N, H, W, C), atomically."""
        info = {"dataset": self.dataset, "split": self.split, "attack": self.attack, "seed": self.seed,
                "dltest_version": __version__, **self.meta}
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                np.savez_compressed(
                    f,
                    x=self.x.permute(0, 2, 3, 1).contiguous().numpy().astype(np.float32),
                    y=self.y.numpy().astype(np.int64),
                    indices=self.indices.numpy().astype(np.int64),
                    source_index=self.source_index.numpy().astype(np.int64),
                    clean_pred=self.clean_pred.numpy().astype(np.int64),
                    adv_pred=self.adv_pred.numpy().astype(np.int64),
                    meta=np.array(json.dumps(info)),
                )
        return Path(path)


def load_adversarial(path: str | os.PathLike, data: ImageDataset | None = None) -> AdversarialExamples:
    """Read what :meth:`AdversarialExamples.save` wrote; with ``data``, check it comes from it."""
    path = Path(path)
    if not path.is_file():
        raise DltestError(f"adversarial examples file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as f:
            missing = {"x", "y", "indices", "meta"} - set(f.files)
            if missing:
                raise DltestError(f"{path} is not a dltest adversarial-examples file (no {', '.join(sorted(missing))})")
            arrays = {k: f[k] for k in f.files}
    except DltestError:
        raise
    except Exception as exc:
        raise DltestError(f"cannot read {path} as an .npz file ({exc})") from None
    meta = parse_json_text(str(arrays.pop("meta")), f"{path}: meta")
    if not isinstance(meta, dict):
        raise DltestError(f"{path}: meta must be a JSON object")
    check_examples(arrays, path, data.classes if data is not None else None)
    x = torch.from_numpy(arrays["x"]).permute(0, 3, 1, 2).contiguous().float()
    y = torch.from_numpy(arrays["y"]).long()
    n = len(y)
    examples = AdversarialExamples(
        x=x, y=y, indices=torch.from_numpy(arrays["indices"]).long(),
        source_index=torch.from_numpy(arrays.get("source_index", arrays["indices"])).long(),
        clean_pred=torch.from_numpy(arrays.get("clean_pred", np.full(n, -1))).long(),
        adv_pred=torch.from_numpy(arrays.get("adv_pred", np.full(n, -1))).long(),
        dataset=meta.pop("dataset", "?"), split=meta.pop("split", "?"), attack=meta.pop("attack", {}),
        seed=int(meta.pop("seed", 0)), meta=meta,
    )
    if data is not None:
        if examples.dataset != data.name:
            raise DltestError(f"{path} holds adversarial examples of {examples.dataset!r}, not {data.name!r}")
        if tuple(x.shape[1:]) != tuple(data.input_shape):
            raise DltestError(f"{path} holds inputs of shape {tuple(x.shape[1:])}, but {data.name} has {data.input_shape}")
    return examples


def generate_adversarial(
    model: nn.Module,
    data: ImageDataset,
    indices: Sequence[int] | Tensor | None,
    attack: AttackSpec,
    *,
    seed: int = 0,
    batch_size: int = 256,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> AdversarialExamples:
    """Attack the inputs of ``data`` at ``indices`` (all when None), model in eval mode.

    Every selected input gets its adversarial version, also where the attack fails (as in
    adversarial training). Seeded: torch's generator is set to ``seed`` and restored after.
    """
    device = default_device(device)
    positions = torch.arange(len(data)) if indices is None else torch.as_tensor(indices, dtype=torch.long)
    if len(positions) == 0:
        raise DltestError("no inputs to attack (empty selection)")
    if positions.min() < 0 or positions.max() >= len(data):
        raise DltestError(f"indices outside the pool of {len(data)}")
    model = adapt(model.to(device), data.images(positions[:PROBE_SIZE], device)).eval()
    atk = attack.build(model, data.num_classes)
    xs, clean, advp = [], [], []
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), progress_bar(f"attack {attack.label}", len(positions), progress) as advance:
        torch.manual_seed(seed)
        for chunk in positions.split(batch_size):
            x = data.images(chunk, device)
            y = data.y[chunk].to(device)
            adv = atk(x, y).detach()
            model.eval()
            with torch.no_grad():
                clean.append(model(x).argmax(1).cpu())
                advp.append(model(adv).argmax(1).cpu())
            xs.append(adv.float().cpu())
            advance(len(chunk))
    return AdversarialExamples(
        x=torch.cat(xs), y=data.y[positions].clone(), indices=positions.clone(),
        source_index=data.source_index[positions].clone(), clean_pred=torch.cat(clean), adv_pred=torch.cat(advp),
        dataset=data.name, split=data.split, attack=attack.to_dict(), seed=seed,
    )


def with_examples(train_data: ImageDataset, examples: AdversarialExamples) -> ImageDataset:
    """The training data followed by the adversarial examples (as float images)."""
    if tuple(examples.x.shape[1:]) != tuple(train_data.input_shape):
        raise DltestError(
            f"adversarial examples have shape {tuple(examples.x.shape[1:])}, training data {train_data.input_shape}"
        )
    return ImageDataset(
        train_data.name, f"{train_data.split}+adversarial",
        torch.cat([to_float_images(train_data.x), examples.x.float()]),
        torch.cat([train_data.y, examples.y]), train_data.classes,
        torch.cat([train_data.source_index, examples.source_index]),
    )


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
            "command": "retrain",
            "settings": self.settings,
            "before": summary(self.before),
            "after": summary(self.after),
            "gain": {
                "clean_accuracy": self.after.clean_accuracy - self.before.clean_accuracy,
                "robust_accuracy": {o.attack: o.robust_accuracy - self.before.robust_accuracy(o.attack)
                                    for o in self.after.attacks},
            },
            "selection": self.selection.to_dict() if self.selection else None,
            "adversarial_examples": {"count": len(self.examples), "attack": self.examples.attack,
                                     "success_rate": self.examples.success_rate,
                                     "source": self.examples.meta.get("file")},
            "training": self.training.summary(),
            "evaluation_before": self.before.to_dict(),
            "evaluation_after": self.after.to_dict(),
            "seconds": round(self.seconds, 2),
        }


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
    selector_options: dict[str, Any] | None = None,
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
    device = default_device(device)
    if pool.name != holdout.name or pool.name != train_data.name:
        raise DltestError(f"train, pool and holdout must be one dataset, got {train_data.name}, {pool.name}, {holdout.name}")
    if _overlap(pool, holdout):
        raise DltestError(f"the candidate pool ({pool.split}) must be disjoint from the holdout data "
                          f"({holdout.split}); use the val half as the pool")
    attack = attack or attack_preset("pgd", pool.name, "train", channels=pool.input_shape[0], seed=seed)
    config = config or TrainConfig(epochs=retrain_epochs(pool.name), lr=RETRAIN_LR, seed=seed,
                                   augment=DEFAULT_AUGMENT.get(pool.name, "none"))
    model = adapt(model.to(device), pool.images(slice(0, PROBE_SIZE), device)).eval()
    evaluate = dict(n=eval_n, seed=seed, batch_size=batch_size, device=device, progress=progress)
    before = evaluate_robustness(model, holdout, eval_attacks, **evaluate)

    if examples is None:
        if selection is None:
            selection = select(metric, budget, model=model, data=pool, seed=seed, device=device,
                               progress=progress, **(selector_options or {}))
        examples = generate_adversarial(model, pool, selection.indices, attack, seed=seed,
                                        batch_size=batch_size, device=device, progress=progress)
    elif examples.dataset != pool.name:
        raise DltestError(f"adversarial examples of {examples.dataset!r} cannot retrain a {pool.name!r} model")

    val, _ = seeded_subset(pool, val_n, seed)
    val_pgd = val_attack or attack_preset("pgd", pool.name, "train", channels=pool.input_shape[0], eps=attack.eps)
    retrained = copy_model(model)  # deepcopy would make a TorchScript model's parameters non-leaf
    training = train(retrained, with_examples(train_data, examples), val, config, val_adversary=val_pgd.adversary(),
                     device=device, progress=progress, state_path=state_path, resume=resume)
    after = evaluate_robustness(training.model, holdout, eval_attacks, **evaluate)
    settings = {
        "dataset": pool.name, "pool_split": pool.split, "pool_size": len(pool), "holdout_split": holdout.split,
        "train_size": len(train_data), "metric": selection.metric if selection else None,
        "budget": selection.budget if selection else len(examples), "seed": seed,
        "attack": examples.attack,
        "eval_attacks": [o.settings for o in before.attacks], "eval_n": before.n,
        "val_n": len(val), "val_attack": val_pgd.to_dict(), "config": config.__dict__,
        "device": str(device), "batch_size": batch_size, "versions": before.versions,
    }
    return RetrainResult(training.model.eval(), before, after, selection, examples, training, settings,
                         time.perf_counter() - started)
