"""Command line of the detect app: ``python -m apps.detect {train,eval,predict,scenes} ...``.

The training, runtime and ``--model-arg`` options are the shared ones of
:mod:`apps.engine.options` (one text for every app); this module adds the detector's.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from apps.detect.settings import (
    DEFAULT_EPOCHS,
    DEFAULT_VAL_FRACTION,
    DEFAULT_WARMUP,
    MAX_AUTO_BATCH,
    MIN_AUTO_STEPS,
    WARMUP_FRACTION,
)
from apps.engine import options as shared
from apps.engine.command import run_command
from apps.engine.options import OptionError

__all__ = ["COMMANDS", "DEFAULTS", "SCENE_DEFAULTS", "build_parser", "check", "main"]

COMMANDS = ("train", "eval", "predict", "scenes")

DESCRIPTION = """\
Instance segmentation (Mask R-CNN + FPN) with a PPMA backbone.

Data (--data) is either `scenes` -- built-in scenes of Fashion-MNIST garments pasted onto a
canvas, each garment one instance of 10 classes, generated deterministically from the Debian
package dataset-fashion-mnist -- or a folder in COCO format:

  DIR/images/ + DIR/instances_*.json        one file: part of it is held out for validation
  DIR/images/ + instances_train*.json and instances_val*.json (also under DIR/annotations/)
  DIR/train2017/ + DIR/annotations/instances_train2017.json (COCO's own layout)

Masks may be polygons or RLE; category ids are remapped to contiguous labels and back. The
validation images pick the `best` checkpoint by box AP; `train` prints its settings first.

examples:
  python -m apps.detect train --data scenes --out runs/det --epochs 4
  torchrun --nproc-per-node 2 -m apps.detect train --data scenes --out runs/det
  python -m apps.detect train --out runs/det --resume auto
  python -m apps.detect eval runs/det --out runs/det/eval
  python -m apps.detect scenes --out data/scenes --train-scenes 2000 --val-scenes 200
  python -m apps.detect train --data data/scenes --out runs/det-coco
  python -m apps.detect train --data coco --backbone ppma_tiny --pretrained ppma_t_in1k.pth \\
      --out runs/coco --detector-arg min_size=800 --lr 1e-4 --weight-decay 0.05
  python -m apps.detect predict runs/det photos/ --out predictions
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
FOLDER_ONLY = ("val_fraction", "skip_bad")

DEFAULTS = shared.TrainingDefaults(
    epochs_help=f"passes over the training images (default: {DEFAULT_EPOCHS}, mmdetection's 1x; "
    f"more on small data so the run takes at least {MIN_AUTO_STEPS} optimizer steps)",
    batch_help="images per process and step (default: a quarter of the training images per "
    f"process, 1..{MAX_AUTO_BATCH})",
    warmup_help=f"default: {DEFAULT_WARMUP}, at most {WARMUP_FRACTION * 100:.0f}%% of the run",
    out=None,
    lr=1e-4,
    weight_decay=0.05,
    schedule="cosine",
    grad_clip=0.0,  # mmdetection's mask_rcnn 1x clips no gradients
)

#: The detect options' ranges, beside the shared ones.
RULES = {
    **dict.fromkeys(
        (
            "eval_every",
            "canvas",
            "train_scenes",
            "val_scenes",
            "min_items",
            "max_items",
            "min_size",
            "max_size",
        ),
        shared.AT_LEAST_ONE,
    ),  # fmt: skip
    "drop_path": shared.RATE,
    "val_fraction": shared.RATE,
    "backbone_lr_scale": shared.POSITIVE,
    "scale_range": shared.POSITIVE,
    "score_thresh": shared.FRACTION,
    "mask_thresh": shared.FRACTION,
}


def _scene_options(p: argparse.ArgumentParser, *, recorded: bool, train: bool) -> None:
    title = "built-in scenes (--data scenes)"
    g = p.add_argument_group(
        title + ("; defaults: the layout the run was trained on" if recorded else "")
    )

    def default(name: str) -> str:
        return "" if recorded else f" (default: {SCENE_DEFAULTS[name]})"

    # None on the command line: a scene option given with folder data is refused, not ignored.
    g.add_argument("--canvas", type=int, help="scene side in pixels" + default("canvas"))
    g.add_argument("--min-items", type=int, help="fewest garments per scene" + default("min_items"))
    g.add_argument("--max-items", type=int, help="most garments per scene" + default("max_items"))
    g.add_argument("--min-size", type=int, help="smallest garment side" + default("min_size"))
    g.add_argument("--max-size", type=int, help="largest garment side" + default("max_size"))
    g.add_argument(
        "--scene-seed", type=int, help="seed of the scene generator" + default("scene_seed")
    )
    if train:
        g.add_argument("--train-scenes", type=int, help="training scenes" + default("train_scenes"))
    g.add_argument(
        "--val-scenes",
        type=int,
        help="held-out scenes, from garments the training scenes never use" + default("val_scenes"),
    )
    g.add_argument(
        "--fmnist-dir",
        default=None,
        help="directory with the Fashion-MNIST IDX files (default: the Debian package's)",
    )


def _model_options(t: argparse.ArgumentParser) -> None:
    m = t.add_argument_group("model")
    m.add_argument("--backbone", default="ppma_nano", help="ppma_nano, ppma_tiny, ppma_small, ...")
    shared.add_model_arg_option(m)
    m.add_argument(
        "--detector-arg",
        action="extend",
        nargs="+",
        metavar="KEY=VALUE",
        help="override DetectionSettings fields, e.g. fpn_channels=128 or min_size=800; "
        "several per flag, repeatable (default: mmdetection's mask_rcnn 1x, sized down for "
        "--data scenes)",
    )
    m.add_argument(
        "--pretrained",
        default=None,
        help="a detector checkpoint (the authors' mmdetection .pth or ours) or a backbone "
        "checkpoint, e.g. an ImageNet classifier (default: random initialisation)",
    )
    m.add_argument("--drop-path", type=float, default=0.0, help="stochastic depth rate")


def _train_parser(sub: argparse._SubParsersAction) -> None:
    t = sub.add_parser("train", help="train a detector", formatter_class=shared.HelpFormatter)
    t.add_argument(
        "--data",
        default=None,
        help="`scenes`, or a COCO-format folder; required unless --resume names a run",
    )
    shared.add_run_options(t, DEFAULTS)
    _model_options(t)
    o = shared.add_optimisation_options(t, DEFAULTS)
    o.add_argument(
        "--backbone-lr-scale",
        type=float,
        default=1.0,
        help="backbone lr / detector heads' lr (e.g. 0.1 to fine-tune a --pretrained backbone)",
    )
    a = t.add_argument_group("augmentation (torchvision transforms v2)")
    a.add_argument(
        "--scale-range",
        type=float,
        nargs=2,
        default=(1.0, 1.0),
        metavar=("LOW", "HIGH"),
        help="scale jitter: random factor on the detector's image size",
    )
    a.add_argument("--no-flip", action="store_true", help="no random horizontal flips")
    ev = t.add_argument_group("validation during training (picks the `best` checkpoint)")
    ev.add_argument("--eval-every", type=int, default=1, help="epochs between validations")
    f = t.add_argument_group("COCO folder data (--data DIR)")
    f.add_argument(
        "--val-fraction",
        type=float,
        default=None,
        help="with a single annotation file, hold out this fraction (default: "
        f"{DEFAULT_VAL_FRACTION}; 0: none, then `best` is the lowest train loss)",
    )
    f.add_argument("--skip-bad", action="store_true", help="leave out (and list) bad annotations")
    _scene_options(t, recorded=False, train=True)
    shared.add_runtime_options(t)


def _eval_parser(sub: argparse._SubParsersAction) -> None:
    e = sub.add_parser("eval", help="COCO box and mask AP", formatter_class=shared.HelpFormatter)
    e.add_argument("checkpoint", help="run directory (its best.safetensors), .safetensors or .pt")
    e.add_argument(
        "--data",
        default=None,
        help="`scenes` or a COCO folder, scored on its validation split (default: the run's)",
    )
    e.add_argument(
        "--out",
        default=None,
        help="write eval.json, results.json and pr.png here (default: print only)",
    )
    e.add_argument("--batch-size", type=int, default=8, help="images per forward pass")
    e.add_argument("--skip-bad", action="store_true", help="leave out (and list) bad annotations")
    _scene_options(e, recorded=True, train=False)
    shared.add_runtime_options(e)


def _predict_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "predict", help="draw detections, write COCO results", formatter_class=shared.HelpFormatter
    )
    p.add_argument("checkpoint", help="run directory (its best.safetensors), .safetensors or .pt")
    p.add_argument("inputs", nargs="+", help="image files or folders of images")
    p.add_argument("--out", default="predictions", help="output directory")
    p.add_argument("--score-thresh", type=float, default=0.5, help="keep detections scoring this")
    p.add_argument("--mask-thresh", type=float, default=0.5, help="mask probability threshold")
    shared.add_runtime_options(p, workers=False)


def _scenes_parser(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser(
        "scenes",
        help="write the built-in scenes as a COCO dataset",
        formatter_class=shared.HelpFormatter,
    )
    s.add_argument("--out", required=True, help="folder for images/ and instances_{train,val}.json")
    _scene_options(s, recorded=False, train=True)


def build_parser() -> argparse.ArgumentParser:
    parser, sub = shared.app_parser("python -m apps.detect", DESCRIPTION, COMMANDS)
    _train_parser(sub)
    _eval_parser(sub)
    _predict_parser(sub)
    _scenes_parser(sub)
    return parser


def _given(args: argparse.Namespace, names: Sequence[str]) -> list[str]:
    """The options among ``names`` that the command line set (``--name`` spelling)."""
    return [
        f"--{n.replace('_', '-')}" for n in names if getattr(args, n, None) not in (None, False)
    ]


def _check_data_options(args: argparse.Namespace) -> None:
    """Refuse options of the other kind of data; fill in the scene defaults where scenes are
    made (train, scenes; eval takes the run's)."""
    data = getattr(args, "data", None)
    if args.command == "scenes" or data == "scenes":
        wrong = _given(args, FOLDER_ONLY)
        if wrong:
            raise OptionError(f"{wrong[0]} applies to COCO folder data, not scenes")
        if args.command in ("train", "scenes"):
            for name, value in SCENE_DEFAULTS.items():
                if getattr(args, name, None) is None:
                    setattr(args, name, value)
    elif data is not None:
        wrong = _given(args, [*SCENE_DEFAULTS, "fmnist_dir"])
        if wrong:
            raise OptionError(f"{wrong[0]} applies to --data scenes, not a folder ({data})")


def check(args: argparse.Namespace) -> None:
    """The ranges of the shared and the detect options, and the data options' kind."""
    shared.check_options(args, {**shared.TRAINING_RULES, **shared.RUNTIME_RULES, **RULES})
    if args.command == "train":
        low, high = args.scale_range
        if low > high:
            raise OptionError(f"--scale-range needs LOW <= HIGH, got {low} {high}")
        if args.data is None and args.resume is None:
            raise OptionError("train needs --data: `scenes` or a COCO folder (or --resume a run)")
    if args.command == "predict":
        return
    data = getattr(args, "data", None)
    if data is not None and data != "scenes" and data.startswith("-"):
        raise OptionError(f"--data expects `scenes` or a folder, got {data}")
    _check_data_options(args)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m apps.detect``: the exit status (see :mod:`apps.engine.command`)."""
    from apps.detect.coco import CocoDatasetError  # here, not on top: it loads pycocotools

    parser = build_parser()
    return run_command(parser, argv, check=check, package=__package__, errors=(CocoDatasetError,))
