"""Command line: ``python -m apps.classify {train,eval,predict} ...``."""

from __future__ import annotations

import argparse
import sys
import textwrap

from apps.classify.datasets import DataError
from apps.data.fashion_mnist import FashionMNISTError
from apps.engine.checkpoint import CheckpointError
from apps.engine.trainer import TrainingDiverged

__all__ = ["build_parser", "main"]

DESCRIPTION = """\
Train, evaluate and run PPMA image classifiers (Polyline Path Masked Attention).

Data (--data): fashion-mnist (Debian package dataset-fashion-mnist, or --data-dir),
digits (scikit-learn's 8x8 digits), or a directory with one subfolder per class
(ImageFolder / ImageNet layout; DIR/train and DIR/val are used when present).
Run `python -m apps.classify COMMAND --help` for each command's options.
"""

TRAIN_EPILOG = """\
examples:
  python -m apps.classify train --data fashion-mnist --out runs/fmnist --epochs 10
  python -m apps.classify train --data digits --out runs/digits --epochs 5 --input-size 16
  python -m apps.classify train --data ~/photos --input-size 224 --model ppma_tiny \\
      --pretrained ppma_tiny_ema.pth --epochs 20 --lr 2e-4 --out runs/photos
  python -m apps.classify train --resume runs/fmnist/last.pt
  torchrun --nproc-per-node 2 -m apps.classify train --data fashion-mnist --out runs/ddp

files written to --out: last.pt (resume), best.pt, best.safetensors / last.safetensors
(weights for eval/predict), metrics.jsonl, curves.png.
"""


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _add_runtime(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("runtime")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    g.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch CPU threads per process (default: torch's choice)",
    )
    g.add_argument(
        "--workers",
        type=int,
        default=0,
        help="DataLoader worker processes (default 0: load in the main process)",
    )
    g.add_argument(
        "--attention",
        choices=("native", "reference"),
        default="native",
        help="masked-attention ops: fused native kernels (falls back to the "
        "reference when not built) or the pure-PyTorch reference",
    )
    bar = g.add_mutually_exclusive_group()
    bar.add_argument(
        "--progress",
        dest="progress",
        action="store_true",
        default=None,
        help="always show progress bars (default: only on a terminal)",
    )
    bar.add_argument("--no-progress", dest="progress", action="store_false",
                     help="never show progress bars")  # fmt: skip


def _add_data(p: argparse.ArgumentParser, default: str | None) -> None:
    p.add_argument(
        "--data",
        default=default,
        required=default is None,
        help="fashion-mnist, digits, or an image-folder directory"
        + (f" (default {default})" if default else ""),
    )
    p.add_argument("--data-dir", default=None,
                   help="directory with the Fashion-MNIST IDX files "
                        "(default /usr/share/datasets/fashion-mnist)")  # fmt: skip


def _add_loading(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--checkpoint",
        required=True,
        help="our best.safetensors / last.pt / run directory, or an authors' .pth",
    )
    p.add_argument(
        "--no-ema",
        action="store_true",
        help="use the raw weights of a file that also holds EMA weights",
    )
    p.add_argument(
        "--model",
        default=None,
        help="model name for an authors' checkpoint whose args do not say it",
    )
    p.add_argument(
        "--class-names",
        default=None,
        help="text file, one class name per line (for authors' checkpoints)",
    )
    p.add_argument("--batch-size", type=_positive_int, default=256)  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m apps.classify",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser(
        "train", help="train a classifier", description="Train a PPMA classifier.",
        epilog=TRAIN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    _add_data(t, "fashion-mnist")
    t.add_argument("--out", default="runs/classify", help="run directory (default %(default)s)")
    t.add_argument(
        "--resume",
        default=None,
        metavar="LAST_PT",
        help="continue a run from its last.pt (its recipe and --out are reused)",
    )
    t.add_argument(
        "--stop-after-epochs",
        type=_positive_int,
        default=None,
        metavar="N",
        help="stop after N more epochs (the schedule still spans --epochs); "
        "continue later with --resume",
    )
    t.add_argument(
        "--val-fraction",
        type=float,
        default=0.1,
        help="share of the training images held out for validation and best-model "
        "selection (default %(default)s; 0 = none, best = last)",
    )
    t.add_argument(
        "--subset",
        type=_positive_int,
        default=None,
        metavar="N",
        help="train on a seeded random subset of N training images (quick trials)",
    )
    t.add_argument(
        "--input-size",
        type=_positive_int,
        default=None,
        help="square input size (default: native 28 / 8, 224 for folders)",
    )
    m = t.add_argument_group("model")
    m.add_argument(
        "--model", default="ppma_nano", help="ppma_nano (default), ppma_tiny, ppma_small, ppma_base"
    )
    m.add_argument(
        "--model-arg",
        action="append",
        metavar="KEY=VALUE",
        help="override a PPMAConfig field, e.g. dims=32,64,128,256 or head_hidden=256 (repeatable)",
    )
    m.add_argument(
        "--pretrained",
        default=None,
        help="initialise from an authors' .pth or our safetensors (fine-tuning)",
    )
    m.add_argument(
        "--drop-path", type=float, default=None, help="stochastic depth rate (default: the model's)"
    )
    o = t.add_argument_group("optimisation")
    o.add_argument("--epochs", type=_positive_int, default=10)
    o.add_argument(
        "--batch-size",
        type=_positive_int,
        default=128,
        help="images per process and step (default %(default)s)",
    )
    o.add_argument("--lr", type=float, default=2e-3, help="peak AdamW lr (default %(default)s)")
    o.add_argument(
        "--min-lr-ratio",
        type=_non_negative_float,
        default=0.01,
        help="final lr as a fraction of the peak (default %(default)s)",
    )
    o.add_argument("--weight-decay", type=_non_negative_float, default=0.05)
    o.add_argument("--warmup-epochs", type=_non_negative_float, default=1.0)
    o.add_argument("--label-smoothing", type=_non_negative_float, default=0.1)
    o.add_argument(
        "--ema-decay",
        type=_non_negative_float,
        default=0.0,
        help="keep an EMA of the weights with this decay, e.g. 0.999 (0 = off)",
    )
    o.add_argument(
        "--grad-clip",
        type=_non_negative_float,
        default=5.0,
        help="max global grad norm (0 = off, default %(default)s)",
    )
    o.add_argument(
        "--amp",
        action="store_true",
        help="bf16 autocast (CPU or CUDA); on CPU it pays off only for large models",
    )
    o.add_argument(
        "--augment",
        choices=("auto", "none"),
        default="auto",
        help="auto: pad+crop(+flip) for small inputs, random-resized crop for large",
    )
    flip = o.add_mutually_exclusive_group()
    flip.add_argument(
        "--hflip",
        dest="hflip",
        action="store_true",
        default=None,
        help="random horizontal flips (default: on, off for digits)",
    )
    flip.add_argument("--no-hflip", dest="hflip", action="store_false")
    o.add_argument("--seed", type=int, default=0)
    _add_runtime(t)  # fmt: skip

    e = sub.add_parser(
        "eval", help="evaluate a checkpoint",
        description="Top-1/top-5, per-class accuracy and a confusion matrix "
                    "(report.json + confusion.png in --out).",
    )  # fmt: skip
    _add_loading(e)
    _add_data(e, "fashion-mnist")
    e.add_argument(
        "--split",
        choices=("test", "train"),
        default="test",
        help="built-in split; for folders test = DIR/val if present (default test)",
    )
    e.add_argument(
        "--out",
        default=None,
        help="report directory (default: eval-<data>-<split> next to the checkpoint)",
    )
    e.add_argument("--json", action="store_true", help="print the JSON report on stdout")
    _add_runtime(e)  # fmt: skip

    p = sub.add_parser(
        "predict", help="label images",
        description="Top-k labels for image files and folders. Exit status 1 if some "
                    "images could not be read (they are reported and skipped).",
    )  # fmt: skip
    p.add_argument("inputs", nargs="+", help="image files and/or folders")
    _add_loading(p)
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--json", action="store_true", help="JSON instead of a table")
    _add_runtime(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "train":
            from apps.classify.train import run_train

            return run_train(args)
        if args.command == "eval":
            from apps.classify.evaluate import run_eval

            return run_eval(args)
        from apps.classify.predict import run_predict

        return run_predict(args)
    except (DataError, FashionMNISTError, CheckpointError, TrainingDiverged) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2 if not isinstance(exc, TrainingDiverged) else 1
    except ValueError as exc:  # e.g. model config validation
        print(f"error: {textwrap.shorten(str(exc), 2000)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
