"""runtime: device resolution, and context managers that restore what they change."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

from dltest.errors import DltestError
from dltest.runtime import (
    autocast, dropout_modules, eval_mode, mc_dropout_mode, model_device, native_cpu_backward, on_device,
    resolve_device, seeded,
)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.5))
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.body(x))


def modes(model: nn.Module) -> list[bool]:
    return [m.training for m in model.modules()]


def test_resolve_device_accepts_cpu_and_names_bad_values(monkeypatch):
    monkeypatch.delenv("DLTEST_DEVICE", raising=False)
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    monkeypatch.setenv("DLTEST_DEVICE", "cpu")
    assert resolve_device(None) == torch.device("cpu")
    with pytest.raises(DltestError, match=r"unknown device 'bogus'; use cpu, cuda, cuda:N or mps") as err:
        resolve_device("bogus")
    assert "\n" not in str(err.value)
    monkeypatch.setenv("DLTEST_DEVICE", "gpu0")
    with pytest.raises(DltestError, match="unknown device 'gpu0'"):
        resolve_device(None)
    with pytest.raises(DltestError, match="unsupported device 'meta'"):
        resolve_device("meta")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_cuda_without_a_gpu_is_one_line():
    for name in ("cuda", "cuda:1"):
        with pytest.raises(DltestError, match=f"device '{name}' asked for, but no CUDA GPU is available; use cpu"):
            resolve_device(name)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_a_cuda_index_past_the_last_gpu_is_refused():
    with pytest.raises(DltestError, match="does not exist"):
        resolve_device(f"cuda:{torch.cuda.device_count()}")


def test_eval_mode_restores_every_modules_mode_also_on_error():
    model = Net().train()
    model.body[1].eval()  # a mixed state must come back exactly
    before = modes(model)
    with eval_mode(model) as inside:
        assert inside is model and not any(modes(model))
    assert modes(model) == before
    with pytest.raises(RuntimeError):
        with eval_mode(model):
            raise RuntimeError("boom")
    assert modes(model) == before


def test_mc_dropout_mode_trains_only_the_dropout_modules():
    model = Net().train()
    before = modes(model)
    (drop,) = dropout_modules(model)
    with mc_dropout_mode(model):
        assert drop.training and not model.body[1].training and not model.training
        x = torch.randn(16, 4)
        running = model.body[1].running_mean.clone()
        assert not torch.equal(model(x), model(x))  # dropout samples differ
        assert torch.equal(model.body[1].running_mean, running)  # BatchNorm statistics untouched
    assert modes(model) == before
    with mc_dropout_mode(model, []):  # explicit module list: no dropout trains
        assert not any(modes(model))
    assert dropout_modules(nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.0))) == []


def test_seeded_forks_the_global_rng_and_restores_it():
    torch.manual_seed(123)
    state = torch.get_rng_state()
    with seeded(7):
        a = torch.rand(5)
    assert torch.equal(torch.get_rng_state(), state)
    with seeded(7):
        b = torch.rand(5)
    assert torch.equal(a, b)
    torch.manual_seed(7)
    assert torch.equal(torch.rand(5), a)  # the block draws what manual_seed(7) draws


def test_on_device_is_a_no_op_where_the_model_already_is():
    model = Net()
    weights = [p.data_ptr() for p in model.parameters()]
    with on_device(model, "cpu") as inside:
        assert inside is model and model_device(model) == torch.device("cpu")
    assert [p.data_ptr() for p in model.parameters()] == weights
    assert model_device(nn.ReLU()) is None
    with on_device(nn.ReLU(), "cpu"):  # a model without tensors has nowhere to go back to
        pass


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_on_device_moves_the_model_back():
    model = Net()
    with on_device(model, "cuda"):
        assert model_device(model).type == "cuda"
    assert model_device(model) == torch.device("cpu")


def test_autocast_is_off_on_the_cpu_and_native_backward_restores_onednn():
    with autocast("cpu"):
        assert not torch.is_autocast_enabled("cuda")
        assert torch.mm(torch.ones(2, 2), torch.ones(2, 2)).dtype == torch.float32
    before = torch.backends.mkldnn.enabled
    with native_cpu_backward():
        assert not torch._C._get_mkldnn_enabled()
    assert torch.backends.mkldnn.enabled == before
    with native_cpu_backward(enabled=False):
        assert torch._C._get_mkldnn_enabled() == before


def test_plain_progress_writes_periodic_lines_and_a_last_one():
    from dltest.progress import plain_progress

    lines: list[str] = []
    with plain_progress("attack", 10, 0.0, lines.append) as advance:  # every advance is past the interval
        for _ in range(5):
            advance(2)
    assert lines[0].startswith("attack: 2/10 (20%)") and lines[-1].startswith("attack: 10/10 (100%)")
    assert len(lines) == 6 and all("\n" not in line for line in lines)
    quiet: list[str] = []
    with plain_progress("short", 10, 3600.0, quiet.append) as advance:
        advance(10)
    assert quiet == []  # a job shorter than the interval prints nothing


def test_library_calls_leave_the_callers_model_mode_and_rng_alone(trained_lenet, mnist_test):
    import copy

    from dltest.attacks import attack_preset, generate_adversarial
    from dltest.inference import infer, mc_predictions
    from dltest.robustness import evaluate_robustness
    from dltest.selection import select

    data = mnist_test.subset(torch.arange(40))
    model = copy.deepcopy(trained_lenet).train()
    model.features[0].eval()
    before = modes(model)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(9)
    rng = torch.get_rng_state()
    fgsm = attack_preset("fgsm", "mnist", eps=0.1)
    calls = {
        "infer": lambda: infer(model, data, device="cpu"),
        "mc_predictions": lambda: mc_predictions(model, data, 2, 0.1, device="cpu"),
        "select egl": lambda: select("egl", 3, model=model, data=data, device="cpu"),
        "select bald": lambda: select("bald", 3, model=model, data=data, device="cpu", samples=2),
        "evaluate_robustness": lambda: evaluate_robustness(model, data, [fgsm], device="cpu"),
        "generate_adversarial": lambda: generate_adversarial(model, data, [0, 1, 2], fgsm, device="cpu"),
    }
    for name, call in calls.items():
        with pytest.warns() if name == "evaluate_robustness" else contextlib.nullcontext():
            call()
        assert modes(model) == before, name
        assert torch.equal(torch.get_rng_state(), rng), name
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
