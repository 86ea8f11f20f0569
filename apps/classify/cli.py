"""Command line: ``python -m apps.classify {train,eval,predict} ...``.

The training, runtime and ``--model-arg`` options are the shared ones of
:mod:`apps.engine.options`; this module adds the classifier's. Every option's help states its
default once, as "(default: ...)"; a test holds the help to it.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from apps.classify.checkpoint_args import add_checkpoint_options
from apps.classify.datasets import DataError
from apps.classify.explain import EXPLAIN_EPILOG, add_explain_parser
from apps.classify.export import EXPORT_EPILOG, add_export_parser
from apps.data.fashion_mnist import FashionMNISTError
from apps.engine import options as shared
from apps.engine.command import run_command

__all__ = ["DEFAULTS", "EPILOGS", "build_parser", "check", "main"]

DESCRIPTION = """\
Train, evaluate and run PPMA image classifiers (Polyline Path Masked Attention).

Data (--data): fashion-mnist (Debian package dataset-fashion-mnist, or --data-dir),
digits (scikit-learn's 8x8 digits), or a directory with one subfolder per class
(ImageFolder / ImageNet layout; DIR/train, DIR/val and DIR/test are its splits when present).
Run `python -m apps.classify COMMAND --help` for each command's options.
"""

TRAIN_EPILOG = """\
examples:
  python -m apps.classify train --data fashion-mnist --out runs/fmnist
  python -m apps.classify train --data ~/photos --out runs/photos
  python -m apps.classify train --data digits --out runs/digits --epochs 5 --input-size 16
  python -m apps.classify train --data fashion-mnist --out runs/fm3 \\
      --model-arg dims=32,64,128 depths=1,2,1 head_hidden=256
  python -m apps.classify train --data ~/photos --model ppma_tiny \\
      --pretrained ppma_tiny_ema.pth --epochs 20 --lr 2e-4 --out runs/photos-tiny
  python -m apps.classify train --resume runs/fmnist/last.pt
  python -m apps.classify train --out runs/fmnist --resume auto
  torchrun --nproc-per-node 2 -m apps.classify train --data fashion-mnist --out runs/ddp

Options left at their default are fitted to the data (input size, batch size, epochs,
warm-up); the settings block printed before the first epoch says what was chosen and why.
The val images (--val-fraction of train, or DIR/val) pick best.*; test images never do.

files written to --out: best.pt, best.safetensors (whenever val accuracy improves),
last.pt (for --resume), last.safetensors (after each epoch; with epochs shorter than 30 s,
every 30 s and after the last one), metrics.jsonl (one record per epoch), curves.png.
The .safetensors files hold the weights for eval and predict.
"""

EVAL_EPILOG = """\
examples:
  python -m apps.classify eval --checkpoint runs/fmnist/best.safetensors --data fashion-mnist
  python -m apps.classify eval --checkpoint runs/photos --data ~/photos --split val --json
"""

PREDICT_EPILOG = """\
examples:
  python -m apps.classify predict photo.jpg ~/more-photos --checkpoint runs/photos --top-k 3
  python -m apps.classify predict shirt.png --checkpoint runs/fmnist/best.safetensors --json
"""

#: The epilog of each command, for the test that runs their examples through the parser.
EPILOGS = {
    "train": TRAIN_EPILOG,
    "eval": EVAL_EPILOG,
    "predict": PREDICT_EPILOG,
    "explain": EXPLAIN_EPILOG,
    "export": EXPORT_EPILOG,
}

DEFAULTS = shared.TrainingDefaults(
    epochs_help="passes over the training images (default: 10, or as many as give >= 150 "
    "steps on small data, at most 100)",
    batch_help="images per process and step (default: the largest power of two giving >= 4 "
    "steps per epoch, at most 128)",
    warmup_help="default: 1 epoch, at most 10%% of the run",
    out="runs/classify",
    weight_decay=0.05,
    min_lr_ratio=0.01,
    schedule="cosine",
    grad_clip=5.0,
)

HELP = shared.HelpFormatter

#: The classifier's own options' ranges, beside the shared ones.
RULES = {
    "input_size": shared.AT_LEAST_ONE,
    "subset": shared.AT_LEAST_ONE,
    "top_k": shared.AT_LEAST_ONE,
    "val_fraction": shared.RATE,
    "label_smoothing": shared.RATE,
    "drop_path": shared.RATE,
}


def _add_data(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data",
        default="fashion-mnist",
        help="fashion-mnist, digits, or an image-folder directory (default: %(default)s)",
    )
    p.add_argument("--data-dir", default=None,
                   help="directory with the Fashion-MNIST IDX files "
                        "(default: /usr/share/datasets/fashion-mnist)")  # fmt: skip


def _add_loading(p: argparse.ArgumentParser) -> None:
    add_checkpoint_options(p)
    p.add_argument("--batch-size", type=int, default=256,
                   help="images per forward pass (default: %(default)s)")  # fmt: skip


def _add_split(t: argparse.ArgumentParser) -> None:
    t.add_argument(
        "--val-fraction",
        type=float,
        default=0.1,
        help="share of the training images held out as val images, which pick "
        "best.*; 0 = none, best = last; unused when DIR/val exists "
        "(default: %(default)s)",
    )
    t.add_argument(
        "--subset",
        type=int,
        default=None,
        metavar="N",
        help="train on a seeded random subset of N training images, for quick "
        "trials (default: all)",
    )
    t.add_argument(
        "--input-size",
        type=int,
        default=None,
        metavar="PX",
        help="square input size (default: 28 for fashion-mnist, 8 for digits; for "
        "a folder whose images are at most 64 px, their median size rounded "
        "up to a multiple of the model's stride, e.g. 25x25 -> 32; else 224)",
    )


def _add_model(t: argparse.ArgumentParser) -> None:
    m = t.add_argument_group("model")
    m.add_argument(
        "--model",
        default="ppma_nano",
        help="ppma_nano, ppma_tiny, ppma_small or ppma_base (default: %(default)s)",
    )
    shared.add_model_arg_option(m)
    m.add_argument(
        "--pretrained",
        default=None,
        help="initialise from an authors' .pth or our safetensors, for fine-tuning "
        "(default: random initialisation)",
    )
    m.add_argument("--drop-path", type=float, default=None, metavar="RATE",
                   help="stochastic depth rate (default: the model's)")  # fmt: skip


def _add_augmentation(o: argparse._ArgumentGroup) -> None:
    o.add_argument(
        "--label-smoothing",
        type=float,
        default=0.1,
        help="label smoothing of the training cross-entropy; val loss is plain "
        "(default: %(default)s)",
    )
    o.add_argument(
        "--augment",
        choices=("auto", "flip", "none"),
        default="auto",
        help="auto: pad+crop(+flip) for inputs up to 64 px, random-resized crop "
        "(+flip) for larger ones; flip: horizontal flips only; none: no augmentation "
        "(default: %(default)s)",
    )
    flip = o.add_mutually_exclusive_group()
    flip.add_argument(
        "--hflip",
        dest="hflip",
        action="store_true",
        default=None,
        help="random horizontal flips with --augment auto or flip (default: on, off for digits)",
    )
    flip.add_argument(
        "--no-hflip", dest="hflip", action="store_false", default=None,
        help="no random horizontal flips",
    )  # fmt: skip


def _add_train(sub: argparse._SubParsersAction) -> None:
    t = sub.add_parser(
        "train", help="train a classifier", description="Train a PPMA classifier.",
        epilog=TRAIN_EPILOG, formatter_class=HELP,
    )  # fmt: skip
    _add_data(t)
    shared.add_run_options(t, DEFAULTS)
    _add_split(t)
    _add_model(t)
    _add_augmentation(shared.add_optimisation_options(t, DEFAULTS))
    shared.add_runtime_options(t)


def _add_eval(sub: argparse._SubParsersAction) -> None:
    e = sub.add_parser(
        "eval", help="evaluate a checkpoint", epilog=EVAL_EPILOG, formatter_class=HELP,
        description="Top-1/top-5 accuracy, per-class accuracy and a confusion matrix\n"
                    "(report.json + confusion.png in --out).",
    )  # fmt: skip
    _add_loading(e)
    _add_data(e)
    e.add_argument(
        "--split",
        choices=("train", "val", "test"),
        default=None,
        help="folders: DIR/<split>; built-in sets: train or test (default: test "
        "where there is one, else val, else every image of a folder without "
        "split subfolders)",
    )
    e.add_argument(
        "--out",
        default=None,
        help="report directory (default: eval-<data>-<split> next to the checkpoint)",
    )
    e.add_argument(
        "--flip",
        action="store_true",
        help="also run each mirrored image and average the softmax probabilities (flip "
        "test-time augmentation; for models trained with flips) (default: off)",
    )
    e.add_argument("--json", action="store_true",
                   help="print the JSON report on stdout (default: a table)")  # fmt: skip
    shared.add_runtime_options(e)


def _add_predict(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "predict", help="label images", epilog=PREDICT_EPILOG, formatter_class=HELP,
        description="Top-k labels for image files and folders. Exit status 1 if some\n"
                    "images could not be read (they are reported and skipped).",
    )  # fmt: skip
    p.add_argument("inputs", nargs="+", help="image files and/or folders")
    _add_loading(p)
    p.add_argument(
        "--top-k",
        type=int,
        default=5,
        help="labels per image, most probable first (default: %(default)s)",
    )
    p.add_argument("--json", action="store_true",
                   help="JSON on stdout (default: a table)")  # fmt: skip
    shared.add_runtime_options(p, workers=False)  # predict decodes its files in the main process


def build_parser() -> argparse.ArgumentParser:
    parser, sub = shared.app_parser("python -m apps.classify", DESCRIPTION)
    _add_train(sub)
    _add_eval(sub)
    _add_predict(sub)
    add_explain_parser(sub)
    add_export_parser(sub)
    return parser


def check(args: argparse.Namespace) -> None:
    """The ranges of the shared options and of the classifier's own (OptionError)."""
    shared.check_options(args, {**shared.TRAINING_RULES, **shared.RUNTIME_RULES, **RULES})


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m apps.classify``: the exit status (see :mod:`apps.engine.command`)."""
    errors = (DataError, FashionMNISTError)
    return run_command(build_parser(), argv, check=check, package=__package__, errors=errors)
