"""What the apps' ``export`` commands share: the ONNX options, and writing the file and
reporting its agreement with PyTorch (docs/design.md §7.1).

Only argparse at import time: the CLIs build this parser before any command runs.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["OPSET", "add_onnx_options", "parse_size", "report_export", "write_onnx"]

#: --opset's default: ppma_models.export.DEFAULT_OPSET, written out so that building the
#: parser does not import torch (a test holds the two equal).
OPSET = 18


def parse_size(text: str) -> tuple[int, int]:
    """ "PX" or "H,W" → (H, W), each >= 1."""
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected PX or H,W, got {text!r}") from None
    if len(values) not in (1, 2) or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected PX or H,W with sizes >= 1, got {text!r}")
    return (values[0], values[-1])


def add_onnx_options(p: argparse.ArgumentParser) -> None:
    """--onnx, --input-size, --static, --opset, --threads. The export runs on the CPU; the
    front end sets the threads."""
    p.add_argument("--onnx", required=True, metavar="FILE", help="the .onnx file to write")
    p.add_argument(
        "--input-size",
        type=parse_size,
        default=None,
        metavar="PX|H,W",
        help="size of the traced example, and the graph's fixed size with --static "
        "(default: the checkpoint's input size)",
    )
    p.add_argument(
        "--static",
        action="store_true",
        help="fix batch 1 and --input-size in the graph (default: batch, height and width free)",
    )
    p.add_argument(
        "--opset",
        type=int,
        default=OPSET,
        help="ONNX opset version, >= 17 (default: %(default)s)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch CPU threads (default: 0, torch's choice)",
    )


def report_export(path: Path, model, size: tuple[int, int], *, dynamic: bool) -> None:
    """Print the file's size and its agreement with ``model`` (an nn.Module) in PyTorch at
    ``size`` (and, for a dynamic graph, at a size 33 and 63 pixels larger: other grids at
    every stage)."""
    from ppma_models.export import check_onnx

    sizes = [size] + ([(size[0] + 33, size[1] + 63)] if dynamic else [])
    errors = check_onnx(path, model, sizes, batch_size=1)
    agreement = ", ".join(f"{h}x{w}: {e:.2g}" for (h, w), e in errors.items())
    megabytes = sum(f.stat().st_size for f in path.parent.glob(path.name + "*")) / 2**20
    print(f"wrote {path} ({megabytes:.1f} MiB)")
    print(f"onnxruntime vs PyTorch, max |difference|: {agreement}")


def write_onnx(
    model: Any, args: argparse.Namespace, size: tuple[int, int], metadata: Mapping[str, str]
) -> Path:
    """Export ``model`` (an nn.Module in eval mode, on the CPU) as the options of
    :func:`add_onnx_options` say, traced at ``size``; print the file's agreement with PyTorch."""
    from ppma_models.export import export_onnx

    dynamic = not args.static
    path = export_onnx(
        model, args.onnx, input_size=size, dynamic=dynamic, opset=args.opset, metadata=metadata
    )
    report_export(path, model, size, dynamic=dynamic)
    return path
