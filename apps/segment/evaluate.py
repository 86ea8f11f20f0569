"""Evaluation, for ``python -m apps.segment eval`` and during training.

Logits (whole image or sliding window) → confusion matrix → per-class IoU, mIoU, accuracy.

Each process evaluates its shard (every world_size-th image, no padding), confusion matrices
and loss sums are then summed over processes, so the scores equal a single-process run.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from ppma_models import CheckpointError
from torch.utils.data import DataLoader, Dataset

from apps.engine.distributed import DistributedContext, ShardSampler, init_distributed
from apps.engine.options import OptionError
from apps.engine.plots import plot_confusion_matrix
from apps.engine.progress import console, progress_bar, progress_enabled
from apps.segment.cli import SCENE_DEFAULTS, given_options
from apps.segment.data import (
    FolderSource,
    SegmentationSamples,
    recorded_val_source,
    scene_source,
)
from apps.segment.folder import folder_layout, scan_folder
from apps.segment.inference import sliding_window_logits
from apps.segment.metrics import ConfusionMatrix, SegmentationScores
from apps.segment.model import ModelSpec, load_run
from apps.segment.scenes import SCENE_CLASSES, SceneConfig

__all__ = [
    "EvalResult",
    "InferenceMode",
    "evaluate_segmentation",
    "format_scores",
    "predict_logits",
    "run_eval",
]

InferenceMode = Literal["whole", "slide"]


@dataclass
class EvalResult:
    scores: SegmentationScores
    loss: float  # mean cross-entropy per labelled pixel
    confusion: torch.Tensor

    def metrics(self) -> dict[str, float]:
        """Flat numbers for the training log (keys become ``val_<key>``)."""
        return {
            "miou": self.scores.miou,
            "pixel_acc": self.scores.pixel_accuracy,
            "loss": self.loss,
        }


def predict_logits(
    model: torch.nn.Module,
    x: torch.Tensor,
    num_classes: int,
    mode: InferenceMode = "whole",
    window: int = 512,
    stride: int = 341,
    flip: bool = False,
    scales: Sequence[float] = (1.0,),
) -> torch.Tensor:
    """(B, 3, H, W) → float32 logits (B, classes, H, W).

    With ``flip`` and/or several ``scales`` (MMSegmentation's aug test) the image is also run
    mirrored and/or resized by each factor; the views' softmax probabilities are averaged at
    the input resolution and their log is returned (so argmax and cross-entropy refer to the
    averaged prediction). A single unflipped view at scale 1 returns the raw logits.
    """
    if mode not in ("whole", "slide"):
        raise ValueError(f"mode must be 'whole' or 'slide', got {mode!r}")
    if not scales or any(s <= 0 for s in scales):
        raise ValueError(f"scales must be positive factors, got {list(scales)}")

    def run(image: torch.Tensor) -> torch.Tensor:
        if mode == "whole":
            return model(image).float()
        return sliding_window_logits(model, image, num_classes, window, stride)

    views = [(s, mirror) for s in scales for mirror in ((False, True) if flip else (False,))]
    if views == [(1.0, False)]:
        return run(x)
    size = x.shape[-2:]
    probs = torch.zeros((), device=x.device)
    for factor, mirror in views:
        image = x
        if factor != 1.0:
            scaled = [max(1, round(n * factor)) for n in size]
            image = F.interpolate(x, size=scaled, mode="bilinear", align_corners=False)
        logits = run(image.flip(-1) if mirror else image)
        if mirror:
            logits = logits.flip(-1)
        if factor != 1.0:
            logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        probs = probs + logits.softmax(1)
    return (probs / len(views)).log()


def _use_rank0_buffers(model: torch.nn.Module, ctx: DistributedContext) -> None:
    """Give every rank rank 0's BatchNorm statistics before evaluating.

    DDP broadcasts buffers at the start of each training forward, but that forward then
    updates each rank's running statistics with its own batch, so after the last step they
    differ between ranks. Rank 0's are the ones saved in the checkpoint; scoring every shard
    with them makes the reduced score that of the saved weights.
    """
    if not ctx.enabled:
        return
    import torch.distributed as dist

    for buffer in model.buffers():
        dist.broadcast(buffer.data, src=0)


@torch.no_grad()
def evaluate_segmentation(
    model: torch.nn.Module,
    dataset: Dataset,
    *,
    num_classes: int,
    ignore_index: int,
    ctx: DistributedContext | None = None,
    mode: InferenceMode = "whole",
    window: int = 512,
    stride: int = 341,
    batch_size: int = 16,
    workers: int = 0,
    progress: bool = False,
    flip: bool = False,
    scales: Sequence[float] = (1.0,),
) -> EvalResult:
    """Scores of ``model`` on ``dataset`` (pairs of (3, H, W) tensors and (H, W) masks)."""
    ctx = ctx or DistributedContext()
    was_training = model.training
    model.eval()
    _use_rank0_buffers(model, ctx)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=ShardSampler(len(dataset), ctx.rank, ctx.world_size),
        num_workers=workers,
    )
    confusion = ConfusionMatrix(num_classes, ignore_index)
    loss_sum = torch.zeros((), dtype=torch.float64)
    for x, y in progress_bar(loader, total=len(loader), desc="eval", enabled=progress):
        x, y = x.to(ctx.device), y.to(ctx.device)
        logits = predict_logits(model, x, num_classes, mode, window, stride, flip, scales)
        loss_sum += (
            F.cross_entropy(logits, y, ignore_index=ignore_index, reduction="sum").double().cpu()
        )
        confusion.update(logits, y)
    model.train(was_training)
    confusion.reduce(ctx.all_reduce_sum, ctx.device)
    loss_total = ctx.reduce_sums({"loss": loss_sum})["loss"]
    labelled = int(confusion.counts.sum())
    return EvalResult(
        confusion.scores(), loss_total / labelled if labelled else float("nan"), confusion.counts
    )


def _scene_dataset(args, spec: ModelSpec, meta_data: dict):
    """Validation scenes: the run's layout unless the command line overrides it."""
    if spec.num_classes != len(SCENE_CLASSES):
        raise OptionError(
            f"--data scenes: the model predicts {spec.num_classes} classes, the scenes "
            f"have {len(SCENE_CLASSES)}; pass --data with images of the model's classes"
        )
    recorded = meta_data if meta_data.get("kind") == "scenes" else {}
    overrides = {
        k: getattr(args, k)
        for k in ("canvas", "min_items", "max_items", "min_size", "max_size")
        if getattr(args, k) is not None
    }
    config = replace(SceneConfig(**recorded.get("scene_config", {})), **overrides)
    seed = args.scene_seed if args.scene_seed is not None else recorded.get("scene_seed", 0)
    count = args.val_scenes or recorded.get("val_scenes", SCENE_DEFAULTS["val_scenes"])
    source = scene_source("test", config, seed + 1, count, args.fmnist_dir)
    return SegmentationSamples(source), True, {"kind": "scenes", **config.to_dict()}


def _folder_to_score(data: str, spec: ModelSpec, skip_bad: bool):
    """A folder named by --data: its val/ when it has train/ + val/, else the folder itself."""
    layout = folder_layout(data)
    if layout.train != layout.root and layout.val is None:
        raise OptionError(
            f"--data {data} has train/ but no val/; name the folder to score "
            f"(e.g. --data {layout.train})"
        )
    folder = scan_folder(
        layout.val or layout.root,
        num_classes=spec.num_classes,
        ignore_index=spec.ignore_index,
        skip_bad=skip_bad,
        classes_file=layout.classes_file,
    )
    if layout.classes_file is not None and folder.class_names != spec.class_names:
        console(
            f"warning: {layout.classes_file} names {folder.class_names} but the model was "
            f"trained on {spec.class_names}; scoring by class id"
        )
    return FolderSource(folder)


def _eval_dataset(args, spec: ModelSpec, meta_data: dict):
    """The images to score: --data, or without it the validation data the run recorded."""
    recorded_kind = meta_data.get("kind", "scenes")  # runs that predate folders used scenes
    if args.data == "scenes" or (args.data is None and recorded_kind == "scenes"):
        return _scene_dataset(args, spec, meta_data)
    wrong = given_options(args, [*SCENE_DEFAULTS, "fmnist_dir"])
    if wrong:
        raise OptionError(f"{wrong[0]} applies to --data scenes, not folder data")
    if args.data is None:
        source = recorded_val_source(meta_data, spec.num_classes, spec.ignore_index)
    else:
        source = _folder_to_score(args.data, spec, args.skip_bad)
    for problem in source.folder.skipped:
        console(f"skipped: {problem}")
    description = {"kind": "folder", "root": str(source.folder.root), "images": len(source)}
    return SegmentationSamples(source), False, description


def format_scores(result: EvalResult, class_names: tuple[str, ...]) -> str:
    width = max(len(n) for n in (*class_names, "pixel accuracy"))
    lines = [f"{'class':<{width}}  IoU"]
    for name, iou in zip(class_names, result.scores.per_class_iou, strict=True):
        lines.append(f"{name:<{width}}  {'  n/a' if math.isnan(iou) else f'{100 * iou:5.1f}'}")
    lines.append(f"{'mIoU':<{width}}  {100 * result.scores.miou:5.2f}")
    lines.append(f"{'pixel accuracy':<{width}}  {100 * result.scores.pixel_accuracy:5.2f}")
    return "\n".join(lines)


def _recorded_eval_dataset(args, spec: ModelSpec, meta_data: dict):
    """:func:`_eval_dataset` with the checkpoint's data description; a damaged description
    is a CheckpointError naming the file, not a KeyError or TypeError from deep inside."""
    try:
        return _eval_dataset(args, spec, meta_data)
    except (KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(
            f"{args.checkpoint}: the recorded data description is not usable "
            f"({type(exc).__name__}: {exc}); pass --data to name the images to score"
        ) from None


def run_eval(args) -> EvalResult:
    """``python -m apps.segment eval``: print per-class IoU, mIoU, pixel accuracy."""
    ctx = init_distributed(args.device)
    try:
        model, run = load_run(args.checkpoint)
        spec = ModelSpec.from_dict(run.model)
        dataset, same_size, data_desc = _recorded_eval_dataset(args, spec, run.data)
        window = args.window or spec.crop
        stride = args.stride or max(1, (2 * window) // 3)
        result = evaluate_segmentation(
            model.to(ctx.device),
            dataset,
            num_classes=spec.num_classes,
            ignore_index=spec.ignore_index,
            ctx=ctx,
            mode=args.mode,
            window=window,
            stride=stride,
            batch_size=args.batch_size if same_size else 1,
            workers=args.workers,
            progress=progress_enabled(args.progress, ctx.is_main),
            flip=args.flip,
            scales=args.scales,
        )
        if ctx.is_main:
            print(format_scores(result, spec.class_names))
            if args.out:
                out = Path(args.out)
                out.mkdir(parents=True, exist_ok=True)
                report = {
                    **result.scores.as_dict(spec.class_names),
                    "loss": result.loss,
                    "mode": args.mode,
                    "flip": args.flip,
                    "scales": list(args.scales),
                    "window": window if args.mode == "slide" else None,
                    "stride": stride if args.mode == "slide" else None,
                    "images": len(dataset),
                    "data": data_desc,
                    "checkpoint": str(args.checkpoint),
                }
                (out / "eval.json").write_text(json.dumps(report, indent=2) + "\n")
                plot_confusion_matrix(
                    result.confusion.numpy(), list(spec.class_names), out / "confusion.png"
                )
                console(f"wrote {out / 'eval.json'} and {out / 'confusion.png'}")
        return result
    finally:
        ctx.shutdown()
