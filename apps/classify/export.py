"""``export --onnx FILE``: a classifier as an ONNX graph of standard operators.

The graph takes a float32 "image" (batch, C, height, width) batch, normalised as the
checkpoint says, and returns "logits" (batch, classes); batch, height and width are free
unless ``--static``. Its metadata (``metadata_props``) records the class names, input size
and normalisation. The file is run in onnxruntime at the input size and a larger one and
compared with the model in PyTorch before the command reports success; see
:func:`ppma_models.export.export_onnx`.
"""

from __future__ import annotations

import argparse
import json

from apps.classify.checkpoint_args import add_checkpoint_options
from apps.engine import options as shared
from apps.engine.export_command import add_onnx_options, write_onnx

__all__ = ["EXPORT_EPILOG", "add_export_parser", "run_export"]

EXPORT_EPILOG = """\
examples:
  python -m apps.classify export --checkpoint runs/fmnist/best.safetensors --onnx fmnist.onnx
  python -m apps.classify export --checkpoint ppma_tiny_ema.pth --model ppma_tiny \\
      --onnx ppma_tiny.onnx
  python -c "import onnxruntime as ort, numpy as np; s = ort.InferenceSession('fmnist.onnx'); \\
      print(s.run(None, {'image': np.zeros((1, 1, 28, 28), np.float32)})[0])"
"""


def add_export_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "export",
        help="write the classifier as an ONNX file",
        epilog=EXPORT_EPILOG,
        formatter_class=shared.HelpFormatter,
        description="Export a classifier to ONNX (standard operators only: the masked\n"
        "attention runs as the reference math), checked in onnxruntime.",
    )
    add_checkpoint_options(
        p, class_names_help="text file, one class name per line, recorded in the file's metadata"
    )
    add_onnx_options(p)
    return p


def run_export(args: argparse.Namespace) -> int:
    """Write the ONNX file and report its agreement with PyTorch."""
    # Imported when the command runs: the CLI builds this module's parser, and --help and
    # option errors must answer without loading torch.
    from apps.classify.checkpoint_args import load_from_args

    loaded = load_from_args(args)
    model = loaded.model.float().cpu().eval()
    size = tuple(args.input_size or loaded.input_size)
    metadata = {
        "class_names": json.dumps(loaded.class_names),
        "input_size": json.dumps(list(loaded.input_size)),
        "mean": json.dumps(list(loaded.mean)),
        "std": json.dumps(list(loaded.std)),
    }
    write_onnx(model, args, size, metadata)
    return 0
