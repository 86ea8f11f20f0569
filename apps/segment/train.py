"""``python -m apps.segment train``: UPerNet on a PPMA backbone, on the shared epoch loop.

The task-specific parts live here -- data, augmentation, loss (cross-entropy with an ignore
index plus the auxiliary head's loss), held-out mIoU -- and :class:`apps.engine.Trainer`
does the rest: bf16 autocast, gradient clipping, EMA, DDP under ``torchrun``, atomic
``last``/``best`` checkpoints with exact resume, metrics.jsonl and curves.png.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from ppma_models.registry import get_config
from torch.utils.data import DataLoader

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
from apps.segment.data import EpochShuffleSampler, SegmentationSamples, build_sources
from apps.segment.evaluate import evaluate_segmentation
from apps.segment.metrics import correct_pixels
from apps.segment.model import ModelSpec, build_model, count_parameters
from apps.segment.transforms import TrainAugment

__all__ = ["make_train_step", "run_train"]


def make_train_step(aux_weight: float, ignore_index: int):
    """The Trainer's ``train_step``: loss = CE(logits) + aux_weight · CE(aux logits)."""

    def train_step(model, batch, device):
        x, y = (t.to(device, non_blocking=True) for t in batch)
        logits, aux = model(x, return_aux=True)
        valid = y != ignore_index
        labelled = int(valid.sum())
        if labelled == 0:  # cross-entropy over no pixels is NaN; contribute nothing instead
            loss = logits.sum() * 0.0 + (aux.sum() * 0.0 if aux is not None else 0.0)
        else:
            loss = F.cross_entropy(logits.float(), y, ignore_index=ignore_index)
            if aux is not None and aux_weight > 0:
                loss = loss + aux_weight * F.cross_entropy(
                    aux.float(), y, ignore_index=ignore_index
                )
        correct = correct_pixels(logits, y, ignore_index)
        b = len(y)
        return loss, {
            "loss": loss.detach() * b,
            "pixel_acc": correct.double() / max(labelled, 1) * b,
            "count": b,
        }

    return train_step


def _check_autocast(model: torch.nn.Module, device: torch.device, attention: str) -> None:
    """Fail before training, with a clear message, if the model cannot run under bf16."""
    model.eval()
    try:
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
            model.to(device)(torch.zeros(2, 3, 32, 32, device=device))
    except (TypeError, RuntimeError) as exc:
        raise SystemExit(
            f"error: --amp: the model does not run under bf16 autocast with --attention "
            f"{attention} ({exc}); try --attention reference or leave out --amp"
        ) from exc
    finally:
        model.train()


def _backbone_args(args: argparse.Namespace) -> dict:
    """``--model-arg`` overrides, checked against the backbone's config before any work."""
    try:
        overrides = parse_model_args(getattr(args, "model_arg", None))
        get_config(args.backbone).replace(**overrides)
    except (TypeError, ValueError) as exc:
        raise SystemExit(f"error: --model-arg: {exc}") from exc
    return overrides


def run_train(args: argparse.Namespace) -> list[dict]:
    """Train as the parsed command line says; returns the epoch records."""
    ctx = init_distributed(args.device)
    try:
        return _train(args, ctx)
    finally:
        ctx.shutdown()


def _train(args: argparse.Namespace, ctx) -> list[dict]:
    start = time.perf_counter()
    out_dir = Path(args.out)
    sources = build_sources(args)
    if args.crop is None:
        args.crop = args.canvas if args.data == "scenes" else 512
    spec = ModelSpec(
        backbone=args.backbone,
        num_classes=len(sources.class_names),
        class_names=sources.class_names,
        channels=args.channels,
        aux_channels=args.aux_channels,
        ignore_index=sources.ignore_index,
        crop=args.crop,
        drop_path=args.drop_path,
        dropout=args.head_dropout,
        fuse_kernel=args.fuse_kernel,
        backbone_args=_backbone_args(args),
    )
    torch.manual_seed(args.seed)  # identical initial weights on every rank
    model = build_model(spec, attention=args.attention, pretrained=args.pretrained)
    if args.amp:
        _check_autocast(model, ctx.device, args.attention)
    augment = TrainAugment(
        crop=args.crop,
        scale_range=tuple(args.scale_range),
        flip=not args.no_flip,
        ignore_index=sources.ignore_index,
    )
    train_set = SegmentationSamples(sources.train, augment, seed=args.seed)
    sampler = EpochShuffleSampler(train_set, ctx.rank, ctx.world_size, args.seed)
    loader = DataLoader(
        train_set,
        batch_size=args.batch_size,
        sampler=sampler,
        num_workers=args.workers,
        drop_last=True,  # a batch of one cannot train the pyramid pooling's BatchNorm
    )
    if len(loader) == 0:
        raise SystemExit(
            f"error: --batch-size {args.batch_size} is larger than this process's share of the "
            f"{len(train_set)} training images; lower it"
        )
    val_set = SegmentationSamples(sources.val) if sources.val is not None else None
    # Windows for held-out images larger than the crop; batching only when sizes agree.
    window = args.window or args.crop
    stride = args.stride or max(1, (2 * window) // 3)
    eval_batch = args.batch_size if sources.val_same_size else 1

    def evaluate(module, ctx_):
        result = evaluate_segmentation(
            module,
            val_set,
            num_classes=spec.num_classes,
            ignore_index=spec.ignore_index,
            ctx=ctx_,
            mode=args.eval_mode,
            flip=args.eval_flip,
            scales=args.eval_scales,
            window=window,
            stride=stride,
            batch_size=eval_batch,
            workers=args.workers,
            progress=progress_enabled(None if not args.no_progress else False, ctx_.is_main),
        )
        return result.metrics()

    optimizer = build_adamw(
        model,
        lr=args.lr,
        weight_decay=args.weight_decay,
        lr_scales={"backbone.": args.backbone_lr_scale},
    )
    total_steps = args.epochs * len(loader)
    schedule = WarmupSchedule(
        optimizer,
        total_steps=total_steps,
        warmup_steps=min(args.warmup_steps, total_steps),
        decay=args.schedule,
        power=args.poly_power,
        min_ratio=args.min_lr_ratio,
    )
    config = TrainerConfig(
        out_dir=out_dir,
        epochs=args.epochs,
        seed=args.seed,
        grad_clip=args.grad_clip,
        amp=args.amp,
        ema_decay=args.ema_decay,
        progress=False if args.no_progress else None,
        best_metric="val_miou" if val_set is not None else "train_loss",
        best_mode="max" if val_set is not None else "min",
        eval_every=args.eval_every,
        curve_panels={
            "loss": ["train_loss", "val_loss"],
            "mIoU": ["val_miou"],
            "pixel accuracy": ["train_pixel_acc", "val_pixel_acc"],
        },
    )
    meta = {
        "app": "segment",
        "model": spec.to_dict(),
        "data": sources.description,
        "augment": {"crop": args.crop, "scale_range": list(args.scale_range)},
    }
    trainer = Trainer(
        model,
        optimizer,
        schedule,
        loader,
        config,
        train_step=make_train_step(args.aux_weight, spec.ignore_index),
        evaluate=evaluate if val_set is not None else None,
        ctx=ctx,
        meta=meta,
    )
    console(
        f"segment: {spec.backbone} + UPerNet({spec.channels}) "
        f"{count_parameters(model) / 1e6:.2f}M params, {spec.num_classes} classes, "
        f"{len(train_set)} train / {len(val_set) if val_set else 0} val images, "
        f"{len(loader)} steps/epoch x {args.epochs} epochs, {ctx.world_size} process(es), "
        f"device {ctx.device} -> {out_dir}",
        is_main=ctx.is_main,
    )
    if args.resume:
        trainer.resume(out_dir / "last.pt" if args.resume == "auto" else args.resume)
    records = trainer.fit(stop_after_epochs=args.stop_after_epochs)
    elapsed = time.perf_counter() - start
    if ctx.is_main and records:
        final = records[-1]
        summary = {
            "epochs": trainer.epoch,
            "wall_seconds": elapsed,
            "val_miou": final.get("val_miou"),
            "val_pixel_acc": final.get("val_pixel_acc"),
            "best_val_miou": trainer.best_metric if val_set is not None else None,
        }
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        if final.get("val_miou") is not None:
            console(
                f"held-out mIoU {100 * final['val_miou']:.2f}%  pixel accuracy "
                f"{100 * final['val_pixel_acc']:.2f}%  ({elapsed / 60:.1f} min)"
            )
    return records
