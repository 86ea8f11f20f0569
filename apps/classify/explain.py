"""``explain``: what a classifier attends to for one query pixel of an image.

Writes ``explain.png`` (a row per stage and head: the input, the decay maps α and β, the
polyline masks of both paths and their average, the attention map; see
:func:`ppma_models.explain.write_explanation_png`) and ``explain.npz`` (the raw arrays) to
``--out``, and prints the top prediction. The image is preprocessed as for ``predict``
(resized, and centre-cropped for inputs over 64 px); ``--pixel`` is a position in that model
input, which the picture's first column shows. Any checkpoint ``predict`` reads works: ours
or the authors' ``.pth``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from apps.engine import options as shared
from apps.engine.options import OptionError

__all__ = [
    "EXPLAIN_EPILOG",
    "add_explain_parser",
    "add_layer_options",
    "parse_index_list",
    "parse_pixel",
    "run_explain",
]

EXPLAIN_EPILOG = """\
examples:
  python -m apps.classify explain shirt.png --checkpoint runs/fmnist/best.safetensors
  python -m apps.classify explain cat.jpg --checkpoint ppma_tiny_ema.pth --model ppma_tiny \\
      --pixel 100,140 --heads 0,1 --out explain-cat

files written to --out: explain.png (the picture grid), explain.npz (the arrays: per layer
stage<S>/block<B>/alpha, beta, log_alpha, log_beta, mask_v2h, mask_h2v, mask_mean,
attention, query; and image, pixel, output).
"""


def parse_pixel(text: str) -> tuple[int, int]:
    """ "ROW,COL" → (row, col), both >= 0."""
    try:
        row, col = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected ROW,COL (two integers), got {text!r}") from None
    if row < 0 or col < 0:
        raise argparse.ArgumentTypeError(f"ROW and COL must be >= 0, got {text!r}")
    return row, col


def parse_index_list(text: str) -> list[int]:
    """ "0,2,3" → [0, 2, 3], each >= 0."""
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers like 0,1,2, got {text!r}") from None
    if any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"indices must be >= 0, got {text!r}")
    return values


def add_layer_options(p: argparse.ArgumentParser) -> None:
    """--layers and --heads (``apps.segment``'s explain has them too)."""
    p.add_argument(
        "--layers",
        choices=("last", "all"),
        default="last",
        help="attention layers to explain: the last block of each stage, or every block "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--heads",
        type=parse_index_list,
        default=None,
        metavar="I,J,...",
        help="heads to draw, e.g. 0,1; the .npz keeps every head (default: all)",
    )


def add_explain_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "explain",
        help="draw decay maps, polyline masks and attention for one pixel",
        epilog=EXPLAIN_EPILOG,
        formatter_class=shared.HelpFormatter,
        description="For one query pixel of an image: per stage and head, the decay maps,\n"
        "the polyline masks the query sees and its attention map.",
    )
    p.add_argument("image", help="image file")
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
        help="text file, one class name per line, for authors' checkpoints "
        "(default: the checkpoint's names, else class_0, class_1, ...)",
    )
    p.add_argument(
        "--pixel",
        type=parse_pixel,
        default=None,
        metavar="ROW,COL",
        help="query pixel in the model input (the resized, cropped image drawn in the "
        "first column) (default: its centre)",
    )
    p.add_argument("--out", default=None, help="output directory (default: explain-<image name>)")
    add_layer_options(p)
    shared.add_runtime_options(p, workers=False)
    return p


def run_explain(args: argparse.Namespace) -> int:
    """Write explain.png and explain.npz (the front end has set threads and the ops)."""
    # Imported when the command runs: the CLI builds this module's parser, and --help and
    # option errors must answer without loading torch.
    import torch
    from ppma_models.explain import explain, write_explanation_png

    from apps.classify.datasets import DataError, read_image
    from apps.classify.evaluate import _read_names
    from apps.classify.transforms import Preprocess
    from apps.classify.weights import load_classifier
    from apps.engine.distributed import resolve_device

    loaded = load_classifier(
        args.checkpoint,
        weights="model" if args.no_ema else "ema",
        model_name=args.model,
        class_names=_read_names(args.class_names),
    )
    device = resolve_device(args.device)
    model = loaded.model.to(device).eval()
    path = Path(args.image)
    try:
        raw = read_image(path, loaded.in_chans)
    except Exception as exc:  # PIL raises many exception types for bad files
        raise DataError(f"{path}: cannot read the image ({type(exc).__name__}: {exc})") from exc
    size, chans = loaded.input_size, loaded.in_chans
    x = Preprocess(size, loaded.mean, loaded.std, channels=chans)(raw)
    shown = Preprocess(size, [0.0] * chans, [1.0] * chans, channels=chans)(raw)  # no normalising
    if args.pixel is not None and not (args.pixel[0] < size[0] and args.pixel[1] < size[1]):
        raise OptionError(f"--pixel {args.pixel} lies outside the {size[0]}x{size[1]} model input")
    result = explain(
        model,
        x.to(device),
        pixel=args.pixel,
        layers=args.layers,
        display=shown.permute(1, 2, 0).expand(-1, -1, 3).clamp(0, 1).numpy(),
    )  # explain runs the model without recording gradients
    out = Path(args.out) if args.out else Path(f"explain-{path.stem}")
    out.mkdir(parents=True, exist_ok=True)
    heads = args.heads
    if heads is not None and not any(h < layer.heads for layer in result.layers for h in heads):
        raise OptionError(f"--heads {heads}: no layer has these heads")
    png = write_explanation_png(result, out / "explain.png", heads=heads)
    npz = result.save_npz(out / "explain.npz")
    probs = torch.from_numpy(result.output).double().softmax(0)
    top = int(probs.argmax())
    print(
        f"{path}: {loaded.class_names[top]} ({float(probs[top]):.3f}), query pixel {result.pixel}"
    )
    print(f"wrote {png} and {npz}")
    return 0
