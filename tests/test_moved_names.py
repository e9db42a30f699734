"""Names moved between modules (issue 19) stay importable from where they lived, as the same objects."""

import importlib

import pytest

MOVED = [
    # (old module, new module, names)
    ("dltest.inference", "dltest.adapter",
     ["ModelAdapter", "adapt", "class_scores", "detect_output_kind", "parse_normalize", "embedding_head",
      "embedding_help", "unwrap", "output_kind", "PROBE_SIZE", "OUTPUT_KINDS", "NORMALIZE_PRESETS"]),
    ("dltest.checkpoint", "dltest.adapter", ["check_fits"]),
    ("dltest.export", "dltest.onnx_model", ["OnnxClassifier", "load_onnx"]),
    ("dltest.checkpoint", "dltest.zoo", ["check_file_arch", "parse_arch_kwargs", "resolve_arch", "build_architecture"]),
]


@pytest.mark.parametrize("old, new, names", MOVED, ids=[f"{o}->{n}" for o, n, _ in MOVED])
def test_old_import_paths_give_the_new_objects(old, new, names):
    old_module, new_module = importlib.import_module(old), importlib.import_module(new)
    for name in names:
        value = getattr(new_module, name)
        assert getattr(old_module, name) is value, name
        if callable(value):
            assert value.__module__ == new, name  # defined in its new home, not re-exported from the old


def test_the_trust_rule_for_file_archs_moved_unchanged():
    """The trust rule moved unchanged: a zoo name passes, module:Class needs the user's say-so."""
    from dltest.errors import DltestError
    from dltest.zoo import check_file_arch

    check_file_arch("lenet5", "m.pt")
    check_file_arch("nets:Net", "m.pt", allowed=True)
    with pytest.raises(DltestError, match=r"m\.pt names architecture 'nets:Net'.*--trust-model"):
        check_file_arch("nets:Net", "m.pt")
