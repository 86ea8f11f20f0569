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
from pathlib import Path

from apps.engine import options as shared

__all__ = [
    "EXPORT_EPILOG",
    "OPSET",
    "add_export_parser",
    "add_onnx_options",
    "parse_size",
    "report_export",
    "run_export",
]

#: --opset's default: ppma_models.export.DEFAULT_OPSET, written out so that building the
#: parser does not import torch (a test holds the two equal).
OPSET = 18

EXPORT_EPILOG = """\
examples:
  python -m apps.classify export --checkpoint runs/fmnist/best.safetensors --onnx fmnist.onnx
  python -m apps.classify export --checkpoint ppma_tiny_ema.pth --model ppma_tiny \\
      --onnx ppma_tiny.onnx
  python -c "import onnxruntime as ort, numpy as np; s = ort.InferenceSession('fmnist.onnx'); \\
      print(s.run(None, {'image': np.zeros((1, 1, 28, 28), np.float32)})[0])"
"""


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
    """--onnx, --input-size, --static, --opset, --threads (``apps.segment``'s export has them
    too). The export runs on the CPU; the front end sets the threads."""
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


def add_export_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "export",
        help="write the classifier as an ONNX file",
        epilog=EXPORT_EPILOG,
        formatter_class=shared.HelpFormatter,
        description="Export a classifier to ONNX (standard operators only: the masked\n"
        "attention runs as the reference math), checked in onnxruntime.",
    )
    p.add_argument(
        "--checkpoint",
        required=True,
        help="our best.safetensors / last.pt / run directory, or an authors' .pth",
    )
    p.add_argument(
        "--no-ema",
        action="store_true",
        help="use the raw weights of a file that also holds EMA weights "
        "(default: the EMA weights when present)",
    )
    p.add_argument(
        "--model",
        default=None,
        help="model name for an authors' checkpoint whose args do not say it "
        "(default: the name the checkpoint records)",
    )
    p.add_argument(
        "--class-names",
        default=None,
        help="text file, one class name per line, recorded in the file's metadata "
        "(default: the checkpoint's names, else class_0, class_1, ...)",
    )
    add_onnx_options(p)
    return p


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


def run_export(args: argparse.Namespace) -> int:
    """Write the ONNX file and report its agreement with PyTorch."""
    # Imported when the command runs: the CLI builds this module's parser, and --help and
    # option errors must answer without loading torch.
    from ppma_models.export import export_onnx

    from apps.classify.evaluate import _read_names
    from apps.classify.weights import load_classifier

    loaded = load_classifier(
        args.checkpoint,
        weights="model" if args.no_ema else "ema",
        model_name=args.model,
        class_names=_read_names(args.class_names),
    )
    model = loaded.model.float().cpu().eval()
    size = tuple(args.input_size or loaded.input_size)
    metadata = {
        "class_names": json.dumps(loaded.class_names),
        "input_size": json.dumps(list(loaded.input_size)),
        "mean": json.dumps(list(loaded.mean)),
        "std": json.dumps(list(loaded.std)),
    }
    path = export_onnx(
        model,
        args.onnx,
        input_size=size,
        dynamic=not args.static,
        opset=args.opset,
        metadata=metadata,
    )
    report_export(path, model, size, dynamic=not args.static)
    return 0
