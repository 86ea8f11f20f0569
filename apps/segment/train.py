"""``python -m apps.segment train``: UPerNet on a PPMA backbone, on the shared epoch loop.

The task-specific parts live here -- data, augmentation, loss (cross-entropy with an ignore
index plus the auxiliary head's loss), validation mIoU -- and :class:`apps.engine.Trainer`
does the rest: bf16 autocast, gradient clipping, EMA, DDP under ``torchrun``, atomic
``last``/``best`` checkpoints with exact resume, metrics.jsonl and curves.png.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
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
from apps.segment.data import (
    EpochShuffleSampler,
    SegmentationSamples,
    SourcePair,
    build_sources,
)
from apps.segment.evaluate import evaluate_segmentation
from apps.segment.metrics import correct_pixels
from apps.segment.model import ModelSpec, backbone_config_problem, build_model, count_parameters
from apps.segment.settings import (
    choose_batch_size,
    choose_crop,
    choose_epochs,
    choose_warmup,
    format_settings,
)
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
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from exc
    problem = backbone_config_problem(args.backbone, overrides)
    if problem is not None:
        raise SystemExit(f"error: --model-arg: {problem}")
    return overrides


def run_train(args: argparse.Namespace) -> list[dict]:
    """Train as the parsed command line says; returns the epoch records."""
    ctx = init_distributed(args.device)
    try:
        return _train(args, ctx)
    finally:
        ctx.shutdown()


def _resolve_settings(args: argparse.Namespace, sources: SourcePair, world_size: int) -> dict:
    """Fill in crop, batch size, epochs and warmup left open; returns their Choices."""
    canvas = args.canvas if args.data == "scenes" else None
    crop = choose_crop(args.crop, sources.train_sizes, canvas)
    # DistributedSampler gives every process ceil(n / world) images; partial batches are
    # dropped (a batch of one cannot train BatchNorm).
    per_process = math.ceil(len(sources.train) / world_size)
    batch = choose_batch_size(args.batch_size, per_process)
    steps = per_process // batch.value
    epochs = choose_epochs(args.epochs, steps)
    warmup = choose_warmup(args.warmup_steps, epochs.value * steps)
    args.crop, args.batch_size = crop.value, batch.value
    args.epochs, args.warmup_steps = epochs.value, warmup.value
    return {"crop": crop, "batch": batch, "epochs": epochs, "warmup": warmup, "steps": steps}


def _data_summary(args: argparse.Namespace, sources: SourcePair) -> str:
    desc = sources.description
    if desc["kind"] == "scenes":
        c = desc["scene_config"]
        return (
            f"scenes: {c['canvas']}px canvas, {c['min_items']}-{c['max_items']} garments of "
            f"{c['min_size']}-{c['max_size']}px, seed {desc['scene_seed']}"
        )
    val = desc["val"]
    if val is None:
        where = "no validation images (best = lowest train loss)"
    elif "fraction" in val:
        where = f"validation: {val['fraction']:g} of it held out (seed {val['seed']})"
    else:
        where = f"validation: {val['root']}"
    return f"folder {desc['train']}; {where}"


def _settings_rows(args, sources: SourcePair, chosen: dict, ctx, params: int) -> list:
    names = sources.class_names
    shown = ", ".join(names[:8]) + (f", ... ({len(names) - 8} more)" if len(names) > 8 else "")
    val_count = len(sources.val) if sources.val is not None else 0
    steps = chosen["steps"]
    decay = f"poly (power {args.poly_power:g})" if args.schedule == "poly" else args.schedule
    return [
        ("data", _data_summary(args, sources)),
        ("images", f"{len(sources.train)} train / {val_count} val"),
        ("classes", f"{len(names)}: {shown}"),
        ("model", f"{args.backbone} + UPerNet({args.channels}), {params / 1e6:.2f}M params"),
        ("crop", chosen["crop"]),
        ("batch size", f"{chosen['batch'].value} per process ({chosen['batch'].source})"),
        ("steps", f"{steps} per epoch, {steps * args.epochs} in all"),
        ("epochs", chosen["epochs"]),
        (
            "lr",
            f"{args.lr:g} AdamW, weight decay {args.weight_decay:g}, "
            f"backbone x{args.backbone_lr_scale:g}",
        ),  # fmt: skip
        ("warmup steps", chosen["warmup"]),
        ("schedule", f"linear warmup, then {decay} decay to {args.min_lr_ratio:g} x lr"),
        ("device", f"{ctx.device}, {ctx.world_size} process(es)"),
        ("threads", f"{torch.get_num_threads()} per process"),
        ("out", args.out),
    ] + [("note", note) for note in sources.notes]


def _model_spec(args: argparse.Namespace, sources: SourcePair) -> ModelSpec:
    return ModelSpec(
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


def _train_loader(args: argparse.Namespace, sources: SourcePair, ctx) -> DataLoader:
    augment = TrainAugment(
        crop=args.crop,
        scale_range=tuple(args.scale_range),
        flip=not args.no_flip,
        ignore_index=sources.ignore_index,
    )
    train_set = SegmentationSamples(sources.train, augment, seed=args.seed)
    return DataLoader(
        train_set,
        batch_size=args.batch_size,
        sampler=EpochShuffleSampler(train_set, ctx.rank, ctx.world_size, args.seed),
        num_workers=args.workers,
        drop_last=True,  # a batch of one cannot train the pyramid pooling's BatchNorm
    )


def _make_evaluate(args: argparse.Namespace, spec: ModelSpec, sources: SourcePair):
    """The Trainer's ``evaluate`` on the validation images, or None without any."""
    if sources.val is None:
        return None
    val_set = SegmentationSamples(sources.val)
    # Windows for validation images larger than the crop; batching only when sizes agree.
    window = args.window or args.crop
    stride = args.stride or max(1, (2 * window) // 3)
    batch = args.batch_size if sources.val_same_size else 1

    def evaluate(module, ctx):
        result = evaluate_segmentation(
            module,
            val_set,
            num_classes=spec.num_classes,
            ignore_index=spec.ignore_index,
            ctx=ctx,
            mode=args.eval_mode,
            flip=args.eval_flip,
            scales=args.eval_scales,
            window=window,
            stride=stride,
            batch_size=batch,
            workers=args.workers,
            progress=progress_enabled(None if not args.no_progress else False, ctx.is_main),
        )
        return result.metrics()

    return evaluate


def _trainer_config(args: argparse.Namespace, validates: bool) -> TrainerConfig:
    return TrainerConfig(
        out_dir=Path(args.out),
        epochs=args.epochs,
        seed=args.seed,
        grad_clip=args.grad_clip,
        amp=args.amp,
        ema_decay=args.ema_decay,
        progress=False if args.no_progress else None,
        # Without validation images the most recent weights are the best.
        best_metric="val_miou" if validates else "train_loss",
        best_mode="max" if validates else "min",
        eval_every=args.eval_every,
        curve_panels={
            "loss": ["train_loss", "val_loss"],
            "mIoU": ["val_miou"],
            "pixel accuracy": ["train_pixel_acc", "val_pixel_acc"],
        },
    )


def _build_trainer(args, spec: ModelSpec, model, sources: SourcePair, loader, ctx) -> Trainer:
    optimizer = build_adamw(
        model,
        lr=args.lr,
        weight_decay=args.weight_decay,
        lr_scales={"backbone.": args.backbone_lr_scale},
    )
    schedule = WarmupSchedule(
        optimizer,
        total_steps=args.epochs * len(loader),
        warmup_steps=args.warmup_steps,
        decay=args.schedule,
        power=args.poly_power,
        min_ratio=args.min_lr_ratio,
    )
    evaluate = _make_evaluate(args, spec, sources)
    meta = {
        "app": "segment",
        "model": spec.to_dict(),
        "data": sources.description,
        "augment": {"crop": args.crop, "scale_range": list(args.scale_range)},
    }
    return Trainer(
        model,
        optimizer,
        schedule,
        loader,
        _trainer_config(args, evaluate is not None),
        train_step=make_train_step(args.aux_weight, spec.ignore_index),
        evaluate=evaluate,
        ctx=ctx,
        meta=meta,
    )


def _write_summary(out_dir: Path, trainer: Trainer, records: list[dict], elapsed: float) -> None:
    final = records[-1]
    validated = final.get("val_miou") is not None
    summary = {
        "epochs": trainer.epoch,
        "wall_seconds": elapsed,
        "val_miou": final.get("val_miou"),
        "val_pixel_acc": final.get("val_pixel_acc"),
        "best_val_miou": trainer.best_metric if validated else None,
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if validated:
        console(
            f"val mIoU {100 * final['val_miou']:.2f}% (best {100 * trainer.best_metric:.2f}%)  "
            f"pixel accuracy {100 * final['val_pixel_acc']:.2f}%  ({elapsed / 60:.1f} min)"
        )


def _train(args: argparse.Namespace, ctx) -> list[dict]:
    start = time.perf_counter()
    sources = build_sources(args)
    chosen = _resolve_settings(args, sources, ctx.world_size)
    spec = _model_spec(args, sources)
    torch.manual_seed(args.seed)  # identical initial weights on every rank
    model = build_model(spec, attention=args.attention, pretrained=args.pretrained)
    if args.amp:
        _check_autocast(model, ctx.device, args.attention)
    loader = _train_loader(args, sources, ctx)
    assert len(loader) == chosen["steps"]  # the settings report counted the same steps
    trainer = _build_trainer(args, spec, model, sources, loader, ctx)
    rows = _settings_rows(args, sources, chosen, ctx, count_parameters(model))
    console(format_settings(rows), is_main=ctx.is_main)
    if args.resume:
        trainer.resume(Path(args.out) / "last.pt" if args.resume == "auto" else args.resume)
    records = trainer.fit(stop_after_epochs=args.stop_after_epochs)
    if ctx.is_main and records:
        _write_summary(Path(args.out), trainer, records, time.perf_counter() - start)
    return records
