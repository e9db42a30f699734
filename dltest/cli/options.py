"""Options shared by several commands, and the loading steps they share."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer
from typer._click.globals import get_current_context

from dltest.cli.defaults import MAX_SEED

if TYPE_CHECKING:  # the modules below import torch: each command imports them when it runs
    from torch import nn

    from dltest.checkpoint import ModelInfo
    from dltest.data import ImageDataset


def notice(message: str) -> None:
    """One line on stderr, never wrapped."""
    from dltest.progress import console

    console.print(f"notice: {message}", soft_wrap=True, markup=False, highlight=False)

Dataset = Annotated[str, typer.Option("--dataset", "-d", help="mnist, fashion-mnist, cifar10, svhn, an .npz file or an image folder.")]
Split = Annotated[str, typer.Option(help="train, test, val or holdout (the test set's halves); all/val/holdout for files.")]
ModelPath = Annotated[Optional[Path], typer.Option("--model", "-m", help="A dltest checkpoint or TorchScript file; default: the bundled model of the dataset.")]
DataRoot = Annotated[Optional[Path], typer.Option(help="Folder with the datasets (default: $DLTEST_DATA, else ~/.cache/dltest/data).")]
Download = Annotated[bool, typer.Option("--download", help="Allow downloading a missing built-in dataset.")]
Device = Annotated[Optional[str], typer.Option(help="cpu, cuda, cuda:1, ... (default: cuda when available).")]
Seed = Annotated[int, typer.Option(min=0, max=MAX_SEED, help="Random seed; written into the output.")]
TrustModel = Annotated[bool, typer.Option("--trust-model", help="Also load pickled nn.Module files and checkpoints naming a module:Class architecture (runs code from or named by the file: only for files you trust).")]
Arch = Annotated[Optional[str], typer.Option("--arch", help="Architecture of a state_dict --model: a zoo name (lenet5, vgg8, vgg16, resnet18, preactresnet18), or module:Class / file.py:Class, which imports and so EXECUTES that module or file. A checkpoint naming a module:Class loads only when --arch repeats it.")]
ArchKwargs = Annotated[Optional[str], typer.Option("--arch-kwargs", help='Keyword arguments of --arch as a JSON object, e.g. \'{"num_classes": 10}\'.')]
Normalize = Annotated[Optional[str], typer.Option("--normalize", help="For a model that expects normalised inputs: MEAN,STD, per channel M1,M2,M3,S1,S2,S3, or imagenet. Inputs and eps stay in [0, 1].")]
BatchSize = Annotated[int, typer.Option(min=1, help="Inference batch size.")]


def load_data_and_model(
    dataset: str, split: str, model: Path | None, data_root: Path | None, download: bool, trust: bool = False,
    arch: str | None = None, arch_kwargs: str | None = None, normalize: str | None = None,
    need_labels: bool = True,
) -> tuple[ImageDataset, nn.Module, ModelInfo]:
    """The pool and the model (outside models adapted: outputs, normalisation, embeddings),
    checked to fit each other; a notice says how an outside model's outputs are read.

    ``need_labels=False``: an unlabeled pool is fine (``dltest select``).
    Grey images stored as RGB (or grey images for a colour model) get the model's channel count.
    """
    from dltest.cli.app import flags
    from dltest.data import load_dataset
    from dltest.loading import check_model_request, load_model_for

    with flags():
        check_model_request(model, arch, arch_kwargs, normalize)
        data = load_dataset(dataset, split, root=data_root, download=download or None)
        if need_labels:
            ctx = get_current_context(silent=True)
            data.require_labels(f"'{ctx.command_path}'" if ctx else "this command")
        data, net, info = load_model_for(data, model, trust=trust, arch=arch, arch_kwargs=arch_kwargs,
                                         normalize=normalize)
    if info.outputs != "logits":
        notice(f"{info.source} outputs {info.outputs}: dltest reads them as such (softmax is not applied again)")
    return data, net, info


# --- attacks (dltest evaluate / attack / retrain / train --adversarial) ------------------------
Eps = Annotated[Optional[str], typer.Option(help="Linf radius in (0, 1], a number or a fraction like 8/255 (default: the dataset's preset, SPEC §2).")]
Steps = Annotated[Optional[int], typer.Option(help="Attack iterations (PGD, autoattack-fast, deepfool, apgd-square; default: the preset's).")]
Alpha = Annotated[Optional[float], typer.Option(help="PGD step size (default: the preset's).")]
Queries = Annotated[Optional[int], typer.Option(help="Query budget of square / autoattack-fast (default 5000) / apgd-square (default 1000).")]
AttackBatch = Annotated[int, typer.Option("--batch-size", min=1, help="Attack batch size.")]
