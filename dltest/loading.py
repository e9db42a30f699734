"""Loading a model for a pool, as every command and the pytest plugin do it.

A model file (or the dataset's bundled model) is loaded for the pool it will score: outside models
adapted (outputs, normalisation, embeddings), a user file's grey images stored as RGB (or grey
images for a colour model) given the model's channel count, and the two checked to fit each other.
"""

from __future__ import annotations

import os
from typing import Any

from torch import nn

from dltest.adapter import check_fits, parse_normalize
from dltest.checkpoint import ModelInfo, load_model
from dltest.data import BUILTINS, ImageDataset, fit_channels
from dltest.errors import DltestError
from dltest.zoo import parse_arch_kwargs


def check_model_request(model: str | os.PathLike | None, arch: str | None = None, arch_kwargs: Any = None,
                        normalize: str | None = None) -> None:
    """The arguments of :func:`load_model_for` that can be checked without reading a file."""
    if (arch or arch_kwargs) and model is None:
        raise DltestError("arch and arch_kwargs describe a state_dict given as the model file",
                          cli="--arch and --arch-kwargs describe a state_dict given with --model FILE")
    try:
        parse_arch_kwargs(arch_kwargs)  # malformed JSON fails before any loading
    except DltestError as exc:
        raise DltestError(str(exc), param="arch_kwargs") from None
    parse_normalize(normalize)


def load_model_for(
    data: ImageDataset,
    model: str | os.PathLike | None = None,
    *,
    trust: bool = False,
    arch: str | None = None,
    arch_kwargs: Any = None,
    normalize: str | None = None,
    fit_user_channels: bool = True,
) -> tuple[ImageDataset, nn.Module, ModelInfo]:
    """``model`` (default: ``data``'s bundled model) loaded for ``data`` and checked to fit it.

    Returns the data (a user file's channels fitted to the model where that loses nothing, unless
    ``fit_user_channels`` is false), the adapted model and how it was read.
    """
    check_model_request(model, arch, arch_kwargs, normalize)
    net, info = load_model(model, dataset=None if model else data.name, trust=trust, arch=arch,
                           arch_kwargs=arch_kwargs, normalize=normalize, input_shape=data.input_shape)
    user_file = fit_user_channels and data.name not in BUILTINS
    if user_file and info.input_shape and tuple(info.input_shape[1:]) == data.input_shape[1:]:
        data = fit_channels(data, info.input_shape[0])
    try:
        net = check_fits(net, data, info)
    except DltestError:
        other = fit_channels(data, 4 - data.input_shape[0]) if user_file else data  # 1 <-> 3 channels, losing nothing
        if other is data or info.input_shape:
            raise
        net, data = check_fits(net, other, info), other
    return data, net, info
