"""``python -m apps.detect train``: Mask R-CNN on a PPMA backbone, on the shared epoch loop.

The task-specific parts live here -- data, augmentation, the detector's own losses (RPN
objectness and box, RoI classification, box and mask), COCO AP on the validation images -- and
:class:`apps.engine.Trainer` does the rest: bf16 autocast, gradient clipping, EMA, DDP under
``torchrun``, atomic ``last``/``best`` checkpoints with exact resume, metrics.jsonl and
curves.png.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from apps.detect.data import (
    DetectionSamples,
    EpochShuffleSampler,
    SourcePair,
    build_sources,
    collate,
)
from apps.detect.evaluate import evaluate_detection
from apps.detect.metrics import ground_truth
from apps.detect.model import DetectorSpec, build_model, scene_settings
from apps.detect.transforms import TrainAugment
from apps.engine import (
    Trainer,
    TrainerConfig,
    WarmupSchedule,
    build_adamw,
    console,
    init_distributed,
    progress_enabled,
)
from apps.engine.model_args import parse_model_args
from apps.segment.model import backbone_config_problem

__all__ = ["LOSS_NAMES", "make_train_step", "run_train"]

#: The losses torchvision's Mask R-CNN returns in training mode; their sum is minimised.
LOSS_NAMES = ("loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg", "loss_mask")
DEFAULT_EPOCHS = 12  # mmdetection's 1x schedule
DEFAULT_WARMUP = 500  # mmdetection's linear warm-up, in steps
WARMUP_FRACTION = 0.1
MAX_AUTO_BATCH = 8


def make_train_step():
    """The Trainer's ``train_step``: the sum of the detector's losses; each is logged."""

    def train_step(model, batch, device):
        _, images, targets = batch
        images = [image.to(device, non_blocking=True) for image in images]
        targets = [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in targets]
        losses = model(images, targets)
        loss = sum(losses[name] for name in LOSS_NAMES)
        b = len(images)
        sums = {
            name.removeprefix("loss_"): losses[name].detach().float() * b for name in LOSS_NAMES
        }
        return loss, {"loss": loss.detach().float() * b, **sums, "count": b}

    return train_step


def _model_overrides(args: argparse.Namespace) -> tuple[dict, dict]:
    """(backbone overrides from --model-arg, detector settings from --detector-arg), checked
    before any data is read."""
    try:
        backbone = parse_model_args(args.model_arg)
        detector = parse_model_args(args.detector_arg)
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from exc
    problem = backbone_config_problem(args.backbone, backbone)
    if problem is not None:
        raise SystemExit(f"error: --model-arg: {problem}")
    return backbone, detector


def _spec(args: argparse.Namespace, sources: SourcePair) -> DetectorSpec:
    backbone_args, detector_args = _model_overrides(args)
    settings = scene_settings(args.canvas) if args.data == "scenes" else {}
    settings.update(detector_args)
    spec = DetectorSpec(
        backbone=args.backbone,
        class_names=sources.class_names,
        category_ids=tuple(sources.category_ids),
        settings=settings,
        backbone_args=backbone_args,
        drop_path=args.drop_path,
    )
    try:
        spec.detection_settings()
    except (TypeError, ValueError) as exc:
        raise SystemExit(f"error: --detector-arg: {exc}") from None
    return spec


def _resolve(args: argparse.Namespace, sources: SourcePair, world_size: int) -> dict[str, str]:
    """Fill in batch size, epochs and warmup left open; returns where each came from."""
    per_process = math.ceil(len(sources.train) / world_size)
    why = {}
    if args.batch_size is None:
        args.batch_size = max(1, min(MAX_AUTO_BATCH, per_process // 4))
        why["batch"] = f"auto: {per_process} images per process, at least 4 steps per epoch"
    elif args.batch_size > per_process:
        raise SystemExit(
            f"error: --batch-size {args.batch_size} is larger than this process's share of "
            f"the {per_process} training images"
        )
    steps = per_process // args.batch_size
    if args.epochs is None:
        args.epochs = DEFAULT_EPOCHS
        why["epochs"] = "auto: mmdetection's 1x schedule"
    total = args.epochs * steps
    if args.warmup_steps is None:
        args.warmup_steps = min(DEFAULT_WARMUP, int(WARMUP_FRACTION * total))
        why["warmup"] = f"auto: {DEFAULT_WARMUP}, at most {WARMUP_FRACTION:.0%} of the run"
    elif args.warmup_steps >= total:
        raise SystemExit(
            f"error: --warmup-steps {args.warmup_steps} is not shorter than the run's {total} "
            "optimizer steps"
        )
    why["steps"] = f"{steps} per epoch, {total} in all"
    return why


def _train_loader(args, spec: DetectorSpec, sources: SourcePair, ctx) -> DataLoader:
    settings = spec.detection_settings()
    augment = TrainAugment(
        settings.min_size, settings.max_size, tuple(args.scale_range), flip=not args.no_flip
    )
    samples = DetectionSamples(sources.train, augment, seed=args.seed)
    return DataLoader(
        samples,
        batch_size=args.batch_size,
        sampler=EpochShuffleSampler(samples, ctx.rank, ctx.world_size, args.seed),
        num_workers=args.workers,
        collate_fn=collate,
        drop_last=True,  # every step sees a full batch (and the loop never sees a batch of one)
    )


def _make_evaluate(args, spec: DetectorSpec, sources: SourcePair):
    """The Trainer's ``evaluate``: COCO AP on the validation images, or None without any."""
    if sources.val is None:
        return None
    val = sources.val
    gt = ground_truth((val.ground_truth(i) for i in range(len(val))), spec.num_classes)

    def evaluate(module, ctx):
        scores, _ = evaluate_detection(
            module,
            val,
            spec.num_classes,
            ctx=ctx,
            batch_size=args.batch_size,
            workers=args.workers,
            progress=progress_enabled(False if args.no_progress else None, ctx.is_main),
            gt=gt,
        )
        return scores.metrics()

    return evaluate


def _trainer_config(args: argparse.Namespace, validates: bool) -> TrainerConfig:
    losses = [f"train_{name.removeprefix('loss_')}" for name in LOSS_NAMES]
    return TrainerConfig(
        out_dir=Path(args.out),
        epochs=args.epochs,
        seed=args.seed,
        grad_clip=args.grad_clip,
        amp=args.amp,
        ema_decay=args.ema_decay,
        progress=False if args.no_progress else None,
        best_metric="val_box_ap" if validates else "train_loss",
        best_mode="max" if validates else "min",
        eval_every=args.eval_every,
        curve_panels={
            "loss": ["train_loss"],
            "losses": losses,
            "AP (IoU 0.50:0.95)": ["val_box_ap", "val_mask_ap"],
            "AP50": ["val_box_ap50", "val_mask_ap50"],
        },
    )


def _build_trainer(args, spec: DetectorSpec, model, sources: SourcePair, loader, ctx) -> Trainer:
    optimizer = build_adamw(
        model,
        lr=args.lr,
        weight_decay=args.weight_decay,
        lr_scales={"backbone.body.": args.backbone_lr_scale},
    )
    schedule = WarmupSchedule(
        optimizer,
        total_steps=args.epochs * len(loader),
        warmup_steps=args.warmup_steps,
        decay=args.schedule,
        min_ratio=args.min_lr_ratio,
    )
    evaluate = _make_evaluate(args, spec, sources)
    meta = {
        "app": "detect",
        "model": spec.to_dict(),
        "data": sources.description,
        "augment": {"scale_range": list(args.scale_range), "flip": not args.no_flip},
    }
    return Trainer(
        model,
        optimizer,
        schedule,
        loader,
        _trainer_config(args, evaluate is not None),
        train_step=make_train_step(),
        evaluate=evaluate,
        ctx=ctx,
        meta=meta,
    )


def _settings_table(args, spec: DetectorSpec, sources: SourcePair, why: dict, ctx, params) -> str:
    val = len(sources.val) if sources.val is not None else 0
    s = spec.detection_settings()
    rows = [
        ("data", json.dumps(sources.description)[:160]),
        ("images", f"{len(sources.train)} train / {val} val"),
        ("classes", f"{spec.num_classes}: {', '.join(spec.class_names[:8])}"),
        ("model", f"Mask R-CNN + FPN({s.fpn_channels}) on {args.backbone}, {params / 1e6:.2f}M"),
        ("image size", f"{s.min_size}-{s.max_size}, scale jitter {tuple(args.scale_range)}"),
        ("batch size", f"{args.batch_size} per process ({why.get('batch', '--batch-size')})"),
        ("steps", why["steps"]),
        ("epochs", f"{args.epochs} ({why.get('epochs', '--epochs')})"),
        ("lr", f"{args.lr:g} AdamW, weight decay {args.weight_decay:g}"),
        ("warmup steps", f"{args.warmup_steps} ({why.get('warmup', '--warmup-steps')})"),
        ("schedule", f"linear warmup, then {args.schedule} to {args.min_lr_ratio:g} x lr"),
        (
            "device",
            f"{ctx.device}, {ctx.world_size} process(es), {torch.get_num_threads()} threads",
        ),
        ("out", args.out),
    ] + [("note", note) for note in sources.notes[:20]]
    width = max(len(name) for name, _ in rows)
    return "settings:\n" + "\n".join(f"  {name:<{width}}  {value}" for name, value in rows)


def _write_summary(out_dir: Path, trainer: Trainer, records: list[dict], elapsed: float) -> None:
    final = records[-1]
    keys = ("val_box_ap", "val_box_ap50", "val_mask_ap", "val_mask_ap50")
    summary = {"epochs": trainer.epoch, "wall_seconds": elapsed, **{k: final.get(k) for k in keys}}
    summary["best_val_box_ap"] = (
        trainer.best_metric if final.get("val_box_ap") is not None else None
    )
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if final.get("val_box_ap") is not None:
        console(
            f"held-out box AP {100 * final['val_box_ap']:.2f}, mask AP "
            f"{100 * final['val_mask_ap']:.2f} ({elapsed / 60:.1f} min)"
        )


def run_train(args: argparse.Namespace) -> list[dict]:
    """Train as the parsed command line says; returns the epoch records."""
    ctx = init_distributed(args.device)
    try:
        return _train(args, ctx)
    finally:
        ctx.shutdown()


def _train(args: argparse.Namespace, ctx) -> list[dict]:
    start = time.perf_counter()
    _model_overrides(args)  # refuse a bad --model-arg before reading any data
    sources = build_sources(args)
    why = _resolve(args, sources, ctx.world_size)
    spec = _spec(args, sources)
    torch.manual_seed(args.seed)  # identical initial weights on every rank
    model = build_model(spec, pretrained=args.pretrained)
    loader = _train_loader(args, spec, sources, ctx)
    trainer = _build_trainer(args, spec, model, sources, loader, ctx)
    params = sum(p.numel() for p in model.parameters())
    console(_settings_table(args, spec, sources, why, ctx, params), is_main=ctx.is_main)
    if args.resume:
        trainer.resume(Path(args.out) / "last.pt" if args.resume == "auto" else args.resume)
    records = trainer.fit(stop_after_epochs=args.stop_after_epochs)
    if ctx.is_main and records:
        _write_summary(Path(args.out), trainer, records, time.perf_counter() - start)
    return records
