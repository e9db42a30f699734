"""Datasets as in-memory image tensors in [0, 1], with the paper's splits.

Built-in datasets come through torchvision's dataset classes; user data comes as an ``.npz``
file (``x``: N,H,W[,C] uint8 or float in [0,1]; ``y``: N labels) or an ImageFolder directory.
Images are kept as uint8 (N, C, H, W) where possible and turned into floats one batch at a time.
Normalisation belongs to the model, never to the data.

Modules: :mod:`~dltest.data.dataset` (:class:`ImageDataset`, sampling, fingerprint),
:mod:`~dltest.data.builtin_sets` (built-in sets, splits, :func:`load_dataset`) and
:mod:`~dltest.data.user_files` (``.npz`` files, image folders, size and content checks) and
:mod:`~dltest.data.labeled_pool` (:class:`LabeledPool`: which inputs are labeled, with which labels). Every
public name is importable from ``dltest.data``.
"""

from dltest.data.dataset import ImageDataset, fingerprint, fit_channels, to_float_images
from dltest.data.user_files import (
    FLOAT32, GREY_MODES, MAX_CLASSES, check_examples, check_labels, check_npz_sizes, check_pixels, load_image_folder,
    load_npz, max_array_bytes,
)
from dltest.data.labeled_pool import LabeledPool
from dltest.data.builtin_sets import BUILTIN_SPLITS, BUILTINS, FILE_SPLITS, HALVES_SEED, load_dataset, split_halves

__all__ = [
    "BUILTINS", "BUILTIN_SPLITS", "FILE_SPLITS", "FLOAT32", "GREY_MODES", "HALVES_SEED", "ImageDataset", "LabeledPool",
    "MAX_CLASSES", "check_examples", "check_labels", "check_npz_sizes", "check_pixels", "fingerprint",
    "fit_channels", "load_dataset", "load_image_folder", "load_npz", "max_array_bytes", "split_halves",
    "to_float_images",
]
