"""Command line of the segment app: ``python -m apps.segment {train,eval,predict} ...``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import NoReturn

from apps.options import out_problem
from apps.segment.settings import (
    DEFAULT_CROP,
    DEFAULT_EPOCHS,
    DEFAULT_VAL_FRACTION,
    DEFAULT_WARMUP,
    MIN_AUTO_STEPS,
    WARMUP_FRACTION,
)

__all__ = ["build_parser", "main"]

DESCRIPTION = """\
Semantic segmentation with a PPMA backbone and a UPerNet head.

Data (--data) is either `scenes` -- built-in scenes of Fashion-MNIST garments pasted onto a
canvas, 11 classes (background + 10 garments), generated deterministically from the Debian
package dataset-fashion-mnist -- or a folder of images and index-PNG masks with the same file
stems (pixels equal to --ignore-index unlabelled), laid out as

  DIR/images/ + DIR/masks/ [+ DIR/classes.txt]     part of it is held out for validation
  DIR/train/{images,masks}/ + DIR/val/{images,masks}/ [+ DIR/classes.txt]

classes.txt names one class per line (line i = class id i). The validation images pick the
`best` checkpoint; `train` prints the settings it resolved (crop, batch, epochs, warmup) first.

examples:
  python -m apps.segment train --data scenes --out runs/seg --epochs 12
  torchrun --nproc-per-node 2 -m apps.segment train --data scenes --out runs/seg
  python -m apps.segment train --data scenes --out runs/seg --resume auto
  python -m apps.segment eval runs/seg
  python -m apps.segment eval runs/seg --data scenes --canvas 160 --mode slide
  python -m apps.segment train --data my_folder --out runs/mine
  python -m apps.segment train --data my_images --val-data my_val_images --crop 256 \\
      --backbone ppma_tiny --pretrained upernet_ppma_t.pth --out runs/mine
  python -m apps.segment eval runs/mine --data my_folder --mode slide
  python -m apps.segment predict runs/seg photos/ --out predictions
"""

SCENE_DEFAULTS = {
    "canvas": 64,
    "min_items": 2,
    "max_items": 4,
    "min_size": 20,
    "max_size": 40,
    "scene_seed": 0,
    "train_scenes": 8000,
    "val_scenes": 500,
}
FOLDER_DEFAULTS = {"ignore_index": 255}
FOLDER_ONLY = ("val_data", "val_fraction", "num_classes", "ignore_index")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Shows each option's default once: appended unless the help text already states it.

    Options whose default is None or off say in their help what leaving them out means.
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if "default" in text or not action.option_strings:
            return text
        if default is None or default is False or default is argparse.SUPPRESS:
            return text
        shown = " ".join(map(str, default)) if isinstance(default, list | tuple) else default
        return f"{text} (default: {shown})"


def _scene_options(p: argparse.ArgumentParser, *, for_eval: bool) -> None:
    g = p.add_argument_group(
        "built-in scenes (--data scenes)"
        + ("; defaults: the layout the checkpoint was trained on" if for_eval else "")
    )

    def default(name: str) -> str:
        return "" if for_eval else f" (default: {SCENE_DEFAULTS[name]})"

    # None on the command line: a scene option given with folder data is refused, not ignored.
    g.add_argument("--canvas", type=int, help="scene side in pixels" + default("canvas"))
    g.add_argument("--min-items", type=int, help="fewest garments per scene" + default("min_items"))
    g.add_argument("--max-items", type=int, help="most garments per scene" + default("max_items"))
    g.add_argument("--min-size", type=int, help="smallest garment side" + default("min_size"))
    g.add_argument("--max-size", type=int, help="largest garment side" + default("max_size"))
    g.add_argument(
        "--scene-seed", type=int, help="seed of the scene generator" + default("scene_seed")
    )
    if not for_eval:
        g.add_argument("--train-scenes", type=int, help="training scenes" + default("train_scenes"))
    g.add_argument(
        "--val-scenes",
        type=int,
        help="validation scenes, built from garments the training scenes never use"
        + default("val_scenes"),
    )
    g.add_argument(
        "--fmnist-dir",
        default=None,
        help="directory with the Fashion-MNIST IDX files (default: the Debian package's)",
    )


def _folder_options(p: argparse.ArgumentParser, *, for_eval: bool) -> None:
    g = p.add_argument_group("folder data (--data DIR)")
    if not for_eval:
        g.add_argument(
            "--val-data",
            default=None,
            help="validation folder (images/ + masks/); default: DIR/val when DIR has train/ "
            "and val/, else --val-fraction of DIR",
        )
        g.add_argument(
            "--val-fraction",
            type=float,
            default=None,
            help="without a validation folder, hold out this fraction of DIR (default: "
            f"{DEFAULT_VAL_FRACTION}; 0: none, then `best` is the lowest train loss)",
        )
        g.add_argument(
            "--num-classes",
            type=int,
            default=None,
            help="number of classes when there is no classes.txt (default: largest id + 1)",
        )
        g.add_argument(
            "--ignore-index",
            type=int,
            default=None,
            help=f"unlabelled mask value (default: {FOLDER_DEFAULTS['ignore_index']})",
        )
    g.add_argument(
        "--skip-bad",
        action="store_true",
        help="skip (and list) mismatched or corrupt pairs instead of stopping",
    )


def _inference_options(p: argparse.ArgumentParser, *, prefix: str = "") -> None:
    g = p.add_argument_group("inference")
    g.add_argument(
        f"--{prefix}flip",
        action="store_true",
        help="also run the mirrored image and average the softmax probabilities (flip "
        "test-time augmentation)",
    )
    g.add_argument(
        f"--{prefix}scales",
        type=float,
        nargs="+",
        default=[1.0],
        metavar="S",
        help="run the image resized by each factor and average the probabilities "
        "(multi-scale test-time augmentation, e.g. 0.75 1 1.25)",
    )
    g.add_argument(
        f"--{prefix}mode",
        choices=("whole", "slide"),
        default="whole",
        help="whole image in one pass, or sliding windows with averaged overlaps",
    )
    g.add_argument("--window", type=int, default=None, help="window side (default: the crop)")
    g.add_argument("--stride", type=int, default=None, help="window stride (default: 2/3 window)")


def _runtime_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("runtime")
    g.add_argument(
        "--device", default="auto", help="cpu, cuda, cuda:1, or auto: cuda when available"
    )
    g.add_argument(
        "--attention",
        choices=("native", "reference"),
        default="native",
        help="masked-attention ops: fused native kernels or the PyTorch reference",
    )
    g.add_argument("--workers", type=int, default=0, help="data-loader worker processes")
    g.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads per process (default: torch's choice; 1 is fastest when other "
        "jobs share the cores)",
    )
    g.add_argument("--no-progress", action="store_true", help="no progress bars")


def _model_options(t: argparse.ArgumentParser) -> None:
    m = t.add_argument_group("model")
    m.add_argument("--backbone", default="ppma_nano", help="ppma_nano, ppma_tiny, ppma_small, ...")
    m.add_argument(
        "--model-arg",
        action="append",
        metavar="KEY=VALUE",
        help="override a backbone PPMAConfig field, e.g. depths=1,2,2 (repeatable); the "
        "number of dims sets the number of stages the UPerNet head fuses (default: none)",
    )
    m.add_argument(
        "--pretrained",
        default=None,
        help="backbone checkpoint, the authors' .pth or ours (default: random initialisation)",
    )
    m.add_argument("--channels", type=int, default=64, help="UPerNet channels (512 upstream)")
    m.add_argument(
        "--aux-channels", type=int, default=32, help="auxiliary FCN head channels (0: no aux head)"
    )
    m.add_argument("--aux-weight", type=float, default=0.4, help="auxiliary loss weight")
    m.add_argument("--drop-path", type=float, default=0.0, help="stochastic depth rate")
    m.add_argument(
        "--fuse-kernel",
        type=int,
        choices=(1, 3),
        default=3,
        help="kernel of the conv fusing UPerNet's levels (3 as published; 1 is cheaper)",
    )
    m.add_argument(
        "--head-dropout",
        type=float,
        default=0.1,
        help="channel dropout before the heads' classifiers (MMSegmentation's 0.1)",
    )


def _optimisation_options(t: argparse.ArgumentParser) -> None:
    o = t.add_argument_group("optimisation")
    o.add_argument(
        "--epochs",
        type=int,
        default=None,
        help=f"default: {DEFAULT_EPOCHS}, more on small data so the run takes at least "
        f"{MIN_AUTO_STEPS} optimizer steps",
    )
    o.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="per process; default: a quarter of the training images per process, 2..16",
    )
    o.add_argument("--lr", type=float, default=2e-3, help="AdamW peak learning rate")
    o.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay")
    o.add_argument(
        "--backbone-lr-scale",
        type=float,
        default=1.0,
        help="backbone lr / head lr (e.g. 0.1 to fine-tune a --pretrained backbone gently)",
    )
    o.add_argument(
        "--schedule", choices=("poly", "cosine"), default="poly", help="decay after the warmup"
    )
    o.add_argument("--poly-power", type=float, default=1.0, help="exponent of the poly decay")
    o.add_argument("--min-lr-ratio", type=float, default=0.0, help="final lr / peak lr")
    o.add_argument(
        "--warmup-steps",
        type=int,
        default=None,
        help=f"linear warmup; default: {DEFAULT_WARMUP}, at most {WARMUP_FRACTION * 100:.0f}%% "
        "of the run's steps (an explicit value must be shorter than the run)",
    )
    o.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm (0: off)")
    o.add_argument(
        "--ema-decay", type=float, default=None, help="keep EMA weights, e.g. 0.999 (default: off)"
    )
    o.add_argument("--amp", action="store_true", help="bf16 autocast (CPU and CUDA)")
    o.add_argument(
        "--seed", type=int, default=0, help="initial weights, augmentation, held-out split"
    )


def _train_parser(sub) -> None:
    t = sub.add_parser("train", help="train a model", formatter_class=HelpFormatter)
    t.add_argument(
        "--data",
        required=True,
        help="`scenes`, or a folder with images/ and masks/ (or with train/ and val/ holding them)",
    )
    t.add_argument("--out", required=True, help="run directory (checkpoints, metrics, curves)")
    _model_options(t)
    _optimisation_options(t)
    a = t.add_argument_group("augmentation")
    a.add_argument(
        "--crop",
        type=int,
        default=None,
        help="training crop side (default: the canvas for scenes; for folders the median "
        f"shorter side of the training images, at most {DEFAULT_CROP})",
    )
    a.add_argument(
        "--scale-range",
        type=float,
        nargs=2,
        default=(0.75, 1.5),
        metavar=("LOW", "HIGH"),
        help="random rescale factors before cropping",
    )
    a.add_argument("--no-flip", action="store_true", help="no random horizontal flips")
    ev = t.add_argument_group("validation during training (picks the `best` checkpoint)")
    ev.add_argument("--eval-every", type=int, default=1, help="epochs between validations")
    _inference_options(t, prefix="eval-")
    t.add_argument(
        "--stop-after-epochs",
        type=int,
        default=None,
        metavar="N",
        help="train N more epochs of the schedule, then stop (continue later with --resume; "
        "default: run to the end)",
    )
    t.add_argument(
        "--resume",
        default=None,
        metavar="PATH|auto",
        help="continue from a last.pt (auto: OUT/last.pt; default: start afresh)",
    )
    _scene_options(t, for_eval=False)
    _folder_options(t, for_eval=False)
    _runtime_options(t)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m apps.segment",
        description=DESCRIPTION,
        formatter_class=HelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{train,eval,predict}")
    fmt = HelpFormatter
    _train_parser(sub)

    e = sub.add_parser("eval", help="mIoU, per-class IoU, pixel accuracy", formatter_class=fmt)
    e.add_argument("checkpoint", help="run directory (its best.safetensors), .safetensors or .pt")
    e.add_argument(
        "--data",
        default=None,
        help="`scenes` or a folder; a folder with val/ is scored on val/ (default: the "
        "validation data recorded with the run)",
    )
    e.add_argument(
        "--out", default=None, help="write eval.json and confusion.png here (default: print only)"
    )
    e.add_argument(
        "--batch-size", type=int, default=32, help="images per forward pass (same-size images)"
    )
    _inference_options(e)
    _scene_options(e, for_eval=True)
    _folder_options(e, for_eval=True)
    _runtime_options(e)

    p = sub.add_parser("predict", help="colour-coded masks and overlays", formatter_class=fmt)
    p.add_argument("checkpoint", help="run directory (its best.safetensors), .safetensors or .pt")
    p.add_argument("inputs", nargs="+", help="image files or folders of images")
    p.add_argument("--out", default="predictions", help="output directory")
    p.add_argument("--alpha", type=float, default=0.5, help="overlay opacity of the mask")
    _inference_options(p)
    _runtime_options(p)
    return parser


def _refuse(parser: argparse.ArgumentParser, message: str) -> NoReturn:
    """Stop with one line naming the option (parser.error would print the usage first)."""
    parser.exit(2, f"error: {message}\n")


def given_options(args: argparse.Namespace, names: Sequence[str]) -> list[str]:
    """The options among ``names`` that the command line set (``--name`` spelling)."""
    given = []
    for name in names:
        value = getattr(args, name, None)
        if value is not None and value is not False:
            given.append(f"--{name.replace('_', '-')}")
    return given


def _check_data_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse options of the other kind of data; fill in the defaults of this kind."""
    scene_options = [*SCENE_DEFAULTS, "fmnist_dir"]
    if args.data == "scenes":
        wrong = given_options(args, [*FOLDER_ONLY, "skip_bad"])
        if wrong:
            _refuse(parser, f"{wrong[0]} applies to folder data, not --data scenes")
        if args.command == "train":
            for name, value in SCENE_DEFAULTS.items():
                if getattr(args, name) is None:
                    setattr(args, name, value)
    elif args.data is not None:
        wrong = given_options(args, scene_options)
        if wrong:
            _refuse(parser, f"{wrong[0]} applies to --data scenes, not a folder ({args.data})")
        for name, value in FOLDER_DEFAULTS.items():
            if getattr(args, name, None) is None:
                setattr(args, name, value)


def _check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    problem = out_problem(getattr(args, "out", None))
    if problem is not None:
        _refuse(parser, problem)
    positive = ["batch_size", "window", "stride", "canvas", "val_scenes", "train_scenes"]
    positive += ["epochs", "crop", "channels", "eval_every"]
    for name in positive:
        value = getattr(args, name, None)
        if value is not None and value < 1:
            _refuse(parser, f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.command == "train" and args.batch_size is not None and args.batch_size < 2:
        _refuse(
            parser,
            f"--batch-size must be >= 2 per process, got {args.batch_size} (BatchNorm after the "
            "pyramid pooling's 1x1 branch needs more than one value per channel)",
        )
    if (getattr(args, "warmup_steps", None) or 0) < 0:
        _refuse(parser, f"--warmup-steps must be >= 0, got {args.warmup_steps}")
    if not 0.0 <= (getattr(args, "val_fraction", None) or 0.0) < 1.0:
        _refuse(parser, f"--val-fraction must be in [0, 1), got {args.val_fraction}")
    if getattr(args, "lr", 1.0) <= 0:
        _refuse(parser, f"--lr must be > 0, got {args.lr}")
    if getattr(args, "backbone_lr_scale", 1.0) <= 0:
        _refuse(parser, f"--backbone-lr-scale must be > 0, got {args.backbone_lr_scale}")
    if not 0.0 <= getattr(args, "head_dropout", 0.0) < 1.0:
        _refuse(parser, f"--head-dropout must be in [0, 1), got {args.head_dropout}")
    if getattr(args, "aux_channels", 0) < 0:
        _refuse(parser, f"--aux-channels must be >= 0, got {args.aux_channels}")
    if getattr(args, "grad_clip", None) == 0:
        args.grad_clip = None
    if args.command == "predict":
        return
    if args.data is not None and args.data != "scenes" and args.data.startswith("-"):
        _refuse(parser, f"--data expects `scenes` or a folder, got {args.data}")
    _check_data_options(parser, args)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _check(parser, args)
    if args.threads is not None:
        if args.threads < 1:
            _refuse(parser, f"--threads must be >= 1, got {args.threads}")
        import torch

        torch.set_num_threads(args.threads)
    # Imported here so `--help` answers without loading torch.
    from apps.engine import CheckpointError
    from apps.segment.folder import FolderDatasetError

    try:
        if args.command == "train":
            from apps.segment.train import run_train

            run_train(args)
        elif args.command == "eval":
            from apps.segment.evaluate import run_eval

            run_eval(args)
        else:
            from apps.segment.predict import run_predict

            run_predict(args)
    except SystemExit as exc:  # the commands stop with SystemExit("error: ...") on bad input
        if isinstance(exc.code, str):
            print(exc.code, file=sys.stderr)
            return 2
        raise
    except (FolderDatasetError, CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:  # bad option values caught by the library's checks
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    return 0
