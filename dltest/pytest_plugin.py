"""pytest plugin (entry point ``pytest11``): robustness assertions in a project's own test suite.

::

    from dltest.pytest_plugin import assert_robust

    @pytest.mark.robustness                      # slow: deselect with -m "not robustness"
    def test_model_is_robust(dltest_model, dltest_data):
        assert_robust(dltest_model, dltest_data, attack="pgd", min_robust=0.8, n=500)

Fixtures (session-scoped): ``dltest_data``, the split ``--dltest-split`` (ini ``dltest_split``,
default ``holdout``) of ``--dltest-dataset`` (ini ``dltest_dataset``, default ``mnist``);
``dltest_model``, the model ``--dltest-model`` (ini ``dltest_model``; a dltest checkpoint,
TorchScript or ONNX file), default the bundled model of the dataset. A checkpoint naming a
``module:Class`` architecture is not built from the ini (that would run code a file names):
override ``dltest_model`` in your ``conftest.py`` with ``load_model(path, arch="module:Class")``.
A failed assertion lists every figure with its exact interval and the rule that decided it, as
one message under the caller's line (the traceback and the fixtures' values are shown with
``--tb=long``). A fixture that cannot load its data or model fails its tests with dltest's
one-line message.

The plugin loads in every pytest run where dltest is installed, so it imports nothing heavy
(torch, dltest) until a fixture or :func:`assert_robust` is used.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import pytest

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

    from dltest.data import ImageDataset
    from dltest.gate import GateResult

MARKER = "robustness"


def assert_robust(
    model: "nn.Module",
    data: "ImageDataset",
    attack: str | Sequence[str] = "pgd",
    min_robust: float | None = 0.8,
    **options: Any,
) -> "GateResult":
    """Assert that ``model`` keeps ``min_robust`` robust accuracy under ``attack`` on ``data``,
    decided on the exact one-sided lower bound (see :func:`dltest.gate.assert_robust` for the
    options: ``min_accuracy``, ``confidence``, ``n``, ``seed``, ``eps``, ``steps``, ...)."""
    __tracebackhide__ = True
    from dltest.gate import assert_robust as _assert_robust

    return _assert_robust(model, data, attack, min_robust, **options)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("dltest", "dltest robustness checks")
    group.addoption("--dltest-dataset", default=None, help="Dataset of the dltest_data fixture (default: mnist).")
    group.addoption("--dltest-split", default=None, help="Split of the dltest_data fixture (default: holdout).")
    group.addoption("--dltest-model", default=None, help="Model file of the dltest_model fixture (default: the bundled model).")
    parser.addini("dltest_dataset", "Dataset of the dltest_data fixture", default="mnist")
    parser.addini("dltest_split", "Split of the dltest_data fixture", default="holdout")
    parser.addini("dltest_model", "Model file of the dltest_model fixture", default="")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", f"{MARKER}: a slow robustness check with dltest (deselect with -m 'not {MARKER}')"
    )


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Any:
    """A failed :func:`assert_robust` is reported as its message under the caller's line (not 70
    lines of traceback and fixture reprs), unless a long traceback was asked for."""
    outcome = yield
    report = outcome.get_result()
    if report.failed and call.excinfo is not None and _is_gate_failure(call.excinfo.value) \
            and item.config.getoption("tbstyle", "auto") in ("auto", "short"):
        entries = call.excinfo.traceback.filter(call.excinfo)  # without the __tracebackhide__ frames
        where = ""
        if len(entries):
            path = Path(entries[-1].path)
            shown = path.relative_to(item.config.rootpath) if path.is_relative_to(item.config.rootpath) else path
            where = f"\n{shown}:{entries[-1].lineno + 1}: {type(call.excinfo.value).__name__}"
        report.longrepr = f"{call.excinfo.value}{where}"


def _is_gate_failure(error: BaseException) -> bool:
    gate = sys.modules.get("dltest.gate")  # loaded by whoever raised it: nothing to import here
    return gate is not None and isinstance(error, gate.RobustnessAssertionError)


def _setting(config: pytest.Config, name: str) -> str:
    return config.getoption(f"--dltest-{name}") or config.getini(f"dltest_{name}")


@pytest.fixture(scope="session")
def dltest_data(pytestconfig: pytest.Config) -> "ImageDataset":
    """The evaluation split (default: mnist holdout)."""
    from dltest.data import load_dataset
    from dltest.errors import DltestError

    try:
        return load_dataset(_setting(pytestconfig, "dataset"), _setting(pytestconfig, "split"))
    except DltestError as exc:
        problem = str(exc)
    pytest.fail(f"dltest_data: {problem}", pytrace=False)  # one line, outside the except: no chained report


@pytest.fixture(scope="session")
def dltest_model(pytestconfig: pytest.Config, dltest_data: "ImageDataset") -> Iterator["nn.Module"]:
    """The model under test, prepared as every dltest command prepares it
    (:func:`dltest.adapter.prepared`): checked to fit ``dltest_data``, an outside model adapted
    (logits), in eval mode, on the CPU (where a test's own tensors are); restored after the session."""
    from dltest.adapter import prepared
    from dltest.errors import DltestError
    from dltest.loading import load_model_for

    source = _setting(pytestconfig, "model") or None
    with contextlib.ExitStack() as session:
        try:  # a checkpoint naming a module:Class is refused: override this fixture with load_model(..., arch=...)
            _, model, info = load_model_for(dltest_data, source, fit_user_channels=False)  # the tests see dltest_data
            ready = session.enter_context(prepared(model, dltest_data, "cpu", info=info))
        except DltestError as exc:
            problem = str(exc)
        else:
            yield ready
            return
    pytest.fail(f"dltest_model: {problem}", pytrace=False)
