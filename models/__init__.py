"""Checkpoints produced by dltest's own commands; installed as ``dltest.pretrained``."""
