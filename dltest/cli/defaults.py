"""Defaults and choices the commands' help shows, written out here so that ``--help`` imports no
torch; tests/test_cli_startup.py checks that each equals the library's own value."""

INFERENCE_BATCH = 256  # dltest.inference.INFERENCE_BATCH
BINS = 50  # dltest.analysis.bias.BINS
PARITY_TOLERANCE = 1e-4  # dltest.export.PARITY_TOLERANCE
RETRAIN_LR = 0.01  # dltest.workflows.retrain.RETRAIN_LR
ARCHITECTURES = ("lenet5", "vgg8", "vgg16", "resnet18", "preactresnet18")  # dltest.zoo.ARCHITECTURES
AT_METHODS = ("pgd", "fgsm-rs", "n-fgsm", "trades")  # dltest.adversarial_training.AT_METHODS (its registry)
MAX_SEED = 2**32 - 1  # dltest.runtime.MAX_SEED
DESIGNS = ("srs", "stratified", "importance", "ppi", "active")  # dltest.estimation.DESIGNS
SCORES = ("entropy", "deepgini", "lc", "margin")  # dltest.estimation.SCORES
