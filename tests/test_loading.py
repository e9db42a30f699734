"""dltest.loading: one way to load a model for a pool, for the CLI and the pytest plugin."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dltest.data import load_dataset
from dltest.data.user_files import load_npz
from dltest.errors import DltestError
from dltest.loading import check_model_request, load_model_for
from tests.conftest import REPO


def test_the_bundled_model_for_a_builtin_pool_fits_it_unchanged():
    data = load_dataset("mnist", "holdout").subset(torch.arange(64))
    same, model, info = load_model_for(data)
    assert same is data and info.outputs == "logits"
    with torch.no_grad():
        correct = (model.eval()(data.images()).argmax(1) == data.y).float().mean()
    assert correct > 0.9  # the bundled LeNet-5 on MNIST


def test_grey_images_stored_as_rgb_get_the_grey_models_channel(tmp_path):
    mnist = load_dataset("mnist", "holdout").subset(torch.arange(32))
    rgb = (mnist.x.expand(-1, 3, -1, -1).permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    np.savez(tmp_path / "rgb.npz", x=rgb, y=mnist.y.numpy())
    data = load_npz(tmp_path / "rgb.npz")
    assert data.input_shape[0] == 3
    fitted, _, _ = load_model_for(data, REPO / "models" / "lenet5-mnist.pt")
    assert fitted.input_shape[0] == 1 and torch.equal(fitted.x[:, 0], data.x[:, 0])
    with pytest.raises(DltestError):  # the plugin asks for the data as it is: a 3-channel pool does not fit
        load_model_for(data, REPO / "models" / "lenet5-mnist.pt", fit_user_channels=False)


def test_requests_are_checked_before_any_file_is_read():
    with pytest.raises(DltestError, match="describe a state_dict") as info:
        check_model_request(None, arch="lenet5")
    assert info.value.cli == "--arch and --arch-kwargs describe a state_dict given with --model FILE"
    with pytest.raises(DltestError) as info:
        check_model_request("m.pt", arch="lenet5", arch_kwargs="{not json")
    assert info.value.param == "arch_kwargs"
