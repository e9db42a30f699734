"""``dltest export --onnx FILE``: write a model to ONNX, checked against torch on real inputs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from dltest._version import __version__
from dltest.cli.app import app, flags
from dltest.header import output_header
from dltest.cli.options import (
    Arch, ArchKwargs, DataRoot, Dataset, Download, ModelPath, Normalize, Split, TrustModel, load_data_and_model,
)
from dltest.cli.defaults import PARITY_TOLERANCE


@app.command("export")
def export_command(
    onnx: Annotated[Path, typer.Option("--onnx", help="The ONNX file to write (dynamic batch size, dltest metadata inside).")],
    dataset: Dataset = "mnist",
    split: Split = "holdout",
    model: ModelPath = None,
    n: Annotated[int, typer.Option("--n", min=1, help="Real inputs of the split on which onnxruntime is compared with torch.")] = 512,
    tolerance: Annotated[float, typer.Option(help="Largest absolute logit difference accepted.")] = PARITY_TOLERANCE,
    opset: Annotated[Optional[int], typer.Option(help="ONNX opset (default: the exporter's).", show_default=False)] = None,
    out: Annotated[Optional[Path], typer.Option(help="Also write the export report as JSON.", show_default=False)] = None,
    data_root: DataRoot = None,
    download: Download = False,
    trust_model: TrustModel = False,
    arch: Arch = None,
    arch_kwargs: ArchKwargs = None,
    normalize: Normalize = None,
) -> None:
    """Export a model to ONNX; the file is kept only if onnxruntime matches torch on real inputs."""
    from dltest.export import check_export, export_onnx
    from dltest.io import check_outputs, write_json
    from rich.console import Console

    with flags(path="--onnx", n_check="--n"):
        check_export(None, onnx, None, n_check=n, tolerance=tolerance, opset=opset)  # before loading anything
        check_outputs({"--onnx": onnx, "--out": out}, {"--model": model, "--dataset": dataset})
        data, net, info = load_data_and_model(dataset, split, model, data_root, download, trust_model,
                                              arch, arch_kwargs, normalize)
        result = export_onnx(net, onnx, data, n_check=n, tolerance=tolerance, opset=opset,
                             metadata={"source": info.source, "arch": info.arch, "dltest_version": __version__})
    if out:
        write_json(out, {**output_header("export", None), "model": info.source, "onnx": result.path, "dataset": data.name, "split": data.split,
                         "n_checked": result.n_checked, "max_abs_diff": result.max_abs_diff,
                         "same_predictions": result.same_predictions, "tolerance": result.tolerance,
                         "opset": result.opset, "seconds": result.seconds})
    Console().print(
        f"wrote {result.path} (opset {result.opset}) in {result.seconds:.1f} s: onnxruntime vs torch on "
        f"{result.n_checked} {data.name}/{data.split} inputs, max |logit difference| {result.max_abs_diff:.3g} "
        f"(tolerance {result.tolerance:g}), same prediction on {100 * result.same_predictions:.2f}%"
    )
