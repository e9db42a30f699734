"""Adversarial attacks: registered presets (SPEC §2), the lean PGD kernel, adversarial examples.

- :mod:`~dltest.attacks.presets`: one registered preset per attack (name, options it takes,
  builder), :class:`AttackSpec` and :func:`attack_preset`;
- :mod:`~dltest.attacks.kernels`: :func:`pgd_linf`, the batched PGD the trainer runs (its settings:
  :class:`PGDAdversary`), and
  :func:`deepfool_l2`, the batched DeepFool that DFAL and the ``deepfool`` preset run;
- :mod:`~dltest.attacks.examples`: :class:`AdversarialExamples`, their generation and files.
"""

from dltest.attacks.examples import AdversarialExamples, generate_adversarial, load_adversarial, with_examples
from dltest.attacks.kernels import DeepFoolL2, DeepFoolResult, PGDAdversary, deepfool_l2, pgd_linf
from dltest.attacks.presets import (
    ATTACKS, PRESETS, PURPOSES, Adversary, Attack, AttackSpec, Preset, attack_preset, build_attack,
    check_attack_name, check_attack_request, is_seeded, parse_attack_list, parse_eps, pgd_adversary, pgd_check,
    register, takes,
)
from dltest.runtime import native_cpu_backward, native_input_grad_pays

__all__ = [
    "ATTACKS", "PRESETS", "PURPOSES", "AdversarialExamples", "Adversary", "Attack", "AttackSpec", "DeepFoolL2", "DeepFoolResult",
    "deepfool_l2",
    "PGDAdversary", "Preset", "attack_preset", "build_attack", "check_attack_name", "check_attack_request",
    "generate_adversarial", "is_seeded",
    "load_adversarial", "native_cpu_backward", "native_input_grad_pays", "parse_attack_list", "parse_eps",
    "pgd_adversary", "pgd_check", "pgd_linf", "register", "takes", "with_examples",
]
