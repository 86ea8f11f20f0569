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

from apps.classify.checkpoint_args import add_checkpoint_options
from apps.engine import options as shared
from apps.engine.explain_command import add_layer_options, parse_pixel, write_explanation
from apps.engine.options import OptionError

__all__ = ["EXPLAIN_EPILOG", "add_explain_parser", "run_explain"]

EXPLAIN_EPILOG = """\
examples:
  python -m apps.classify explain shirt.png --checkpoint runs/fmnist/best.safetensors
  python -m apps.classify explain cat.jpg --checkpoint ppma_tiny_ema.pth --model ppma_tiny \\
      --pixel 100,140 --heads 0,1 --out explain-cat

files written to --out: explain.png (the picture grid), explain.npz (the arrays: per layer
stage<S>/block<B>/alpha, beta, log_alpha, log_beta, mask_v2h, mask_h2v, mask_mean,
attention, query; and image, pixel, output).
"""


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
    add_checkpoint_options(p)
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
    from ppma_models.explain import explain

    from apps.classify.checkpoint_args import load_from_args
    from apps.classify.datasets import DataError, read_image
    from apps.classify.transforms import Preprocess
    from apps.engine.distributed import resolve_device

    loaded = load_from_args(args)
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
    png, npz = write_explanation(result, out, args.heads)
    probs = torch.from_numpy(result.output).double().softmax(0)
    top = int(probs.argmax())
    print(
        f"{path}: {loaded.class_names[top]} ({float(probs[top]):.3f}), query pixel {result.pixel}"
    )
    print(f"wrote {png} and {npz}")
    return 0
