"""``train``: fit a PPMA classifier; files land in ``--out`` (see apps.engine.trainer)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import ppma_models
import torch
from torch.utils.data import DataLoader, DistributedSampler

from apps.classify.datasets import (
    DataError,
    collate_skipping_failed,
    load_split,
    split_indices,
)
from apps.classify.transforms import Preprocess
from apps.classify.weights import export_classifier
from apps.engine import (
    DistributedContext,
    ShardSampler,
    Trainer,
    TrainerConfig,
    WarmupSchedule,
    build_adamw,
    console,
    init_distributed,
    load_training_state,
    seed_everything,
)
from apps.engine.model_args import parse_model_args as engine_model_args

__all__ = ["RECIPE_KEYS", "parse_model_args", "run_train"]

# Arguments that define a run; stored in the checkpoint so --resume continues the same recipe.
RECIPE_KEYS = (
    "data", "data_dir", "subset", "val_fraction", "input_size", "model", "model_arg", "pretrained",
    "epochs", "batch_size", "lr", "min_lr_ratio", "weight_decay", "warmup_epochs",
    "label_smoothing", "drop_path", "ema_decay", "amp", "grad_clip", "seed", "augment", "hflip",
)  # fmt: skip


def parse_model_args(items: list[str] | None) -> dict[str, Any]:
    """``--model-arg`` items as PPMAConfig overrides (see apps.engine.model_args)."""
    try:
        return engine_model_args(items)
    except ValueError as exc:
        raise DataError(str(exc)) from exc


def _loader(dataset, batch_size: int, sampler, workers: int, drop_last: bool) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        collate_fn=collate_skipping_failed,
        drop_last=drop_last,
        persistent_workers=workers > 0,
    )


def _evaluate_fn(loader: DataLoader, criterion: torch.nn.Module):
    @torch.no_grad()
    def evaluate(model: torch.nn.Module, ctx: DistributedContext) -> dict[str, float]:
        model.eval()
        sums = {"loss": 0.0, "acc": 0.0, "count": 0.0}
        for batch in loader:
            if batch is None:
                continue
            x, y = (t.to(ctx.device, non_blocking=True) for t in batch)
            logits = model(x).float()
            sums["loss"] += float(criterion(logits, y)) * len(y)
            sums["acc"] += float((logits.argmax(1) == y).sum())
            sums["count"] += len(y)
        total = ctx.reduce_sums(sums)
        count = max(total["count"], 1.0)
        return {"loss": total["loss"] / count, "acc": total["acc"] / count}

    return evaluate


def _recipe_from_checkpoint(args: argparse.Namespace) -> argparse.Namespace:
    state = load_training_state(args.resume)
    meta = state["meta"]
    if meta.get("task") != "classification":
        raise DataError(f"--resume {args.resume}: not a classification training checkpoint")
    for key, value in meta["recipe"].items():
        setattr(args, key, value)
    args.out = str(Path(args.resume).parent)
    return args


def run_train(args: argparse.Namespace) -> int:
    if args.resume:
        args = _recipe_from_checkpoint(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    # AdamW's second moments underflow into denormals, which are ~100x slower on x86 CPUs.
    torch.set_flush_denormal(True)
    if args.batch_size < 1 or args.epochs < 1:
        raise DataError("--batch-size and --epochs must be >= 1")
    ctx = init_distributed(args.device)
    try:
        return _train(args, ctx)
    finally:
        ctx.shutdown()


def _train(args: argparse.Namespace, ctx: DistributedContext) -> int:
    seed_everything(args.seed)
    overrides = parse_model_args(args.model_arg)
    channels = 3 if args.pretrained else overrides.get("in_chans", None)
    train_set, spec = load_split(
        args.data, "train", data_dir=args.data_dir, input_size=args.input_size,
        channels=channels or 3,
    )  # fmt: skip
    in_chans = channels or spec.in_chans
    if args.subset is not None and args.subset < len(train_set):
        _, chosen = split_indices(len(train_set), args.subset / len(train_set), args.seed + 1)
        train_set = train_set.subset(chosen)
    val_set = None
    folder_val = Path(args.data) / "val"
    if spec.name not in ("fashion-mnist", "digits") and folder_val.is_dir():
        val_set, _ = load_split(
            args.data, "test", input_size=args.input_size, channels=in_chans,
            class_names=spec.class_names,
        )  # fmt: skip
    elif args.val_fraction > 0:
        keep, held = split_indices(len(train_set), args.val_fraction, args.seed)
        train_set, val_set = train_set.subset(keep), train_set.subset(held)
    hflip = spec.hflip if args.hflip is None else args.hflip
    common = {"size": spec.input_size, "mean": spec.mean * (in_chans // len(spec.mean)),
              "std": spec.std * (in_chans // len(spec.std)), "channels": in_chans}  # fmt: skip
    train_set.transform = Preprocess(
        **common, train=True, hflip=hflip, augment=args.augment != "none"
    )
    if val_set is not None:
        val_set.transform = Preprocess(**common, train=False)
    if len(train_set) == 0:
        raise DataError(f"--data {args.data}: no training images")

    drop_last = len(train_set) >= args.batch_size * ctx.world_size
    sampler = DistributedSampler(
        train_set, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True, seed=args.seed,
        drop_last=drop_last,
    )  # fmt: skip
    train_loader = _loader(train_set, args.batch_size, sampler, args.workers, drop_last)
    val_loader = None
    if val_set is not None and len(val_set):
        val_sampler = ShardSampler(len(val_set), ctx.rank, ctx.world_size)
        val_loader = _loader(val_set, args.batch_size, val_sampler, args.workers, False)

    num_classes = len(spec.class_names)
    overrides = {k: v for k, v in overrides.items() if k != "in_chans"}
    try:
        model = ppma_models.create_model(
            args.model, num_classes=num_classes, in_chans=in_chans, attention=args.attention,
            drop_path_rate=args.drop_path, pretrained=args.pretrained, **overrides,
        )  # fmt: skip
    except TypeError as exc:  # unknown config field in --model-arg
        raise DataError(f"--model-arg: {exc}") from exc
    model.to(ctx.device)

    steps_per_epoch = len(train_loader)
    total_steps = args.epochs * steps_per_epoch
    warmup = min(total_steps, round(args.warmup_epochs * steps_per_epoch))
    optimizer = build_adamw(model, lr=args.lr, weight_decay=args.weight_decay)
    schedule = WarmupSchedule(
        optimizer, total_steps, warmup, decay="cosine", min_ratio=args.min_lr_ratio
    )
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)
    eval_criterion = torch.nn.CrossEntropyLoss()

    def train_step(m: torch.nn.Module, batch, device: torch.device):
        x, y = (t.to(device, non_blocking=True) for t in batch)
        logits = m(x).float()
        loss = criterion(logits, y)
        return loss, {
            "loss": loss.detach() * len(y),
            "acc": (logits.argmax(1) == y).sum(),
            "count": len(y),
        }

    meta = {
        "task": "classification",
        "model": args.model,
        "model_config": model.config.to_dict(),
        "num_classes": num_classes,
        "class_names": list(spec.class_names),
        "in_chans": in_chans,
        "input_size": list(spec.input_size),
        "mean": list(common["mean"]),
        "std": list(common["std"]),
        "dataset": spec.name,
        "recipe": {k: getattr(args, k) for k in RECIPE_KEYS},
    }
    config = TrainerConfig(
        out_dir=Path(args.out), epochs=args.epochs, seed=args.seed, grad_clip=args.grad_clip,
        amp=args.amp, ema_decay=args.ema_decay or None, progress=args.progress,
        best_metric="val_acc" if val_loader is not None else "train_acc",
    )  # fmt: skip
    trainer = Trainer(
        model, optimizer, schedule, train_loader, config, train_step=train_step,
        evaluate=_evaluate_fn(val_loader, eval_criterion) if val_loader is not None else None,
        ctx=ctx, meta=meta, export_weights=export_classifier,
    )  # fmt: skip
    if args.resume:
        trainer.resume(args.resume)
    n_params = sum(p.numel() for p in model.parameters())
    console(
        f"training {args.model} ({n_params / 1e6:.2f} M params, attention "
        f"{model.attention}{'' if ppma_ops_native() else ' [reference ops]'}) on {spec.name}: "
        f"{len(train_set)} train / {len(val_set) if val_set is not None else 0} val images, "
        f"{num_classes} classes, input {spec.input_size[0]}x{spec.input_size[1]}x{in_chans}, "
        f"{steps_per_epoch} steps/epoch x {args.epochs} epochs, {ctx.world_size} process(es), "
        f"{torch.get_num_threads()} thread(s) each -> {args.out}",
        is_main=ctx.is_main,
    )
    records = trainer.fit(stop_after_epochs=args.stop_after_epochs)
    if ctx.is_main and records:
        best = trainer.best_metric
        last = records[-1]
        print(
            f"done: {trainer.epoch}/{args.epochs} epochs, {config.best_metric} last "
            f"{last.get(config.best_metric, float('nan')):.4f} best {best:.4f}; weights in "
            f"{Path(args.out) / 'best.safetensors'}",
            file=sys.stdout,
        )
    return 0


def ppma_ops_native() -> bool:
    import ppma_ops

    return bool(ppma_ops.native_available())


def default_workers() -> int:
    return min(4, max(0, (os.cpu_count() or 1) - 1))
