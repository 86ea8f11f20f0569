"""Evaluation, for ``python -m apps.detect eval`` and during training.

Detections on each process's shard (every world_size-th image) are gathered on every process
and scored there with pycocotools (:mod:`apps.detect.metrics`), so every rank reports the same
numbers, equal to a single-process run.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from ppma_models import CheckpointError
from torch.utils.data import DataLoader, Dataset

from apps.detect.coco import read_coco
from apps.detect.data import (
    CocoSource,
    DetectionSamples,
    coco_folder,
    collate,
    holdout_split,
    images_dir,
    scene_source,
)
from apps.detect.metrics import DetectionScores, coco_scores, ground_truth, results_from_output
from apps.detect.model import DetectorSpec, load_run
from apps.detect.plots import plot_precision_recall
from apps.detect.scenes import INSTANCE_CLASSES
from apps.engine.distributed import DistributedContext, ShardSampler, init_distributed
from apps.engine.options import OptionError
from apps.engine.progress import console, progress_bar, progress_enabled
from apps.segment.scenes import SceneConfig

__all__ = [
    "SCENE_EVAL_DEFAULTS",
    "detect_results",
    "evaluate_detection",
    "format_scores",
    "run_eval",
]

SCENE_EVAL_DEFAULTS = {"val_scenes": 500, "scene_seed": 0}


def _gather(items: list, ctx: DistributedContext) -> list:
    if not ctx.enabled:
        return items
    import torch.distributed as dist

    parts: list = [None] * ctx.world_size
    dist.all_gather_object(parts, items)
    return [item for part in parts for item in part]


@torch.no_grad()
def detect_results(
    model: torch.nn.Module,
    source: Dataset,
    *,
    ctx: DistributedContext | None = None,
    batch_size: int = 8,
    workers: int = 0,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """COCO results (``image_id`` = index in ``source``, ``category_id`` = label) of every
    image, gathered from all processes."""
    ctx = ctx or DistributedContext()
    was_training = model.training
    model.eval()
    loader = DataLoader(
        DetectionSamples(source),
        batch_size=batch_size,
        sampler=ShardSampler(len(source), ctx.rank, ctx.world_size),
        num_workers=workers,
        collate_fn=collate,
    )
    results: list[dict[str, Any]] = []
    for indices, images, _ in progress_bar(
        loader, total=len(loader), desc="eval", enabled=progress
    ):
        outputs = model([image.to(ctx.device) for image in images])
        for index, output in zip(indices.tolist(), outputs, strict=True):
            results += results_from_output(index, output)
    model.train(was_training)
    return _gather(results, ctx)


def evaluate_detection(
    model: torch.nn.Module,
    source: Dataset,
    num_classes: int,
    *,
    ctx: DistributedContext | None = None,
    batch_size: int = 8,
    workers: int = 0,
    progress: bool = False,
    gt=None,
) -> tuple[DetectionScores, list[dict[str, Any]]]:
    """(COCO scores, results) of ``model`` on ``source``; ``gt`` saves rebuilding the ground
    truth (:func:`apps.detect.metrics.ground_truth` of the source) on every call."""
    results = detect_results(
        model, source, ctx=ctx, batch_size=batch_size, workers=workers, progress=progress
    )
    if gt is None:
        gt = ground_truth((source.ground_truth(i) for i in range(len(source))), num_classes)
    return coco_scores(gt, results, num_classes), results


def _pct(value: float) -> str:
    return "  n/a" if math.isnan(value) else f"{100 * value:5.1f}"


def format_scores(scores: DetectionScores, class_names: Sequence[str]) -> str:
    """A table: AP, AP50, AP75, APs/m/l for boxes and masks, then AP per class."""
    header = f"{'':<6}{'AP':>7}{'AP50':>7}{'AP75':>7}{'APs':>7}{'APm':>7}{'APl':>7}"
    lines = [header]
    for kind in ("box", "mask"):
        s = getattr(scores, kind).stats
        names = ("ap", "ap50", "ap75", "ap_small", "ap_medium", "ap_large")
        lines.append(f"{kind:<6}" + "".join(f"{_pct(s[n]):>7}" for n in names))
    width = max(len(n) for n in (*class_names, "class"))
    lines.append(f"\n{'class':<{width}}  box AP  mask AP")
    for name, box, mask in zip(
        class_names, scores.box.per_class_ap, scores.mask.per_class_ap, strict=True
    ):
        lines.append(f"{name:<{width}}  {_pct(box):>6}  {_pct(mask):>7}")
    return "\n".join(lines)


def _scene_source(args, meta_data: dict):
    recorded = meta_data if meta_data.get("kind") == "scenes" else {}
    overrides = {
        k: getattr(args, k)
        for k in ("canvas", "min_items", "max_items", "min_size", "max_size")
        if getattr(args, k, None) is not None
    }
    config = replace(SceneConfig(**recorded.get("scene_config", {})), **overrides)
    seed = args.scene_seed if args.scene_seed is not None else recorded.get("scene_seed", 0)
    count = args.val_scenes or recorded.get("val_scenes", SCENE_EVAL_DEFAULTS["val_scenes"])
    source = scene_source("test", config, seed + 1, count, args.fmnist_dir)
    return source, {"kind": "scenes", "scene_seed": seed, "count": count, **config.to_dict()}


def _folder_source(data: str, spec: DetectorSpec, skip_bad: bool):
    """The validation split of a COCO folder, or its only annotation file."""
    root = Path(data)
    train_file, val_file = coco_folder(root)
    chosen = val_file or train_file
    names = list(zip(spec.category_ids, spec.class_names, strict=True))
    coco = read_coco(chosen, images_dir(root, chosen), skip_bad=skip_bad, categories=names)
    for problem in coco.skipped:
        console(f"skipped: {problem}")
    return CocoSource(coco), {"kind": "coco", "annotations": str(chosen), "images": len(coco)}


def _recorded_folder_source(meta_data: dict, spec: DetectorSpec):
    val = meta_data.get("val") or {}
    train = Path(meta_data["train"])
    root = Path(meta_data["root"])
    names = list(zip(spec.category_ids, spec.class_names, strict=True))
    skip = bool(meta_data.get("skip_bad", False))
    if "annotations" in val:
        path = Path(val["annotations"])
        coco = read_coco(path, images_dir(root, path), skip_bad=skip, categories=names)
        return CocoSource(coco), {"kind": "coco", "annotations": str(path)}
    if not val.get("images"):
        raise OptionError(
            "the run held out no validation images; pass --data to name the images to score"
        )
    coco = read_coco(train, images_dir(root, train), skip_bad=skip, categories=names)
    _, val_idx = holdout_split(len(coco), val["fraction"], val["seed"])
    return CocoSource(coco, val_idx), {"kind": "coco", "held_out_of": str(train)}


def _eval_source(args, spec: DetectorSpec, meta_data: dict):
    if args.data == "scenes" or (args.data is None and meta_data.get("kind") == "scenes"):
        return _scene_source(args, meta_data)
    if args.data is not None:
        return _folder_source(args.data, spec, args.skip_bad)
    try:
        return _recorded_folder_source(meta_data, spec)
    except (KeyError, TypeError) as exc:
        raise CheckpointError(
            f"{args.checkpoint}: the recorded data description is not usable ({exc}); "
            "pass --data to name the images to score"
        ) from None


def _write_report(out: Path, scores, results, spec: DetectorSpec, source, extra: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    report = {**scores.as_dict(spec.class_names), **extra}
    (out / "eval.json").write_text(json.dumps(report, indent=2) + "\n")
    written = [
        {
            **r,
            "image_id": source.image_id(r["image_id"]),
            "category_id": spec.category_ids[r["category_id"] - 1],
        }
        for r in results
    ]
    (out / "results.json").write_text(json.dumps(written) + "\n")
    plot_precision_recall(scores, out / "pr.png")
    console(f"wrote {out / 'eval.json'}, {out / 'results.json'} and {out / 'pr.png'}")


def run_eval(args: argparse.Namespace) -> DetectionScores:
    """``python -m apps.detect eval``: COCO box and mask AP on held-out images."""
    ctx = init_distributed(args.device)
    try:
        model, run = load_run(args.checkpoint)
        spec = DetectorSpec.from_dict(run.model)
        source, description = _eval_source(args, spec, run.data)
        if args.data == "scenes" and spec.num_classes != len(INSTANCE_CLASSES):
            raise OptionError(
                f"--data scenes: the model predicts {spec.num_classes} classes, the scenes have "
                f"{len(INSTANCE_CLASSES)}; pass --data with images of the model's classes"
            )
        scores, results = evaluate_detection(
            model.to(ctx.device), source, spec.num_classes, ctx=ctx, batch_size=args.batch_size,
            workers=args.workers, progress=progress_enabled(args.progress, ctx.is_main),
        )  # fmt: skip
        if ctx.is_main:
            print(format_scores(scores, spec.class_names))
            if args.out:
                extra = {"data": description, "checkpoint": str(args.checkpoint)}
                _write_report(Path(args.out), scores, results, spec, source, extra)
        return scores
    finally:
        ctx.shutdown()
