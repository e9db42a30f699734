"""Benchmark adversarial training (issue 3).

(a) One PGD-k adversarial-training epoch of dltest's trainer divided by (k + 1) clean epochs of
    the same model on the same data. A PGD step costs a forward and a backward pass, as a
    training step does, so (k + 1) clean epochs is the floor an implementation without overhead
    reaches. Goal: <= 1.15. Measured for the trainer's lean PGD (``dltest.attacks.pgd_linf``)
    and, for comparison, for torchattacks' ``PGD`` as the adversary.
(b) The same epoch against the Adversarial Robustness Toolbox's ``AdversarialTrainerMadryPGD``
    (same model, data, initial weights, optimiser settings and attack settings), in the same
    run. Goal: dltest >= 3x faster. ART is not a dltest dependency: run this part in a separate
    environment that has it, e.g.::

        python3 -m venv /tmp/bench-venv
        echo /work/main/.venv/lib/python3.11/site-packages > /tmp/bench-venv/lib/python3.11/site-packages/dltest-venv.pth
        /tmp/bench-venv/bin/pip install adversarial-robustness-toolbox
        DLTEST_DATA=... /tmp/bench-venv/bin/python benchmarks/bench_adversarial_training.py

    ART's ``AdversarialTrainerMadryPGD`` does not expose the attack's batch size (its PGD
    generates in batches of 32 inside each training batch of 128); the run reports ART as
    shipped and ART with the attack's batch size raised to the training batch size.

Timings are the minimum over ``--repeats`` interleaved runs (the machine may be shared), one
epoch each, on MNIST (LeNet-5, the paper's MNIST model, SPEC §2 training PGD: eps 0.3,
step 0.01, 40 steps).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from dltest.attacks import attack_preset  # noqa: E402
from dltest.data import load_dataset  # noqa: E402
from dltest.training import TrainConfig, train  # noqa: E402
from dltest.zoo import model_for_dataset  # noqa: E402
from machine import machine  # noqa: E402  (benchmarks/machine.py)


def dltest_epoch(init, data, config, adversary=None) -> float:
    model = copy.deepcopy(init)
    result = train(model, data, None, config, adversary=adversary, device="cpu", progress=False)
    return result.seconds


def torchattacks_adversary(spec):
    import torchattacks

    cache = {}

    def adversary(model, x, y):
        if id(model) not in cache:
            cache[id(model)] = torchattacks.PGD(model, eps=spec.eps, alpha=spec.alpha, steps=spec.steps,
                                                random_start=True)
        return cache[id(model)](x, y)

    return adversary


def art_epoch(init, data, config, spec, attack_batch: int | None) -> float:
    from art.defences.trainer import AdversarialTrainerMadryPGD
    from art.estimators.classification import PyTorchClassifier

    model = copy.deepcopy(init)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                                weight_decay=config.weight_decay, nesterov=True)
    classifier = PyTorchClassifier(model=model, loss=torch.nn.CrossEntropyLoss(), optimizer=optimizer,
                                   input_shape=tuple(data.input_shape), nb_classes=data.num_classes,
                                   clip_values=(0.0, 1.0), device_type="cpu")
    trainer = AdversarialTrainerMadryPGD(classifier, nb_epochs=1, batch_size=config.batch_size, eps=spec.eps,
                                         eps_step=spec.alpha, max_iter=spec.steps, num_random_init=1)
    if attack_batch:
        trainer.attack.batch_size = attack_batch
    x = data.images().numpy()
    y = np.eye(data.num_classes, dtype=np.float32)[data.y.numpy()]
    started = time.perf_counter()
    trainer.fit(x, y)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=2048, help="training images (a fixed slice of MNIST train)")
    parser.add_argument("--steps", type=int, default=40, help="PGD steps k (SPEC §2 MNIST training: 40)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steadiest on a shared machine)")
    parser.add_argument("--no-art", action="store_true", help="skip part (b)")
    parser.add_argument("--no-torchattacks", action="store_true", help="skip the torchattacks-adversary row")
    parser.add_argument("--out", type=Path, help="also write the results as JSON")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    data = load_dataset("mnist", "train").subset(torch.arange(args.n))
    torch.manual_seed(0)
    init = model_for_dataset("mnist")
    config = TrainConfig(epochs=1, batch_size=args.batch_size, lr=0.05, seed=0)
    spec = attack_preset("pgd", "mnist", "train", steps=args.steps)
    try:
        import art  # noqa: F401

        has_art = not args.no_art
    except ImportError:
        has_art = False
        if not args.no_art:
            print("ART is not installed here: part (b) skipped (see the docstring for its environment)")

    runs: dict[str, list[float]] = {"clean": [], "dltest PGD": []}
    if not args.no_torchattacks:
        runs["torchattacks PGD"] = []
    if has_art:
        runs["ART MadryPGD"] = []
        runs[f"ART MadryPGD, attack batch {args.batch_size}"] = []
    dltest_epoch(init, data.subset(torch.arange(min(256, args.n))), config)  # warm-up
    for r in range(args.repeats):
        runs["clean"].append(dltest_epoch(init, data, config))
        runs["dltest PGD"].append(dltest_epoch(init, data, config, spec.adversary()))
        if "torchattacks PGD" in runs:
            runs["torchattacks PGD"].append(dltest_epoch(init, data, config, torchattacks_adversary(spec)))
        if has_art:
            runs["ART MadryPGD"].append(art_epoch(init, data, config, spec, None))
            runs[f"ART MadryPGD, attack batch {args.batch_size}"].append(art_epoch(init, data, config, spec, args.batch_size))
        print(f"repeat {r + 1}/{args.repeats}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in runs.items()), flush=True)

    best = {k: min(v) for k, v in runs.items()}
    k = args.steps
    floor = (k + 1) * best["clean"]
    results = {
        "machine": machine(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "settings": {"n": args.n, "batch_size": args.batch_size, "steps": k, "attack": spec.to_dict(),
                     "repeats": args.repeats, "model": "lenet5", "dataset": "mnist"},
        "seconds_min": best,
        "seconds_all": runs,
        "a_ratio_dltest": best["dltest PGD"] / floor,
    }
    if "torchattacks PGD" in best:
        results["a_ratio_torchattacks"] = best["torchattacks PGD"] / floor
    if has_art:
        results["b_speedup_vs_art"] = best["ART MadryPGD"] / best["dltest PGD"]
        results["b_speedup_vs_art_batched"] = best[f"ART MadryPGD, attack batch {args.batch_size}"] / best["dltest PGD"]

    print()
    print(f"machine: {results['machine']}")
    print(f"data: {args.n} MNIST training images, LeNet-5, batch {args.batch_size}; attack: {spec.label} (random start)")
    print(f"{'epoch':<36}{'min s':>10}")
    for name, value in best.items():
        print(f"{name:<36}{value:>10.2f}")
    print(f"(a) PGD-{k} epoch / ({k}+1) clean epochs: dltest {results['a_ratio_dltest']:.3f} (goal <= 1.15)"
          + (f", torchattacks adversary {results['a_ratio_torchattacks']:.3f}" if "a_ratio_torchattacks" in results else ""))
    if has_art:
        print(f"(b) ART AdversarialTrainerMadryPGD epoch / dltest epoch: {results['b_speedup_vs_art']:.2f}x as shipped, "
              f"{results['b_speedup_vs_art_batched']:.2f}x with ART's attack batch raised to {args.batch_size} (goal >= 3x)")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
