"""Command line of the detect app: ``python -m apps.detect {train,eval,predict,scenes} ...``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import NoReturn

from apps.options import out_problem

__all__ = ["build_parser", "main"]

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
  python -m apps.detect train --data scenes --out runs/det --resume auto
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


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Shows an option's default unless its help already states it or it is None/off."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if "default" in text or not action.option_strings:
            return text
        if default is None or default is False or default is argparse.SUPPRESS:
            return text
        shown = " ".join(map(str, default)) if isinstance(default, list | tuple) else default
        return f"{text} (default: {shown})"


def _scene_options(p: argparse.ArgumentParser, *, recorded: bool, train: bool) -> None:
    title = "built-in scenes (--data scenes)"
    g = p.add_argument_group(title + ("; defaults: the run's" if recorded else ""))

    def default(name: str) -> str:
        return "" if recorded else f" (default: {SCENE_DEFAULTS[name]})"

    g.add_argument("--canvas", type=int, help="scene side in pixels" + default("canvas"))
    g.add_argument("--min-items", type=int, help="fewest garments per scene" + default("min_items"))
    g.add_argument("--max-items", type=int, help="most garments per scene" + default("max_items"))
    g.add_argument("--min-size", type=int, help="smallest garment side" + default("min_size"))
    g.add_argument("--max-size", type=int, help="largest garment side" + default("max_size"))
    g.add_argument("--scene-seed", type=int, help="seed of the generator" + default("scene_seed"))
    if train:
        g.add_argument("--train-scenes", type=int, help="training scenes" + default("train_scenes"))
    g.add_argument(
        "--val-scenes",
        type=int,
        help="held-out scenes, from garments the training scenes never use" + default("val_scenes"),
    )
    g.add_argument(
        "--fmnist-dir", help="directory with the Fashion-MNIST IDX files (default: Debian's)"
    )


def _runtime_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("runtime")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, or auto")
    g.add_argument(
        "--attention",
        choices=("native", "reference"),
        default=None,
        help="PPMA ops: fused native kernels or the PyTorch reference (default: ppma_ops' "
        "choice, native unless PPMA_OPS_BACKEND says otherwise)",
    )
    g.add_argument("--workers", type=int, default=0, help="data-loader worker processes")
    g.add_argument(
        "--threads", type=int, help="torch CPU threads per process (default: torch's choice)"
    )
    g.add_argument("--no-progress", action="store_true", help="no progress bars")


def _model_options(t: argparse.ArgumentParser) -> None:
    m = t.add_argument_group("model")
    m.add_argument("--backbone", default="ppma_nano", help="ppma_nano, ppma_tiny, ppma_small, ...")
    m.add_argument(
        "--model-arg",
        action="append",
        metavar="KEY=VALUE",
        help="override a backbone PPMAConfig field, e.g. depths=1,2,2 (repeatable)",
    )
    m.add_argument(
        "--detector-arg",
        action="append",
        metavar="KEY=VALUE",
        help="override a DetectionSettings field, e.g. fpn_channels=128 or min_size=800 "
        "(repeatable; default: mmdetection's mask_rcnn 1x, sized down for --data scenes)",
    )
    m.add_argument(
        "--pretrained",
        help="a detector checkpoint (the authors' mmdetection .pth or ours) or a backbone "
        "checkpoint, e.g. an ImageNet classifier (default: random initialisation)",
    )
    m.add_argument("--drop-path", type=float, default=0.0, help="stochastic depth rate")


def _optimisation_options(t: argparse.ArgumentParser) -> None:
    o = t.add_argument_group("optimisation")
    o.add_argument("--epochs", type=int, help="default: 12 (mmdetection's 1x)")
    o.add_argument(
        "--batch-size", type=int, help="per process; default: a quarter of the images, at most 8"
    )
    o.add_argument("--lr", type=float, default=1e-4, help="AdamW peak learning rate")
    o.add_argument("--weight-decay", type=float, default=0.05, help="AdamW weight decay")
    o.add_argument(
        "--backbone-lr-scale", type=float, default=1.0, help="backbone lr / detector heads' lr"
    )
    o.add_argument(
        "--schedule", choices=("cosine", "poly", "constant"), default="cosine", help="after warmup"
    )
    o.add_argument("--min-lr-ratio", type=float, default=0.0, help="final lr / peak lr")
    o.add_argument(
        "--warmup-steps", type=int, help="linear warmup; default: 500, at most 10%% of the steps"
    )
    o.add_argument("--grad-clip", type=float, default=None, help="max gradient norm (default: off)")
    o.add_argument("--ema-decay", type=float, help="keep EMA weights, e.g. 0.999 (default: off)")
    o.add_argument("--amp", action="store_true", help="bf16 autocast (CPU and CUDA)")
    o.add_argument("--seed", type=int, default=0, help="weights, augmentation, held-out split")


def _train_parser(sub) -> None:
    t = sub.add_parser("train", help="train a detector", formatter_class=HelpFormatter)
    t.add_argument("--data", required=True, help="`scenes`, or a COCO-format folder")
    t.add_argument("--out", required=True, help="run directory (checkpoints, metrics, curves)")
    _model_options(t)
    _optimisation_options(t)
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
    ev = t.add_argument_group("validation and run control")
    ev.add_argument("--eval-every", type=int, default=1, help="epochs between validations")
    ev.add_argument(
        "--stop-after-epochs",
        type=int,
        metavar="N",
        help="train N more epochs, then stop (continue with --resume; default: to the end)",
    )
    ev.add_argument(
        "--resume", metavar="PATH|auto", help="continue from a last.pt (auto: OUT/last.pt)"
    )
    f = t.add_argument_group("COCO folder data (--data DIR)")
    f.add_argument(
        "--val-fraction",
        type=float,
        help="with a single annotation file, hold out this fraction (default: 0.1)",
    )
    f.add_argument("--skip-bad", action="store_true", help="leave out (and list) bad annotations")
    _scene_options(t, recorded=False, train=True)
    _runtime_options(t)


def _eval_parser(sub) -> None:
    e = sub.add_parser("eval", help="COCO box and mask AP", formatter_class=HelpFormatter)
    e.add_argument("checkpoint", help="run directory (its best.safetensors), .safetensors or .pt")
    e.add_argument(
        "--data",
        help="`scenes` or a COCO folder, scored on its validation split (default: the run's)",
    )
    e.add_argument("--out", help="write eval.json, results.json and pr.png here")
    e.add_argument("--batch-size", type=int, default=8, help="images per forward pass")
    e.add_argument("--skip-bad", action="store_true", help="leave out (and list) bad annotations")
    _scene_options(e, recorded=True, train=False)
    _runtime_options(e)


def _predict_parser(sub) -> None:
    p = sub.add_parser(
        "predict", help="draw detections, write COCO results", formatter_class=HelpFormatter
    )
    p.add_argument("checkpoint", help="run directory (its best.safetensors), .safetensors or .pt")
    p.add_argument("inputs", nargs="+", help="image files or folders of images")
    p.add_argument("--out", default="predictions", help="output directory")
    p.add_argument("--score-thresh", type=float, default=0.5, help="keep detections scoring this")
    p.add_argument("--mask-thresh", type=float, default=0.5, help="mask probability threshold")
    _runtime_options(p)


def _scenes_parser(sub) -> None:
    s = sub.add_parser(
        "scenes", help="write the built-in scenes as a COCO dataset", formatter_class=HelpFormatter
    )
    s.add_argument("--out", required=True, help="folder for images/ and instances_{train,val}.json")
    _scene_options(s, recorded=False, train=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m apps.detect", description=DESCRIPTION, formatter_class=HelpFormatter
    )
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="{train,eval,predict,scenes}"
    )
    _train_parser(sub)
    _eval_parser(sub)
    _predict_parser(sub)
    _scenes_parser(sub)
    return parser


def _refuse(parser: argparse.ArgumentParser, message: str) -> NoReturn:
    parser.exit(2, f"error: {message}\n")


def _given(args: argparse.Namespace, names: Sequence[str]) -> list[str]:
    return [
        f"--{n.replace('_', '-')}" for n in names if getattr(args, n, None) not in (None, False)
    ]


def _check_data_options(parser, args: argparse.Namespace) -> None:
    """Refuse options of the other kind of data; fill in the scene defaults for training."""
    data = getattr(args, "data", None)
    if args.command == "scenes" or data == "scenes":
        wrong = _given(args, FOLDER_ONLY)
        if wrong:
            _refuse(parser, f"{wrong[0]} applies to COCO folder data, not scenes")
        if args.command in ("train", "scenes"):
            for name, value in SCENE_DEFAULTS.items():
                if getattr(args, name, None) is None:
                    setattr(args, name, value)
    elif data is not None:
        wrong = _given(args, [*SCENE_DEFAULTS, "fmnist_dir"])
        if wrong:
            _refuse(parser, f"{wrong[0]} applies to --data scenes, not a folder ({data})")


def _check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    problem = out_problem(getattr(args, "out", None))
    if problem is not None:
        _refuse(parser, problem)
    positive = ["batch_size", "epochs", "eval_every", "canvas", "train_scenes", "val_scenes"]
    positive += ["min_items", "max_items", "min_size", "max_size", "threads"]
    for name in positive:
        value = getattr(args, name, None)
        if value is not None and value < 1:
            _refuse(parser, f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if (getattr(args, "warmup_steps", None) or 0) < 0:
        _refuse(parser, f"--warmup-steps must be >= 0, got {args.warmup_steps}")
    if not 0.0 <= (getattr(args, "val_fraction", None) or 0.0) < 1.0:
        _refuse(parser, f"--val-fraction must be in [0, 1), got {args.val_fraction}")
    for name in ("lr", "backbone_lr_scale"):
        if getattr(args, name, 1.0) <= 0:
            _refuse(parser, f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    if not 0.0 <= getattr(args, "drop_path", 0.0) < 1.0:
        _refuse(parser, f"--drop-path must be in [0, 1), got {args.drop_path}")
    low, high = getattr(args, "scale_range", (1.0, 1.0))
    if not 0 < low <= high:
        _refuse(parser, f"--scale-range needs 0 < LOW <= HIGH, got {low} {high}")
    data = getattr(args, "data", None)
    if data is not None and data != "scenes" and data.startswith("-"):
        _refuse(parser, f"--data expects `scenes` or a folder, got {data}")
    _check_data_options(parser, args)


def _run(args: argparse.Namespace) -> None:
    if args.command == "train":
        from apps.detect.train import run_train

        run_train(args)
    elif args.command == "eval":
        from apps.detect.evaluate import run_eval

        run_eval(args)
    elif args.command == "predict":
        from apps.detect.predict import run_predict

        run_predict(args)
    else:
        from apps.detect.scene_files import write_scenes

        write_scenes(args)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _check(parser, args)
    # Imported here so `--help` answers without loading torch.
    import torch

    if getattr(args, "threads", None) is not None:
        torch.set_num_threads(args.threads)
    if getattr(args, "attention", None) is not None:
        import ppma_ops

        ppma_ops.set_backend(args.attention)
    from ppma_models.checkpoint import CheckpointError as ModelCheckpointError

    from apps.detect.coco import CocoDatasetError
    from apps.engine import CheckpointError

    try:
        _run(args)
    except SystemExit as exc:  # the commands stop with SystemExit("error: ...") on bad input
        if isinstance(exc.code, str):
            print(exc.code, file=sys.stderr)
            return 2
        raise
    except (CocoDatasetError, CheckpointError, ModelCheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    return 0
