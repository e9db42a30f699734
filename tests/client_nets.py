"""Models as users write them, for tests/test_client_models.py (and loadable with --arch).

Each is LeNet-5 with the layers named its own way, so a zoo LeNet-5's weights load into all of
them (:func:`client_state_dict`) and every kind must give the zoo model's predictions. They
differ only in what forward returns and in where the normalisation is.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import Tensor, nn

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


class ClientLeNet(nn.Module):
    """Logits; normalises inside unless ``normalize_inside=False`` (then the caller must)."""

    def __init__(self, num_classes: int = 10, normalize_inside: bool = True):
        super().__init__()
        self.normalize_inside = normalize_inside
        self.conv1 = nn.Conv2d(1, 6, 5, padding=2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(400, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)

    def conv_features(self, x: Tensor) -> Tensor:
        if self.normalize_inside:
            x = (x - MNIST_MEAN) / MNIST_STD
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        return F.max_pool2d(F.relu(self.conv2(x)), 2)

    def penultimate(self, x: Tensor) -> Tensor:
        return F.relu(self.fc2(F.relu(self.fc1(self.conv_features(x).flatten(1)))))

    def forward(self, x: Tensor):
        return self.fc3(self.penultimate(x))


class TupleNet(ClientLeNet):
    def forward(self, x: Tensor):
        z = self.penultimate(x)
        return self.fc3(z), z


class DictNet(ClientLeNet):
    def forward(self, x: Tensor):
        z = self.penultimate(x)
        return {"features": z, "logits": self.fc3(z)}


class ModelOutput(OrderedDict):
    """Like transformers' ModelOutput: a dict whose keys are also attributes."""

    def __getattr__(self, name: str):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class HFLikeNet(ClientLeNet):
    def forward(self, x: Tensor):
        z = self.penultimate(x)
        return ModelOutput(logits=self.fc3(z), hidden_states=(z,))


class ProbabilityNet(ClientLeNet):
    def forward(self, x: Tensor):
        return torch.softmax(self.fc3(self.penultimate(x)), dim=1)


class LogProbabilityNet(ClientLeNet):
    def forward(self, x: Tensor):
        return torch.log_softmax(self.fc3(self.penultimate(x)), dim=1)


class TimmLikeNet(ClientLeNet):
    """timm's interface: forward_features -> forward_head(pre_logits=...), get_classifier()."""

    def forward_features(self, x: Tensor) -> Tensor:
        return self.conv_features(x)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        z = F.relu(self.fc2(F.relu(self.fc1(x.flatten(1)))))
        return z if pre_logits else self.fc3(z)

    def get_classifier(self) -> nn.Module:
        return self.fc3

    def forward(self, x: Tensor):
        return self.forward_head(self.forward_features(x))


KINDS = {
    "logits": ClientLeNet, "tuple": TupleNet, "dict": DictNet, "hf-like": HFLikeNet,
    "probabilities": ProbabilityNet, "log-probabilities": LogProbabilityNet, "timm-like": TimmLikeNet,
}

# zoo LeNet-5 parameter names -> ClientLeNet's
ZOO_TO_CLIENT = {"features.0": "conv1", "features.3": "conv2", "features.7": "fc1", "features.9": "fc2", "head": "fc3"}


def client_state_dict(zoo_lenet: nn.Module) -> dict[str, Tensor]:
    """The weights of a zoo LeNet-5 under ClientLeNet's names (its mean/std buffers dropped)."""
    out = {}
    for key, value in zoo_lenet.state_dict().items():
        layer, _, param = key.rpartition(".")
        if layer in ZOO_TO_CLIENT:
            out[f"{ZOO_TO_CLIENT[layer]}.{param}"] = value.clone()
    return out


class NoisyLogits(nn.Module):
    """A randomised 'defense': noise on the logits even in eval mode."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x: Tensor) -> Tensor:
        out = self.inner(x)
        return out + torch.randn_like(out)


class ColourNet(nn.Module):
    """A small convolutional net for colour images of any size (logits)."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten())
        self.head = nn.Linear(8 * 16, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))
