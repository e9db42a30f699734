"""The paper's architectures: LeNet-5, VGG8, VGG16, ResNet18 and PreActResNet18 (CIFAR variants).

Every zoo model is a :class:`Classifier`: it takes images in [0, 1], normalises them inside,
and splits into ``embed`` (penultimate features) and ``head`` (the final linear layer), so one
pass yields both logits and embeddings and MC dropout can sample the head alone.

An architecture is named by a zoo name or, for outside models, ``module:Class`` /
``file.py:Class`` (:func:`resolve_arch`, :func:`build_architecture`); a name read from a file
is built only under the trust rule of :func:`check_file_arch`.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn
import torch.nn.functional as F

from dltest.errors import DltestError, first_line
from dltest.io import parse_json_text
from dltest.profiles import dataset_profile, generic_profile


class Classifier(nn.Module):
    """Images in [0, 1] -> normalise -> ``features`` -> embedding -> ``head`` -> logits."""

    def __init__(self, features: nn.Module, head: nn.Linear, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))
        self.features = features
        self.head = head

    def embed(self, x: Tensor) -> Tensor:
        """Penultimate features of images in [0, 1]."""
        return self.features((x - self.mean) / self.std)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.embed(x))


# --- LeNet-5 -----------------------------------------------------------------------------------


def lenet5(num_classes: int = 10, in_channels: int = 1, mean=(0.1307,), std=(0.3081,)) -> Classifier:
    """LeNet-5 for 28x28 (padded to keep 28) or 32x32 inputs; 84-dim embedding."""
    features = nn.Sequential(
        nn.Conv2d(in_channels, 6, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Flatten(),
        nn.LazyLinear(120), nn.ReLU(inplace=True),
        nn.Linear(120, 84), nn.ReLU(inplace=True),
    )
    return Classifier(features, nn.Linear(84, num_classes), mean, std)


# --- VGG ---------------------------------------------------------------------------------------

VGG_CONFIGS: dict[str, list[int | str]] = {
    # 5 conv + 2 hidden linear + head = 8 weight layers
    "vgg8": [64, "M", 128, "M", 256, "M", 512, "M", 512, "M"],
    # 13 conv + head, as in the common CIFAR VGG16
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
}


def _vgg_layers(cfg: list[int | str], in_channels: int) -> list[nn.Module]:
    layers: list[nn.Module] = []
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(2))
        else:
            layers += [nn.Conv2d(in_channels, int(v), 3, padding=1), nn.BatchNorm2d(int(v)), nn.ReLU(inplace=True)]
            in_channels = int(v)
    return layers


def vgg8(num_classes: int = 10, in_channels: int = 3, mean=(0.4377, 0.4438, 0.4728), std=(0.198, 0.201, 0.197)) -> Classifier:
    """VGG8 for 32x32 inputs (SVHN in the paper); 512-dim embedding."""
    features = nn.Sequential(
        *_vgg_layers(VGG_CONFIGS["vgg8"], in_channels), nn.Flatten(),
        nn.Linear(512, 512), nn.ReLU(inplace=True),
        nn.Linear(512, 512), nn.ReLU(inplace=True),
    )
    return Classifier(features, nn.Linear(512, num_classes), mean, std)


def vgg16(num_classes: int = 10, in_channels: int = 3, mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616)) -> Classifier:
    """VGG16 (CIFAR variant) for 32x32 inputs; 512-dim embedding."""
    features = nn.Sequential(*_vgg_layers(VGG_CONFIGS["vgg16"], in_channels), nn.Flatten())
    return Classifier(features, nn.Linear(512, num_classes), mean, std)


# --- ResNets -----------------------------------------------------------------------------------


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class PreActBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


def _resnet_features(block: type[nn.Module], in_channels: int, preact: bool) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)]
    if not preact:
        layers += [nn.BatchNorm2d(64), nn.ReLU(inplace=True)]
    cin = 64
    for cout, stride in [(64, 1), (128, 2), (256, 2), (512, 2)]:
        layers += [block(cin, cout, stride), block(cout, cout, 1)]
        cin = cout
    if preact:
        layers += [nn.BatchNorm2d(512), nn.ReLU(inplace=True)]
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return nn.Sequential(*layers)


def resnet18(num_classes: int = 10, in_channels: int = 3, mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616)) -> Classifier:
    """ResNet18 (CIFAR variant: 3x3 stem, no max-pool); 512-dim embedding."""
    return Classifier(_resnet_features(BasicBlock, in_channels, preact=False), nn.Linear(512, num_classes), mean, std)


def preactresnet18(num_classes: int = 10, in_channels: int = 3, mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616)) -> Classifier:
    """PreActResNet18 (He et al. 2016, CIFAR variant); 512-dim embedding."""
    return Classifier(_resnet_features(PreActBlock, in_channels, preact=True), nn.Linear(512, num_classes), mean, std)


ARCHITECTURES: dict[str, Callable[..., Classifier]] = {
    "lenet5": lenet5,
    "vgg8": vgg8,
    "vgg16": vgg16,
    "resnet18": resnet18,
    "preactresnet18": preactresnet18,
}


def is_zoo_architecture(name: object) -> bool:
    """Whether ``name`` is one of the zoo's architecture names: the only architectures a file may
    name by itself (building one runs no code from outside dltest)."""
    return isinstance(name, str) and name in ARCHITECTURES


def build_model(
    arch: str, num_classes: int = 10, input_shape: Sequence[int] = (1, 28, 28), **kwargs
) -> Classifier:
    """Build a zoo architecture for inputs of ``input_shape`` (C, H, W), lazy layers materialised."""
    if not is_zoo_architecture(arch):
        raise DltestError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}")
    model = ARCHITECTURES[arch](num_classes=num_classes, in_channels=int(input_shape[0]), **kwargs)
    with torch.no_grad():
        model.eval()(torch.zeros(1, *input_shape))  # materialise lazy layers, check the shape fits
    return model


def model_for_dataset(
    dataset: str, arch: str | None = None, num_classes: int = 10, input_shape: Sequence[int] = (1, 28, 28)
) -> Classifier:
    """A fresh zoo model for ``dataset``: the paper's architecture unless ``arch`` says otherwise,
    with the dataset's normalisation baked in (0.5/0.5 for user data or a channel mismatch)."""
    channels = int(input_shape[0])
    profile = dataset_profile(dataset, channels)
    arch = arch or profile.arch
    if profile.channels != channels:
        profile = generic_profile(channels, dataset)
    return build_model(arch, num_classes, input_shape, mean=profile.mean, std=profile.std)


def default_arch(dataset: str, input_shape: Sequence[int]) -> str:
    """The paper's architecture for ``dataset``; for user data, LeNet-5 (grey) or ResNet18 (colour)."""
    return dataset_profile(dataset, int(input_shape[0])).arch


# --- architectures by name: a zoo name, module:Class or file.py:Class ---------------------------


def check_file_arch(arch: Any, source: str | os.PathLike, *, allowed: bool = False) -> None:
    """The one rule for an architecture named inside a file (a checkpoint's ``arch``).

    A zoo name is built by dltest itself. Anything else (``module:Class``, ``file.py:Class``) is
    imported and called, which runs that code, so a file alone never makes dltest do it:
    ``allowed`` says the user asked for it (``arch=``/``--arch`` naming it, ``trust=True``/
    ``--trust-model``). Refused: one line naming the value and how to allow it.
    """
    if is_zoo_architecture(arch):
        return
    if not isinstance(arch, str) or not arch:
        raise DltestError(f"{source} is a dltest checkpoint without a valid architecture name (arch is "
                          f"{_shown(arch)}); save the model again with dltest")
    if allowed:
        return
    raise DltestError(
        f"{source} names architecture {_shown(arch)}, not one of dltest's zoo models ({', '.join(ARCHITECTURES)}): "
        f"building it would import and run that code; only if you trust it, name it yourself with --arch "
        f"{_shown(arch)} (arch= in Python) or pass --trust-model (trust=True)"
    )


def _shown(value: Any, limit: int = 120) -> str:
    """``value`` on one short line (repr escapes newlines), for messages quoting file contents."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def parse_arch_kwargs(spec: dict[str, Any] | str | None, what: str = "arch_kwargs") -> dict[str, Any]:
    """Keyword arguments of the architecture: a dict, or a JSON object (``--arch-kwargs``)."""
    if spec is None:
        return {}
    if isinstance(spec, str):
        spec = parse_json_text(spec, what)
    if not isinstance(spec, dict):
        raise DltestError(f"{what} must be a JSON object like {{\"num_classes\": 10}}, got {type(spec).__name__}")
    return spec


def resolve_arch(arch: str) -> Callable[..., nn.Module]:
    """A zoo name, or ``package.module:ClassOrFactory`` / ``path/to/file.py:ClassOrFactory``.

    A module name is imported with the working directory on the path (as uvicorn and hydra do);
    importing it runs that module's code, which is the user's own.
    """
    if arch in ARCHITECTURES:
        return ARCHITECTURES[arch]
    module_name, sep, attr = arch.partition(":")
    if not sep or not module_name or not attr:
        raise DltestError(f"unknown architecture {arch!r}: give a zoo name ({', '.join(ARCHITECTURES)}) or "
                          "module:Class (e.g. mypackage.nets:Net or nets.py:Net)")
    try:
        if module_name.endswith(".py"):
            file = Path(module_name)
            if not file.is_file():
                raise _arch_error(arch, f"file {file} not found")
            spec = importlib.util.spec_from_file_location(f"dltest_user_arch_{file.stem}", file)
            module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
            spec.loader.exec_module(module)  # type: ignore[union-attr]
        else:
            cwd = os.getcwd()
            added = cwd not in sys.path
            if added:
                sys.path.insert(0, cwd)
            try:
                module = importlib.import_module(module_name)
            finally:
                if added:
                    sys.path.remove(cwd)
    except DltestError:
        raise
    except Exception as exc:  # noqa: BLE001 - ImportError, SyntaxError, errors in the user's module
        raise _arch_error(arch, f"cannot import {module_name} ({type(exc).__name__}: {first_line(exc)})") from None
    target = getattr(module, attr, None)
    if not callable(target):
        raise _arch_error(arch, f"{module_name} has no class or function {attr!r}")
    return target


def build_architecture(arch: str, kwargs: dict[str, Any], weights: dict[str, torch.Tensor],
                       input_shape: tuple[int, ...] | None, num_classes: int | None,
                       path: str | os.PathLike) -> nn.Module:
    """Build ``arch`` with ``kwargs`` and load ``weights`` into it (strictly), in eval mode."""
    factory = resolve_arch(arch)
    weights = _strip_prefix(weights, "module.")  # DataParallel / DDP checkpoints
    try:
        if arch in ARCHITECTURES:
            if input_shape is None:
                raise DltestError(f"zoo architecture {arch} needs the input shape: load it with the data "
                                  "(the CLI does) or pass input_shape")
            head = weights.get("head.weight")
            classes = num_classes or (int(head.shape[0]) if head is not None else 10)
            model = build_model(arch, classes, input_shape, **kwargs)
        else:
            model = factory(**kwargs)
            if not isinstance(model, nn.Module):
                raise _arch_error(arch, f"returned {type(model).__name__}, not an nn.Module")
            if input_shape is not None and any(isinstance(p, nn.parameter.UninitializedParameter) for p in model.parameters()):
                with torch.no_grad():
                    model.eval()(torch.zeros(1, *input_shape))  # materialise lazy layers
        model.load_state_dict(weights)
    except DltestError:
        raise
    except TypeError as exc:
        why = f"cannot be built with {kwargs or 'no arguments'} ({first_line(exc)}); pass its arguments with "
        raise DltestError(f"arch {arch!r} {why}arch_kwargs", cli=f"--arch {arch} {why}--arch-kwargs JSON") from None
    except (KeyError, RuntimeError, ValueError) as exc:
        raise DltestError(f"{path} does not fit architecture {arch} ({first_line(exc)})") from None
    return model.eval()


def _arch_error(arch: str, problem: str) -> DltestError:
    return DltestError(f"arch {arch!r}: {problem}", cli=f"--arch {arch}: {problem}")


def _strip_prefix(weights: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    if weights and all(k.startswith(prefix) for k in weights):
        return {k[len(prefix):]: v for k, v in weights.items()}
    return weights
