"""``export CHECKPOINT --onnx FILE``: a segmentation model as an ONNX graph of standard operators.

The graph takes a float32 "image" (batch, 3, height, width), normalised with the ImageNet
statistics, and returns per-pixel "logits" (batch, classes, height, width) at the input
resolution; batch, height and width are free unless ``--static``. The class names and the
normalisation are stored in the file's metadata. The file is checked in onnxruntime against
the model in PyTorch before the command reports success; see
:func:`ppma_models.export.export_onnx`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from apps.engine import options as shared
from apps.engine.export_command import add_onnx_options, write_onnx

__all__ = ["add_export_parser", "run_export"]


def add_export_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "export",
        help="write the model as an ONNX file",
        formatter_class=shared.HelpFormatter,
        description="Export a segmentation model to ONNX (standard operators only: the masked "
        "attention runs as the reference math), checked in onnxruntime.",
    )
    p.add_argument("checkpoint", help="run directory (its best.safetensors), .safetensors or .pt")
    add_onnx_options(p)
    return p


def run_export(args: argparse.Namespace) -> Path:
    """Write the ONNX file; returns its path."""
    # Imported when the command runs: the CLI builds this module's parser, and --help and
    # option errors must answer without loading torch.
    from ppma_models import IMAGENET_MEAN, IMAGENET_STD

    from apps.segment.model import load_trained

    model, spec = load_trained(args.checkpoint)
    model = model.float().cpu().eval()
    size = tuple(args.input_size or (spec.crop, spec.crop))
    metadata = {
        "class_names": json.dumps(list(spec.class_names)),
        "mean": json.dumps(list(IMAGENET_MEAN)),
        "std": json.dumps(list(IMAGENET_STD)),
    }
    return write_onnx(model, args, size, metadata)
