"""dltest: test and harden deep-learning image classifiers.

data -> model -> outputs -> selector -> attack -> trainer -> report::

    from dltest import load_dataset, load_model, select
    pool = load_dataset("mnist", "test")
    model, _ = load_model(dataset="mnist")
    selection = select("dre", "4%", model=model, data=pool, seed=0)
"""

from dltest._version import __version__

# The public names, imported on first use (PEP 562): ``import dltest`` (the pytest plugin, the
# command line's --help and --version) must not pay for torch until something needs it.
_EXPORTS = {
    "load_model": "dltest.checkpoint", "save_checkpoint": "dltest.checkpoint",
    "ImageDataset": "dltest.data", "LabeledPool": "dltest.data", "load_dataset": "dltest.data",
    "DltestError": "dltest.errors",
    "PoolOutputs": "dltest.inference", "infer": "dltest.inference",
    "SelectionResult": "dltest.selection", "load_selection": "dltest.selection", "select": "dltest.selection",
    "SELECTORS": "dltest.selectors",
    "TrainConfig": "dltest.training", "accuracy": "dltest.training", "train": "dltest.training",
    **dict.fromkeys(["ATTACKS", "AdversarialExamples", "AttackSpec", "PGDAdversary", "attack_preset", "build_attack",
                     "generate_adversarial", "load_adversarial", "pgd_adversary", "pgd_linf"], "dltest.attacks"),
    "DatasetProfile": "dltest.profiles", "dataset_profile": "dltest.profiles",
    "RobustnessReport": "dltest.robustness", "RobustnessWarning": "dltest.robustness",
    "evaluate_robustness": "dltest.robustness",
    "RetrainResult": "dltest.workflows.retrain", "retrain": "dltest.workflows.retrain",
    **dict.fromkeys(["EstimateResult", "EstimationPlan", "FigureEstimate", "estimate", "load_plan", "plan"],
                    "dltest.estimation"),
}
_RENAMED = {"SELECTORS": "REGISTRY"}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    """Import a public name's module on first access, and keep the name."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'dltest' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), _RENAMED.get(name, name))
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
