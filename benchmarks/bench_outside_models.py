"""What the outside-model adapter costs: dltest's one inference pass (logits + embeddings) on the
same LeNet-5 weights as a zoo model and as models users bring, over the MNIST test set (10k).

Kinds: the zoo model (embed + head, no adapter), a plain nn.Module returning a tuple (embeddings
from a forward pre-hook on its last nn.Linear, scores from the verified head), the same model
returning probabilities, and the zoo model scripted with TorchScript (its exported ``embed``).
Each kind's time is divided by the zoo model's time measured just before and just after it
(bracketed, in the same run: this VM's speed drifts between runs), and the headline per kind is
the median of those ratios over ``--repeats`` rounds. Also: exact EGL on 128 inputs, TorchScript
(per-sample Jacobians from one batched backward pass) over the zoo model (torch.func vmap+jacrev).

    DLTEST_DATA=../shared/datasets OMP_NUM_THREADS=1 python benchmarks/bench_outside_models.py --out docs/bench-outside-models.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.client_nets: the user-written LeNet-5

from dltest import infer, load_dataset, load_model  # noqa: E402
from dltest.inference import adapt  # noqa: E402
from dltest.selectors.egl import egl_exact  # noqa: E402
from tests.client_nets import ProbabilityNet, TupleNet, client_state_dict  # noqa: E402


def timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = load_dataset("mnist", "test")
    zoo, _ = load_model(dataset="mnist")
    weights = client_state_dict(zoo)
    kinds = {}
    for name, cls in (("tuple (hook)", TupleNet), ("probabilities (hook)", ProbabilityNet)):
        net = cls().eval()
        net.load_state_dict(weights)
        kinds[name] = net
    kinds["torchscript (embed)"] = torch.jit.script(zoo)
    probe = data.images(slice(0, 8))
    kinds = {name: adapt(model, probe) for name, model in kinds.items()}
    reference = infer(zoo, data, device="cpu")
    for name, model in kinds.items():  # same figures first: the ratios compare equal work
        out = infer(model, data, device="cpu")
        assert torch.allclose(out.probs, reference.probs, atol=1e-5) and out.embeddings.shape == reference.embeddings.shape

    ratios: dict[str, list[float]] = {name: [] for name in kinds}
    zoo_times = []
    for _ in range(args.repeats):
        for name, model in kinds.items():
            before = timed(lambda: infer(zoo, data, device="cpu"))
            t = timed(lambda: infer(model, data, device="cpu"))
            after = timed(lambda: infer(zoo, data, device="cpu"))
            zoo_times += [before, after]
            ratios[name].append(t / ((before + after) / 2))

    images = data.images(slice(0, 128))
    scripted = kinds["torchscript (embed)"]
    egl_ratios = []
    for _ in range(max(2, args.repeats // 2)):
        before = timed(lambda: egl_exact(zoo, images))
        t = timed(lambda: egl_exact(scripted, images))
        after = timed(lambda: egl_exact(zoo, images))
        egl_ratios.append(t / ((before + after) / 2))
    assert torch.allclose(egl_exact(scripted, images), egl_exact(zoo, images), rtol=1e-5)

    result = {
        "command": " ".join(sys.argv),
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} thread(s), torch {torch.__version__}",
        "pool": "mnist test (10000)",
        "zoo_infer_seconds_median": round(statistics.median(zoo_times), 4),
        "infer_ratio_to_zoo_median": {name: round(statistics.median(r), 3) for name, r in ratios.items()},
        "infer_ratio_to_zoo_all": {name: [round(x, 3) for x in r] for name, r in ratios.items()},
        "egl_exact_128_torchscript_over_zoo_median": round(statistics.median(egl_ratios), 3),
        "egl_ratios_all": [round(x, 3) for x in egl_ratios],
    }
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
