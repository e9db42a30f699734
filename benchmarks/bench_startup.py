"""Start-up costs: what the pytest plugin adds to every pytest run, what ``import dltest`` imports,
and how long ``dltest --help`` / ``--version`` take.

Every figure is a fresh Python process (as a user or CI pays it), its wall time and peak memory
(max RSS, from ``wait4``), median over ``--rounds``; the variants of one comparison alternate
within each round, because this VM's speed drifts. ``--before PATH`` measures another checkout
of dltest the same way (e.g. the commit before the change), put first on ``PYTHONPATH`` just as
this checkout is.

- plugin: ``pytest -q`` on a file with one trivial test, with the dltest plugin (registered as
  entry point ``pytest11``) and with ``-p no:dltest``; the difference is the plugin's cost.
- imports: ``python -X importtime -c 'import dltest'`` and ``... 'from dltest import select'``
  (what a command that selects pays): total and the top offenders by cumulative time.
- cli: ``python -m dltest --version``, ``--help`` and ``select --help``.

    OMP_NUM_THREADS=1 python benchmarks/bench_startup.py --before /work/main --out docs/bench-startup.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]
TRIVIAL_TEST = "def test_trivial():\n    assert 1 + 1 == 2\n"


NEUTRAL = Path(tempfile.gettempdir())  # the working folder of the measured processes: no checkout in it


def timed(command: list[str], checkout: Path, cwd: Path = NEUTRAL) -> tuple[float, float, str]:
    """(wall seconds, max RSS in MB, stderr) of one fresh process with ``checkout`` on the path
    (``cwd`` must hold no dltest: ``python -c`` and ``-m`` put it first on the path)."""
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    env.pop("COLUMNS", None)
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    stderr = process.stderr.read() if process.stderr else ""
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode not in (0, 1):  # 1: a usage screen that exits 1 is still a measurement
        raise RuntimeError(f"{' '.join(command)} failed ({process.returncode}): {stderr[-2000:]}")
    return seconds, usage.ru_maxrss / 1024, stderr


def summary(samples: list[tuple[float, float, str]]) -> dict:
    walls = [s[0] for s in samples]
    return {"wall_s_median": round(statistics.median(walls), 3), "wall_s_min": round(min(walls), 3),
            "wall_s_max": round(max(walls), 3), "max_rss_mb_median": round(statistics.median(s[1] for s in samples), 1)}


def compare(variants: dict[str, list[str]], checkout: Path, cwd: Path, rounds: int) -> dict:
    """Each variant once per round, in turn; a warm-up round first (file cache)."""
    for command in variants.values():
        timed(command, checkout, cwd)
    samples: dict[str, list] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, command in variants.items():
            samples[name].append(timed(command, checkout, cwd))
    return {name: summary(s) for name, s in samples.items()}


def plugin_overhead(checkout: Path, rounds: int) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        Path(folder, "test_trivial.py").write_text(TRIVIAL_TEST)
        pytest = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_trivial.py"]
        result = compare({"with plugin": pytest, "-p no:dltest": [*pytest, "-p", "no:dltest"]},
                         checkout, Path(folder), rounds)
    result["plugin_cost_s"] = round(result["with plugin"]["wall_s_median"] - result["-p no:dltest"]["wall_s_median"], 3)
    result["plugin_cost_mb"] = round(result["with plugin"]["max_rss_mb_median"]
                                     - result["-p no:dltest"]["max_rss_mb_median"], 1)
    return result


def import_offenders(statement: str, checkout: Path, top: int) -> dict:
    """``python -X importtime``: total microseconds of the statement's imports and the ``top``
    modules by cumulative time (nested ones included: torch appears with its submodules)."""
    _, _, stderr = timed([sys.executable, "-X", "importtime", "-c", statement], checkout)
    rows = []
    for line in stderr.splitlines():
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        self_us, cumulative_us, name = line[len("import time:"):].split("|")
        rows.append((int(cumulative_us), int(self_us), name))
    top_level = [r for r in rows if not r[2].startswith("  ")]  # imported by the statement itself (depth 0)
    return {
        "statement": statement,
        "total_s": round(sum(r[0] for r in top_level) / 1e6, 3),
        "modules": len(rows),
        "torch_imported": any(r[2].strip() == "torch" for r in rows),
        "top_cumulative": [{"module": name.strip(), "cumulative_s": round(c / 1e6, 3), "self_s": round(s / 1e6, 3)}
                           for c, s, name in sorted(rows, reverse=True)[:top]],
    }


def cli_times(checkout: Path, rounds: int) -> dict:
    dltest = [sys.executable, "-m", "dltest"]
    return compare({"--version": [*dltest, "--version"], "--help": [*dltest, "--help"],
                    "select --help": [*dltest, "select", "--help"]}, checkout, NEUTRAL, rounds)


def measure(checkout: Path, rounds: int, top: int) -> dict:
    found = subprocess.run([sys.executable, "-c", "import dltest; print(dltest.__file__)"], cwd=NEUTRAL,
                           env={**os.environ, "PYTHONPATH": str(checkout)}, capture_output=True, text=True).stdout
    assert Path(found.strip()).is_relative_to(checkout), f"{checkout} is not the dltest imported ({found})"
    return {
        "checkout": str(checkout),
        "commit": subprocess.run(["git", "-C", str(checkout), "rev-parse", "--short", "HEAD"], capture_output=True,
                                 text=True).stdout.strip(),
        "pytest_plugin": plugin_overhead(checkout, rounds),
        "imports": [import_offenders("import dltest", checkout, top),
                    import_offenders("from dltest import select", checkout, top)],
        "cli": cli_times(checkout, rounds),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--top", type=int, default=8, help="Offenders listed per import statement.")
    parser.add_argument("--before", type=Path, help="Another dltest checkout to measure the same way.")
    parser.add_argument("--out", type=Path, default=Path("bench-startup.json"))
    args = parser.parse_args()
    load_before = [round(x, 2) for x in os.getloadavg()]
    record = {"benchmark": "startup", "command": " ".join(["python", "benchmarks/bench_startup.py", *sys.argv[1:]]),
              "rounds": args.rounds, "after": measure(REPO, args.rounds, args.top)}
    if args.before:
        record["before"] = measure(args.before.resolve(), args.rounds, args.top)
    # machine() imports torch: only after the measurements, so that the processes forked for them
    # start from a small parent (a fork's max RSS counts the parent's pages until exec)
    from machine import machine  # benchmarks/machine.py (on sys.path: this script's folder)

    record["machine"] = {**machine(), "load_average_at_start": load_before}
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    for label in ("before", "after"):
        if label in record:
            r = record[label]
            print(f"{label} ({r['commit']}): plugin +{r['pytest_plugin']['plugin_cost_s']} s "
                  f"+{r['pytest_plugin']['plugin_cost_mb']} MB; import dltest {r['imports'][0]['total_s']} s; "
                  + ", ".join(f"{k} {v['wall_s_median']} s" for k, v in r["cli"].items()))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
