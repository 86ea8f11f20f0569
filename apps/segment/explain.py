"""``explain CHECKPOINT IMAGE --pixel ROW,COL``: what a segmentation model attends to for a pixel.

The model sees the window of ``--window`` pixels (default: the training crop, the scale it
learned at; 0 = the whole image) that is centred on the pixel as far as the image allows, as
sliding-window inference would show it. For each stage and head of its backbone,
``explain.png`` draws the decay maps α and β, the polyline masks of both paths and their
average, and the pixel's attention map over that window; ``explain.npz`` holds the arrays
(see :func:`ppma_models.explain.explain`) plus ``window`` = (top, left, height, width) in
the image. The class predicted at the pixel is printed.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from apps.engine import options as shared
from apps.engine.explain_command import add_layer_options, parse_pixel, write_explanation
from apps.engine.options import OptionError

__all__ = ["add_explain_parser", "run_explain", "window_around"]


def window_around(pixel: int, length: int, window: int) -> int:
    """Start of the ``window`` (≤ length) centred on ``pixel`` as far as [0, length) allows."""
    return min(max(pixel - window // 2, 0), length - window)


def add_explain_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "explain",
        help="decay maps, polyline masks and attention for one pixel",
        formatter_class=shared.HelpFormatter,
        description="For one pixel of an image: per backbone stage and head, the decay maps, "
        "the polyline masks the pixel's token sees and its attention map.",
    )
    p.add_argument("checkpoint", help="run directory (its best.safetensors), .safetensors or .pt")
    p.add_argument("image", help="image file")
    p.add_argument(
        "--pixel",
        type=parse_pixel,
        default=None,
        metavar="ROW,COL",
        help="query pixel in the image (default: its centre)",
    )
    p.add_argument(
        "--window",
        type=int,
        default=None,
        help="side of the window around the pixel the model sees; 0 = the whole image "
        "(default: the training crop)",
    )
    p.add_argument("--out", default=None, help="output directory (default: explain-<image name>)")
    add_layer_options(p)
    shared.add_runtime_options(p, workers=False)
    return p


def run_explain(args: argparse.Namespace) -> Path:
    """Write explain.png and explain.npz; returns the output directory. The front end has
    set the threads and the ops' backend."""
    # Imported when the command runs: the CLI builds this module's parser, and --help and
    # option errors must answer without loading torch.
    import numpy as np
    from ppma_models.explain import explain

    from apps.engine.distributed import resolve_device
    from apps.segment.folder import read_image
    from apps.segment.model import load_trained
    from apps.segment.transforms import to_tensors

    model, spec = load_trained(args.checkpoint)
    device = resolve_device(args.device)
    model.to(device)
    path = Path(args.image)
    try:
        image = read_image(path)
    except (OSError, ValueError) as exc:
        raise OptionError(f"cannot read image {path}: {exc}") from None
    height, width = image.shape[:2]
    row, col = args.pixel if args.pixel is not None else (height // 2, width // 2)
    if not (row < height and col < width):
        raise OptionError(f"--pixel {row},{col} lies outside the {height}x{width} image")
    side = spec.crop if args.window is None else args.window
    if side < 0:
        raise OptionError(f"--window must be >= 0, got {side}")
    win_h, win_w = (height, width) if side == 0 else (min(side, height), min(side, width))
    top, left = window_around(row, height, win_h), window_around(col, width, win_w)
    crop = np.ascontiguousarray(image[top : top + win_h, left : left + win_w])
    result = explain(
        model,
        to_tensors(crop).to(device),
        pixel=(row - top, col - left),
        layers=args.layers,
        display=crop / 255.0,
    )
    out = Path(args.out) if args.out else Path(f"explain-{path.stem}")
    png, npz = write_explanation(
        result, out, args.heads, window=np.array([top, left, win_h, win_w])
    )
    label = int(result.output[:, row - top, col - left].argmax())
    print(
        f"{path} pixel ({row}, {col}): {spec.class_names[label]}; "
        f"window {win_h}x{win_w} at ({top}, {left})"
    )
    print(f"wrote {png} and {npz}")
    return out
