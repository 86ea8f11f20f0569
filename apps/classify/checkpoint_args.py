"""The options that name a classifier checkpoint, shared by ``eval``, ``predict``, ``explain``
and ``export``, and loading the classifier they name.

Only argparse at import time: the CLI builds every parser before any command runs, and
``--help`` must answer without loading torch.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from apps.classify.weights import LoadedClassifier

__all__ = ["add_checkpoint_options", "load_from_args", "read_class_names"]

CLASS_NAMES_HELP = "text file, one class name per line, for authors' checkpoints"


def add_checkpoint_options(
    p: argparse.ArgumentParser, *, class_names_help: str = CLASS_NAMES_HELP
) -> None:
    """--checkpoint, --no-ema, --model and --class-names."""
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
        help=f"{class_names_help} (default: the checkpoint's names, else class_0, class_1, ...)",
    )


def read_class_names(path: str | None) -> list[str] | None:
    """The non-empty lines of a --class-names file (None: no file given)."""
    if path is None:
        return None
    from apps.classify.datasets import DataError

    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise DataError(f"--class-names {path}: {exc.strerror}") from exc
    return [line.strip() for line in lines if line.strip()]


def load_from_args(args: argparse.Namespace) -> LoadedClassifier:
    """The classifier named by the options of :func:`add_checkpoint_options`, on the CPU."""
    from apps.classify.weights import load_classifier

    return load_classifier(
        args.checkpoint,
        weights="model" if args.no_ema else "ema",
        model_name=args.model,
        class_names=read_class_names(args.class_names),
    )
