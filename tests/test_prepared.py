"""One way to prepare a model (issue 19): ``prepared`` resolves the device, adapts outside models,
checks the fit, moves the model, puts it in eval mode and restores it all; and every library entry
point checks its arguments before any model pass (counted here: zero forwards)."""

from __future__ import annotations

import re

import pytest
import torch
from torch import Tensor, nn

from dltest.adapter import ModelAdapter, prepared
from dltest.errors import DltestError
from dltest.runtime import prepared as runtime_prepared
from tests.client_nets import ProbabilityNet, TupleNet, client_state_dict


class Forwards:
    """Counts the passes through ``model``'s first layer (every way of running it goes through
    there: ``forward``, and the ``embed``/``head`` split inference takes for zoo models)."""

    def __init__(self, model: nn.Module):
        self.count = 0
        self.handle = first_layer(model).register_forward_hook(self._seen)

    def _seen(self, _module, _args, _out) -> None:
        self.count += 1


class NoEmbeddings(nn.Module):
    """A classifier with no nn.Linear, no embed/head and no classifier: nothing to take embeddings from."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 10, 28)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x).flatten(1)


class NoGradients(nn.Module):
    """Stands in for an ONNX model: it says it has no gradients."""

    has_gradients = False

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(784, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(x.flatten(1))


def first_layer(model: nn.Module) -> nn.Module:
    return next(m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))


def modes(model: nn.Module) -> list[bool]:
    return [m.training for m in model.modules()]


@pytest.fixture(scope="module")
def pool(mnist_test):
    return mnist_test.subset(torch.arange(40))


@pytest.fixture
def training_net() -> nn.Module:
    """A LeNet-like net with dropout and BatchNorm, left in train mode with one module in eval mode."""
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Dropout(0.5),
                        nn.Linear(4 * 26 * 26, 10)).train()
    net[1].eval()
    return net


def test_runtime_prepared_is_the_adapters():
    assert runtime_prepared is prepared


def test_prepared_gives_eval_mode_and_restores_every_modules_mode(pool, training_net):
    before = modes(training_net)
    with prepared(training_net, pool, "cpu") as ready:
        assert not any(modes(training_net))
        first, second = ready(pool.images(slice(0, 4))), ready(pool.images(slice(0, 4)))
        assert torch.equal(first, second)  # dropout off, BatchNorm frozen
    assert modes(training_net) == before


def test_prepared_restores_the_mode_after_an_exception(pool, training_net):
    before = modes(training_net)
    with pytest.raises(RuntimeError, match="inside the block"):
        with prepared(training_net, pool, "cpu"):
            raise RuntimeError("inside the block")
    assert modes(training_net) == before


@pytest.mark.skipif(not torch.cuda.is_available(), reason="moving between devices needs a GPU")
def test_prepared_moves_to_the_device_and_back_also_after_an_exception(pool, training_net):
    with prepared(training_net, pool, "cuda") as ready:
        assert next(ready.parameters()).device.type == "cuda"
    assert next(training_net.parameters()).device.type == "cpu"
    with pytest.raises(RuntimeError):
        with prepared(training_net, pool, "cuda"):
            raise RuntimeError("inside the block")
    assert next(training_net.parameters()).device.type == "cpu"


def test_prepared_adapts_a_tuple_output_model(pool, trained_lenet):
    net = TupleNet().eval()
    net.load_state_dict(client_state_dict(trained_lenet))
    x = pool.images(slice(0, 8))
    with prepared(net, pool, "cpu") as ready:
        assert isinstance(ready, ModelAdapter)
        logits = ready(x)
    assert isinstance(logits, Tensor) and logits.shape == (8, 10)
    with torch.no_grad():
        assert torch.allclose(logits, trained_lenet(x), atol=1e-5)  # the zoo model's logits, same weights


def test_prepared_adapts_a_probability_output_model(pool, trained_lenet):
    net = ProbabilityNet().eval()
    net.load_state_dict(client_state_dict(trained_lenet))
    x = pool.images(slice(0, 8))
    with prepared(net, pool, "cpu") as ready:
        assert ready.output_kind == "probabilities"
        probs = torch.softmax(ready(x), 1)  # softmax of what dltest reads gives the model's own probabilities
    with torch.no_grad():
        assert torch.allclose(probs, net(x), atol=1e-5)
        assert torch.allclose(probs, torch.softmax(trained_lenet(x), 1), atol=1e-5)


def test_prepared_refuses_a_model_that_does_not_fit_in_one_line(pool, training_net):
    five = nn.Sequential(nn.Flatten(), nn.Linear(784, 5)).train()
    with pytest.raises(DltestError, match="outputs 5 classes, but mnist has 10") as err:
        with prepared(five, pool, "cpu"):
            pytest.fail("the block must not run")
    assert "\n" not in str(err.value)
    assert all(modes(five))  # refused, and left as it came
    wrong_shape = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10))
    with pytest.raises(DltestError, match=r"cannot take mnist inputs of shape \(1, 28, 28\)"):
        with prepared(wrong_shape, pool, "cpu"):
            pass


def test_a_model_inside_a_block_is_not_checked_again(pool, trained_lenet):
    from dltest.inference import infer

    with prepared(trained_lenet, pool, "cpu") as ready:
        forwards = Forwards(ready)
        outputs = infer(ready, pool, device="cpu")
    forwards.handle.remove()
    assert forwards.count == 1  # infer's one batch of 40; no second fit check
    assert outputs.logits.shape == (40, 10)


# --- arguments are checked before any model pass ------------------------------------------------


@pytest.fixture
def counted(trained_lenet):
    """The trained LeNet-5 with a count of the passes through its first layer (the hook removed after)."""
    forwards = Forwards(trained_lenet)
    yield trained_lenet, forwards
    forwards.handle.remove()


@pytest.mark.parametrize("budget, message", [
    ("abc", "budget 'abc' is neither a count"),
    ("0", "budget '0' must select at least one input"),
    ("120%", "not a percentage in (0%, 100%]"),
    ("41", "budget '41' exceeds the pool of 40 inputs"),
])
def test_select_refuses_a_bad_budget_before_any_forward_pass(pool, counted, budget, message):
    from dltest.selection import select

    model, forwards = counted
    with pytest.raises(DltestError, match=re.escape(message)) as err:
        select("entropy", budget, model=model, data=pool, device="cpu")
    assert err.value.param == "budget"
    assert forwards.count == 0


def test_select_refuses_what_a_metric_needs_of_the_model_before_any_forward_pass(pool):
    from dltest.selection import select

    no_embeddings, no_gradients = NoEmbeddings(), NoGradients()
    forwards = [Forwards(no_embeddings), Forwards(no_gradients)]
    with pytest.raises(DltestError, match="coreset: no penultimate embeddings"):
        select("coreset", 5, model=no_embeddings, data=pool, device="cpu")
    for metric in ("bald", "egl"):  # MC dropout and gradients: an ONNX-like model gives neither
        with pytest.raises(DltestError, match=f"metric '{metric}' runs the model again .* ONNX model"):
            select(metric, 5, model=no_gradients, data=pool, device="cpu")
    with pytest.raises(DltestError, match="reference= and its options apply to the metrics that compare"):
        select("entropy", 5, model=no_gradients, data=pool, device="cpu", reference=pool)
    assert [f.count for f in forwards] == [0, 0]


def test_other_entry_points_refuse_bad_arguments_before_any_forward_pass(pool, counted, tmp_path):
    from dltest.attacks import attack_preset, generate_adversarial
    from dltest.export import export_onnx
    from dltest.robustness import evaluate_robustness
    from dltest.workflows.retrain import retrain

    model, forwards = counted
    with pytest.raises(DltestError, match="unknown attack"):
        evaluate_robustness(model, pool, ["nope"], device="cpu")
    with pytest.raises(DltestError, match="steps applies to none of the attacks fgsm") as err:
        evaluate_robustness(model, pool, ["fgsm"], steps=5, device="cpu")
    assert err.value.param == "steps"
    unlabeled = pool.subset(torch.arange(10))
    unlabeled.labeled = False
    with pytest.raises(DltestError, match="has no labels .*evaluate_robustness"):
        evaluate_robustness(model, unlabeled, ["fgsm"], device="cpu")
    with pytest.raises(DltestError, match="has no labels .*generate_adversarial"):
        generate_adversarial(model, unlabeled, [0, 1], attack_preset("fgsm", "mnist", "eval"), device="cpu")
    with pytest.raises(DltestError, match="indices outside the pool of 40"):
        generate_adversarial(model, pool, [0, 40], attack_preset("fgsm", "mnist", "eval"), device="cpu")
    with pytest.raises(DltestError, match="budget '0' must select") as err:
        retrain(model, train_data=pool, pool=pool, holdout=pool, metric="entropy", budget="0", device="cpu")
    assert err.value.param == "budget"
    assert forwards.count == 0
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    with pytest.raises(DltestError, match=r"path must name an \.onnx file") as err:
        export_onnx(model, tmp_path / "model.pt", pool)
    assert err.value.param == "path"
    with pytest.raises(DltestError, match="tolerance must be > 0"):
        export_onnx(model, tmp_path / "model.onnx", pool, tolerance=0)
    with pytest.raises(DltestError, match="folder .* does not exist"):
        export_onnx(model, tmp_path / "missing" / "model.onnx", pool)
    assert forwards.count == 0
    assert not list(tmp_path.iterdir())


# --- the command line names flags -----------------------------------------------------------------


def test_library_parameters_become_flags_on_the_command_line():
    from dltest.cli.app import flag, flag_message, flags

    assert flag("val_n") == "--val-n" and flag("path", {"path": "--onnx"}) == "--onnx"
    error = DltestError("budget 'abc' is neither a count (e.g. 400) nor a percentage (e.g. 4%)", param="budget")
    assert flag_message(error) == "--budget 'abc' is neither a count (e.g. 400) nor a percentage (e.g. 4%)"
    # only the parameter as a word: not inside another name, not twice
    error = DltestError("n_check must be >= 1 (n_check counts inputs), got 0", param="n_check")
    assert flag_message(error, {"n_check": "--n"}) == "--n must be >= 1 (n_check counts inputs), got 0"
    assert flag_message(DltestError("a budget", cli="its own words", param="budget")) == "its own words"
    assert flag_message(DltestError("no parameter named")) == "no parameter named"
    with pytest.raises(DltestError) as err:
        with flags(path="--onnx"):
            raise DltestError("path must name an .onnx file, got m.pt", param="path")
    assert err.value.cli_message == "--onnx must name an .onnx file, got m.pt"


def test_the_cli_shows_the_librarys_budget_check_with_its_flag(lenet_checkpoint, tmp_path):
    from tests.cli_runner import run_cli

    result = run_cli("select", "-m", str(lenet_checkpoint), "--metric", "entropy", "-b", "abc",
                     "--out", str(tmp_path / "s.json"))
    assert result.exit_code == 2
    assert "error: --budget 'abc' is neither a count (e.g. 400) nor a percentage (e.g. 4%)" in result.output
    assert not (tmp_path / "s.json").exists()
