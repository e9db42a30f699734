"""dltest: test and harden deep-learning image classifiers.

data -> model -> outputs -> selector -> attack -> trainer -> report::

    from dltest import load_dataset, load_model, select
    pool = load_dataset("mnist", "test")
    model, _ = load_model(dataset="mnist")
    selection = select("dre", "4%", model=model, data=pool, seed=0)
"""

__version__ = "0.1.0"

from dltest.checkpoint import load_model, save_checkpoint  # noqa: E402
from dltest.data import ImageDataset, load_dataset  # noqa: E402
from dltest.errors import DltestError  # noqa: E402
from dltest.inference import PoolOutputs, infer  # noqa: E402
from dltest.selection import SelectionResult, load_selection, select  # noqa: E402
from dltest.selectors import REGISTRY as SELECTORS  # noqa: E402
from dltest.training import TrainConfig, accuracy, train  # noqa: E402
from dltest.attacks import (  # noqa: E402
    ATTACKS, AdversarialExamples, AttackSpec, LinfPGD, attack_preset, build_attack, generate_adversarial,
    load_adversarial, pgd_adversary, pgd_linf,
)
from dltest.profiles import DatasetProfile, dataset_profile  # noqa: E402
from dltest.robustness import RobustnessReport, RobustnessWarning, evaluate_robustness  # noqa: E402
from dltest.workflows.retrain import RetrainResult, retrain  # noqa: E402
from dltest.estimation import EstimateResult, EstimationPlan, FigureEstimate, estimate, load_plan, plan  # noqa: E402

__all__ = [
    "ATTACKS", "AdversarialExamples", "AttackSpec", "DatasetProfile", "LinfPGD", "RetrainResult", "RobustnessReport",
    "RobustnessWarning", "attack_preset", "build_attack", "dataset_profile", "evaluate_robustness", "generate_adversarial",
    "load_adversarial", "pgd_adversary", "pgd_linf", "retrain",
    "EstimateResult", "EstimationPlan", "FigureEstimate", "estimate", "load_plan", "plan",
    "DltestError", "ImageDataset", "PoolOutputs", "SELECTORS", "SelectionResult", "TrainConfig",
    "accuracy", "infer", "load_dataset", "load_model", "load_selection", "save_checkpoint", "select", "train",
]
