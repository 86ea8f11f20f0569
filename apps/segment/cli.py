"""Command line of the segment app: ``python -m apps.segment {train,eval,predict} ...``."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from apps.engine import options as shared
from apps.engine.command import run_command
from apps.engine.options import OptionError
from apps.segment.explain import add_explain_parser
from apps.segment.export import add_export_parser
from apps.segment.settings import (
    DEFAULT_CROP,
    DEFAULT_EPOCHS,
    DEFAULT_VAL_FRACTION,
    DEFAULT_WARMUP,
    MIN_AUTO_STEPS,
    WARMUP_FRACTION,
)

__all__ = ["DEFAULTS", "SCENE_DEFAULTS", "build_parser", "check", "given_options", "main"]

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

DEFAULTS = shared.TrainingDefaults(
    epochs_help=f"passes over the training images (default: {DEFAULT_EPOCHS}, more on small "
    f"data so the run takes at least {MIN_AUTO_STEPS} optimizer steps)",
    batch_help="images per process and step (default: a quarter of the training images per "
    "process, 2..16)",
    warmup_help=f"default: {DEFAULT_WARMUP}, at most {WARMUP_FRACTION * 100:.0f}%% of the run",
    out=None,
    weight_decay=0.01,
    min_lr_ratio=0.0,
    schedule="poly",
    grad_clip=1.0,
)

#: The segment options' ranges, beside the shared ones.
RULES = {
    **dict.fromkeys(
        (
            "window",
            "stride",
            "canvas",
            "val_scenes",
            "train_scenes",
            "crop",
            "channels",
            "eval_every",
            "min_items",
            "max_items",
            "min_size",
            "max_size",
        ),
        shared.AT_LEAST_ONE,
    ),  # fmt: skip
    "aux_channels": shared.NOT_NEGATIVE,
    "aux_weight": shared.NOT_NEGATIVE,
    "backbone_lr_scale": shared.POSITIVE,
    "head_dropout": shared.RATE,
    "drop_path": shared.RATE,
    "val_fraction": shared.RATE,
    "scales": shared.POSITIVE,
    "eval_scales": shared.POSITIVE,
    "scale_range": shared.POSITIVE,
    "alpha": shared.Rule(lambda v: 0 <= v <= 1, "must be in [0, 1]"),
}


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


def _model_options(t: argparse.ArgumentParser) -> None:
    m = t.add_argument_group("model")
    m.add_argument("--backbone", default="ppma_nano", help="ppma_nano, ppma_tiny, ppma_small, ...")
    shared.add_model_arg_option(m)
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


def _augmentation_options(t: argparse.ArgumentParser) -> None:
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


def _train_parser(sub: argparse._SubParsersAction) -> None:
    t = sub.add_parser("train", help="train a model", formatter_class=shared.HelpFormatter)
    t.add_argument(
        "--data",
        default=None,
        help="`scenes`, or a folder with images/ and masks/ (or with train/ and val/ holding "
        "them); required unless --resume names a run",
    )
    shared.add_run_options(t, DEFAULTS)
    _model_options(t)
    o = shared.add_optimisation_options(t, DEFAULTS)
    o.add_argument(
        "--backbone-lr-scale",
        type=float,
        default=1.0,
        help="backbone lr / head lr (e.g. 0.1 to fine-tune a --pretrained backbone gently)",
    )
    _augmentation_options(t)
    ev = t.add_argument_group("validation during training (picks the `best` checkpoint)")
    ev.add_argument("--eval-every", type=int, default=1, help="epochs between validations")
    _inference_options(t, prefix="eval-")
    _scene_options(t, for_eval=False)
    _folder_options(t, for_eval=False)
    shared.add_runtime_options(t)


def build_parser() -> argparse.ArgumentParser:
    parser, sub = shared.app_parser("python -m apps.segment", DESCRIPTION)
    fmt = shared.HelpFormatter
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
    shared.add_runtime_options(e)

    p = sub.add_parser("predict", help="colour-coded masks and overlays", formatter_class=fmt)
    p.add_argument("checkpoint", help="run directory (its best.safetensors), .safetensors or .pt")
    p.add_argument("inputs", nargs="+", help="image files or folders of images")
    p.add_argument("--out", default="predictions", help="output directory")
    p.add_argument("--alpha", type=float, default=0.5, help="overlay opacity of the mask")
    _inference_options(p)
    shared.add_runtime_options(p, workers=False)
    add_explain_parser(sub)
    add_export_parser(sub)
    return parser


def given_options(args: argparse.Namespace, names: Sequence[str]) -> list[str]:
    """The options among ``names`` that the command line set (``--name`` spelling)."""
    given = []
    for name in names:
        value = getattr(args, name, None)
        if value is not None and value is not False:
            given.append(f"--{name.replace('_', '-')}")
    return given


def _check_data_options(args: argparse.Namespace) -> None:
    """Refuse options of the other kind of data; fill in the defaults of this kind."""
    scene_options = [*SCENE_DEFAULTS, "fmnist_dir"]
    if args.data == "scenes":
        wrong = given_options(args, [*FOLDER_ONLY, "skip_bad"])
        if wrong:
            raise OptionError(f"{wrong[0]} applies to folder data, not --data scenes")
        if args.command == "train":
            for name, value in SCENE_DEFAULTS.items():
                if getattr(args, name) is None:
                    setattr(args, name, value)
    elif args.data is not None:
        wrong = given_options(args, scene_options)
        if wrong:
            raise OptionError(f"{wrong[0]} applies to --data scenes, not a folder ({args.data})")
        for name, value in FOLDER_DEFAULTS.items():
            if getattr(args, name, None) is None:
                setattr(args, name, value)


def check(args: argparse.Namespace) -> None:
    """The ranges of the shared and the segment options, and the data options' kind."""
    shared.check_options(args, {**shared.TRAINING_RULES, **shared.RUNTIME_RULES, **RULES})
    if args.command == "train" and args.batch_size is not None and args.batch_size < 2:
        raise OptionError(
            f"--batch-size must be >= 2 per process, got {args.batch_size} (BatchNorm after the "
            "pyramid pooling's 1x1 branch needs more than one value per channel)"
        )
    if args.command in ("predict", "explain", "export"):
        return
    if args.data is not None and args.data != "scenes" and args.data.startswith("-"):
        raise OptionError(f"--data expects `scenes` or a folder, got {args.data}")
    if args.command == "train" and args.data is None and args.resume is None:
        raise OptionError("train needs --data: `scenes` or a folder (or --resume a run)")
    _check_data_options(args)


def _check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """:func:`check`, stopping with one ``error:`` line and exit status 2 on a bad option."""
    try:
        check(args)
    except OptionError as exc:
        parser.exit(2, f"error: {exc}\n")


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m apps.segment``: the exit status (see :mod:`apps.engine.command`)."""
    from apps.segment.folder import FolderDatasetError  # after parsing: it loads PIL and numpy

    parser = build_parser()
    return run_command(parser, argv, check=check, package=__package__, errors=(FolderDatasetError,))
