"""The gate's outputs: a Markdown table, JUnit XML (one test case per bar), and GitHub Actions' step summary."""

from __future__ import annotations

import os
import stat
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

from dltest._version import __version__
from dltest.errors import DltestError
from dltest.io import atomic_path

if TYPE_CHECKING:
    from dltest.gate.decision import GateResult


def markdown_table(result: GateResult) -> str:
    """The bars as a GitHub-flavoured Markdown table."""
    conf = f"{100 * result.confidence:g}%"
    lines = [
        f"### dltest gate: {'passed' if result.passed else 'failed'}",
        "",
        f"{result.model or 'model'} on {result.report.n} inputs of {result.report.dataset}/{result.report.split}"
        f" (seed {result.report.seed}); intervals are exact at {conf}.",
        "",
        f"| bar | measured | {conf} interval | decided on | rule | result |",
        "|---|---|---|---|---|---|",
    ]
    for bar in result.bars:
        low, high = bar.interval
        lines.append(f"| `{bar.name}` | {_pct(bar.estimate)} ({bar.correct}/{bar.n}) | {_pct(low)} - {_pct(high)} "
                     f"| {bar.decided_on} | {bar.rule} | {'pass' if bar.passed else '**FAIL**'} |")
    for note in result.warnings:
        lines.append(f"\n> warning: {note}")
    return "\n".join(lines) + "\n"


def junit_xml(result: GateResult) -> str:
    """JUnit XML with one test case per bar (CI systems show failing bars as failing tests)."""
    failures = len(result.failures)
    seconds = f"{result.report.seconds:.3f}"
    suites = ET.Element("testsuites", name="dltest gate", tests=str(len(result.bars)), failures=str(failures),
                        errors="0", time=seconds)
    suite = ET.SubElement(suites, "testsuite", name="dltest gate", tests=str(len(result.bars)),
                          failures=str(failures), errors="0", skipped="0", time=seconds)
    props = ET.SubElement(suite, "properties")
    for key, value in (("model", result.model or ""), ("dataset", result.report.dataset),
                       ("split", result.report.split), ("n", result.report.n), ("seed", result.report.seed),
                       ("confidence", result.confidence), ("dltest_version", __version__)):
        ET.SubElement(props, "property", name=key, value=str(value))
    for bar in result.bars:
        case = ET.SubElement(suite, "testcase", classname=f"dltest.gate.{result.report.dataset}", name=bar.name,
                             time="0")
        if not bar.passed:
            failure = ET.SubElement(case, "failure", message=bar.describe(), type="GateBarFailed")
            failure.text = f"{bar.describe()}\nrule: {bar.rule}"
        else:
            out = ET.SubElement(case, "system-out")
            out.text = f"{bar.describe()}\nrule: {bar.rule}"
    ET.indent(suites)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(suites, encoding="unicode") + "\n"


def write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def append_step_summary(markdown: str, environ: Mapping[str, str] = os.environ) -> Path | None:
    """Append ``markdown`` to GitHub Actions' job summary when ``GITHUB_STEP_SUMMARY`` names a file."""
    target = environ.get("GITHUB_STEP_SUMMARY")
    if not target:
        return None
    try:
        # O_NONBLOCK: a named pipe without a reader fails at once instead of hanging the gate
        fd = os.open(target, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK, 0o666)
        with open(fd, "a", encoding="utf-8") as handle:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise OSError("not a regular file; dltest only writes regular files")
            handle.write(markdown + "\n")
    except OSError as exc:
        print(f"warning: cannot append to GITHUB_STEP_SUMMARY={target} ({exc.strerror or exc})", file=sys.stderr)
        return None
    return Path(target)


def check_step_summary(environ: Mapping[str, str] = os.environ) -> None:
    """Refuse, before any work, a ``GITHUB_STEP_SUMMARY`` that names something other than a regular
    file (a named pipe would block the gate, a device file would swallow the table)."""
    target = environ.get("GITHUB_STEP_SUMMARY")
    if not target or not os.path.lexists(target):
        return
    mode = os.stat(target).st_mode if os.path.exists(target) else 0
    if not stat.S_ISREG(mode):
        raise DltestError(f"GITHUB_STEP_SUMMARY={target} is not a regular file; dltest only appends to regular files")


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"

