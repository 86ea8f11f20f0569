"""What the apps' ``explain`` commands share: the pixel and layer options, and writing the
picture and the arrays (docs/design.md §7.2).

Only argparse at import time: the CLIs build this parser before any command runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from apps.engine.options import OptionError

__all__ = ["add_layer_options", "parse_index_list", "parse_pixel", "write_explanation"]


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
    """--layers and --heads."""
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


def write_explanation(
    result: Any, out: Path, heads: list[int] | None, **extra: Any
) -> tuple[Path, Path]:
    """Write ``out/explain.png`` (the chosen heads) and ``out/explain.npz`` (every head, and
    the ``extra`` arrays) for a :class:`ppma_models.explain.Explanation`; returns both paths."""
    from ppma_models.explain import write_explanation_png

    if heads is not None and not any(h < layer.heads for layer in result.layers for h in heads):
        raise OptionError(f"--heads {heads}: no layer has these heads")
    out.mkdir(parents=True, exist_ok=True)
    png = write_explanation_png(result, out / "explain.png", heads=heads)
    return png, result.save_npz(out / "explain.npz", **extra)
