"""The gate's settings as the library merges them: flags over the configuration file, checked."""

from __future__ import annotations

from pathlib import Path

import pytest

from dltest.errors import DltestError
from dltest.gate import gate_settings


def test_flags_override_the_file_and_defaults_fill_the_rest(tmp_path):
    (tmp_path / "dltest.toml").write_text('[gate]\nmin-accuracy = 0.9\nmin-robust = "pgd=0.5"\nn = 200\nseed = 3\n'
                                          'attacks = ["pgd", "fgsm"]\nmodel = "m.pt"\n')
    settings = gate_settings({"min-accuracy": 0.95, "seed": None, "eps": "8/255", "baseline": Path("b.json")},
                             folder=tmp_path)
    assert settings.policy.min_accuracy == 0.95 and settings.policy.min_robust == {"pgd": 0.5}
    assert (settings.n, settings.seed, settings.attacks, settings.model) == (200, 3, ["pgd", "fgsm"], "m.pt")
    assert settings.eps == pytest.approx(8 / 255) and settings.baseline == "b.json"
    assert (settings.dataset, settings.split, settings.allow_randomised) == ("mnist", "holdout", False)
    assert settings.source == str(tmp_path / "dltest.toml")
    assert settings.evaluation() == {"attacks": ["pgd", "fgsm"], "eps": pytest.approx(8 / 255), "n": 200, "seed": 3,
                                     "steps": None, "queries": None, "alpha": None, "allow_randomised": False}


def test_no_file_no_flags_gives_an_empty_policy(tmp_path):
    settings = gate_settings({}, folder=tmp_path)
    assert settings.policy.is_empty() and settings.source is None and settings.attacks == []


@pytest.mark.parametrize("table, message", [
    ("n = 1.5", "n must be an integer, got 1.5"),
    ("seed = true", "seed must be an integer, got True"),
    ('confidence = "high"', "confidence must be a number, got 'high'"),
    ('alpha = "x"', "alpha must be a number, got 'x'"),
    ("model = 3", "model must be a string, got 3"),
    ('attacks = "pgd,nope"', "nope"),
])
def test_bad_values_in_the_file_are_one_line_errors(tmp_path, table, message):
    (tmp_path / "dltest.toml").write_text(f"[gate]\nmin-accuracy = 0.9\n{table}\n")
    with pytest.raises(DltestError, match=message) as info:
        gate_settings({}, folder=tmp_path)
    assert "\n" not in str(info.value)


def test_an_unknown_setting_is_refused():
    with pytest.raises(DltestError, match="unknown gate setting 'min_accuracy'"):
        gate_settings({"min_accuracy": 0.9})
