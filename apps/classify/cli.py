"""Command line: ``python -m apps.classify {train,eval,predict} ...``.

Every option's help states its default once, as "(default: ...)"; a test holds the help to it.
"""

from __future__ import annotations

import argparse
import sys
import textwrap

from apps.classify.datasets import DataError
from apps.data.fashion_mnist import FashionMNISTError
from apps.engine.checkpoint import CheckpointError
from apps.engine.trainer import TrainingDiverged
from apps.options import out_problem

__all__ = ["EPILOGS", "build_parser", "main"]

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
EPILOGS = {"train": TRAIN_EPILOG, "eval": EVAL_EPILOG, "predict": PREDICT_EPILOG}


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


def _add_runtime(p: argparse.ArgumentParser, loader: bool = True) -> None:
    g = p.add_argument_group("runtime")
    g.add_argument(
        "--device",
        default="auto",
        help="cpu, cuda, cuda:N or auto (default: auto, a GPU when there is one)",
    )
    g.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch CPU threads per process (default: 0, torch's choice)",
    )
    if loader:  # predict decodes its files in the main process
        g.add_argument(
            "--workers",
            type=int,
            default=0,
            help="DataLoader worker processes (default: 0, load in the main process)",
        )
    g.add_argument(
        "--attention",
        choices=("native", "reference"),
        default="native",
        help="masked-attention ops: fused native kernels (falls back to the reference when not "
        "built) or the pure-PyTorch reference (default: %(default)s)",
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
        help="fashion-mnist, digits, or an image-folder directory (default: %(default)s)",
    )
    p.add_argument("--data-dir", default=None,
                   help="directory with the Fashion-MNIST IDX files "
                        "(default: /usr/share/datasets/fashion-mnist)")  # fmt: skip


def _add_loading(p: argparse.ArgumentParser) -> None:
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
    p.add_argument("--batch-size", type=_positive_int, default=256,
                   help="images per forward pass (default: %(default)s)")  # fmt: skip


def _add_run(t: argparse.ArgumentParser) -> None:
    t.add_argument("--out", default="runs/classify", help="run directory (default: %(default)s)")
    t.add_argument(
        "--resume",
        default=None,
        metavar="LAST_PT",
        help="continue a run from its last.pt, with its recipe and --out "
        "(default: start a new run)",
    )
    t.add_argument(
        "--stop-after-epochs",
        type=_positive_int,
        default=None,
        metavar="N",
        help="stop after N more epochs, the schedule still spanning all epochs; "
        "continue later with --resume (default: run to the end)",
    )
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
        type=_positive_int,
        default=None,
        metavar="N",
        help="train on a seeded random subset of N training images, for quick "
        "trials (default: all)",
    )
    t.add_argument(
        "--input-size",
        type=_positive_int,
        default=None,
        metavar="PX",
        help="square input size (default: 28 for fashion-mnist, 8 for digits; for "
        "a folder whose images are at most 64 px, their median size rounded "
        "up to a multiple of the model's stride, e.g. 25x25 -> 32; else 224)",
    )
    m = t.add_argument_group("model")
    m.add_argument(
        "--model",
        default="ppma_nano",
        help="ppma_nano, ppma_tiny, ppma_small or ppma_base (default: %(default)s)",
    )
    m.add_argument(
        "--model-arg",
        action="extend",
        nargs="+",
        metavar="KEY=VALUE",
        help="override PPMAConfig fields, e.g. head_hidden=256, or dims=32,64,128 "
        "depths=1,2,1 for three stages (per-stage fields not given keep the "
        "model's first entries); several per flag, repeatable (default: none)",
    )
    m.add_argument(
        "--pretrained",
        default=None,
        help="initialise from an authors' .pth or our safetensors, for fine-tuning "
        "(default: random initialisation)",
    )
    m.add_argument("--drop-path", type=float, default=None, metavar="RATE",
                   help="stochastic depth rate (default: the model's)")  # fmt: skip


def _add_optimisation(t: argparse.ArgumentParser) -> None:
    o = t.add_argument_group("optimisation")
    o.add_argument(
        "--epochs",
        type=_positive_int,
        default=None,
        help="passes over the training images (default: 10, or as many as give "
        ">= 150 steps on small data, at most 100)",
    )
    o.add_argument(
        "--batch-size",
        type=_positive_int,
        default=None,
        help="images per process and step (default: the largest power of two "
        "giving >= 4 steps per epoch, at most 128)",
    )
    o.add_argument(
        "--lr",
        type=float,
        default=2e-3,
        help="peak AdamW learning rate, reached after the warm-up (default: %(default)s)",
    )
    o.add_argument(
        "--min-lr-ratio",
        type=_non_negative_float,
        default=0.01,
        help="final lr of the cosine decay, as a fraction of --lr (default: %(default)s)",
    )
    o.add_argument(
        "--weight-decay",
        type=_non_negative_float,
        default=0.05,
        help="AdamW decoupled weight decay; biases, norms and other 1-D parameters "
        "take none (default: %(default)s)",
    )
    o.add_argument(
        "--warmup-epochs",
        type=_non_negative_float,
        default=None,
        metavar="EPOCHS",
        help="linear lr warm-up, in epochs (fractions allowed); a given value is "
        "capped at half the run (default: 1, at most 10%% of the run)",
    )
    o.add_argument(
        "--label-smoothing",
        type=_non_negative_float,
        default=0.1,
        help="label smoothing of the training cross-entropy; val loss is plain "
        "(default: %(default)s)",
    )
    o.add_argument(
        "--ema-decay",
        type=_non_negative_float,
        default=0.0,
        help="keep an EMA of the weights with this decay, e.g. 0.999; evaluated "
        "and exported instead of the raw weights (default: %(default)s, off)",
    )
    o.add_argument(
        "--grad-clip",
        type=_non_negative_float,
        default=5.0,
        help="max global grad norm, 0 = off (default: %(default)s)",
    )
    o.add_argument(
        "--amp",
        action="store_true",
        help="bf16 autocast (CPU or CUDA); on CPU it pays off only for large models (default: off)",
    )
    o.add_argument(
        "--augment",
        choices=("auto", "none"),
        default="auto",
        help="auto: pad+crop(+flip) for inputs up to 64 px, random-resized crop "
        "(+flip) for larger ones; none: no augmentation (default: %(default)s)",
    )
    flip = o.add_mutually_exclusive_group()
    flip.add_argument(
        "--hflip",
        dest="hflip",
        action="store_true",
        default=None,
        help="random horizontal flips (default: on, off for digits)",
    )
    flip.add_argument(
        "--no-hflip", dest="hflip", action="store_false", help="no random horizontal flips"
    )
    o.add_argument("--seed", type=int, default=0,
                   help="seed of the initial weights, the val split, the data order and the "
                        "augmentation (default: %(default)s)")  # fmt: skip


def _add_eval(sub: argparse._SubParsersAction) -> None:
    e = sub.add_parser(
        "eval", help="evaluate a checkpoint", epilog=EVAL_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Top-1/top-5 accuracy, per-class accuracy and a confusion matrix\n"
                    "(report.json + confusion.png in --out).",
    )  # fmt: skip
    _add_loading(e)
    _add_data(e, "fashion-mnist")
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
    e.add_argument("--json", action="store_true",
                   help="print the JSON report on stdout (default: a table)")  # fmt: skip
    _add_runtime(e)


def _add_predict(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "predict", help="label images", epilog=PREDICT_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Top-k labels for image files and folders. Exit status 1 if some\n"
                    "images could not be read (they are reported and skipped).",
    )  # fmt: skip
    p.add_argument("inputs", nargs="+", help="image files and/or folders")
    _add_loading(p)
    p.add_argument(
        "--top-k",
        type=_positive_int,
        default=5,
        help="labels per image, most probable first (default: %(default)s)",
    )
    p.add_argument("--json", action="store_true",
                   help="JSON on stdout (default: a table)")  # fmt: skip
    _add_runtime(p, loader=False)


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
    _add_run(t)
    _add_optimisation(t)
    _add_runtime(t)
    _add_eval(sub)
    _add_predict(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    problem = out_problem(getattr(args, "out", None))
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr)
        return 2
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
