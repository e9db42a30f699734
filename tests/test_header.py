"""One header for every command's JSON: command, version, seed, then the command's own fields."""

import subprocess
import sys

import dltest
from dltest._version import __version__
from dltest.header import output_header


def test_output_header_starts_with_command_version_seed_then_extra_fields_in_order():
    header = output_header("analyze compare", [0, 1], runs=["a", "b"], dataset="mnist")
    assert header == {"command": "dltest analyze compare", "dltest_version": __version__, "seed": [0, 1],
                      "runs": ["a", "b"], "dataset": "mnist"}
    assert list(header) == ["command", "dltest_version", "seed", "runs", "dataset"]


def test_package_version_is_the_version_module_s_and_reading_it_imports_no_torch():
    assert dltest.__version__ == __version__
    code = "import sys, dltest, dltest.header; print(dltest.__version__, 'torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.split() == [__version__, "False"], done.stderr
