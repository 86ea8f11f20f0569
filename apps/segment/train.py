"""``python -m apps.segment train``: the segment app's part of the shared training driver.

:class:`SegmentTask` supplies what is task-specific -- data, augmentation, the UPerNet model,
the loss (cross-entropy with an ignore index plus the auxiliary head's loss), validation mIoU,
the settings rows and ``summary.json`` -- and :func:`apps.engine.driver.run_training` does the
rest: run directory and ``--resume`` with the recorded recipe, AdamW and the lr schedule, bf16
autocast, gradient clipping, EMA, DDP under ``torchrun``, atomic ``last``/``best`` checkpoints
with exact resume, metrics.jsonl and curves.png.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import ppma_ops
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from apps.engine.batching import EpochShuffleSampler
from apps.engine.distributed import DistributedContext
from apps.engine.driver import run_training
from apps.engine.model_args import model_overrides
from apps.engine.options import OptionError
from apps.engine.progress import console, progress_enabled
from apps.engine.settings import Choice, runtime_rows
from apps.engine.task import TrainingRun
from apps.engine.trainer import Trainer
from apps.segment.data import SegmentationSamples, SourcePair, build_sources
from apps.segment.evaluate import evaluate_segmentation
from apps.segment.metrics import correct_pixels
from apps.segment.model import APP, ModelSpec, build_model, count_parameters, read_run_spec
from apps.segment.settings import choose_batch_size, choose_crop, choose_epochs, choose_warmup
from apps.segment.transforms import TrainAugment

__all__ = ["RECIPE_KEYS", "SegmentTask", "make_train_step", "run_train"]

#: The segment options that define a run (beside the shared ones), restored by --resume.
RECIPE_KEYS = (
    "data", "canvas", "min_items", "max_items", "min_size", "max_size", "scene_seed",
    "train_scenes", "val_scenes", "fmnist_dir", "val_data", "val_fraction", "num_classes",
    "ignore_index", "skip_bad", "backbone", "pretrained", "channels", "aux_channels",
    "aux_weight", "drop_path", "fuse_kernel", "head_dropout", "backbone_lr_scale", "crop",
    "scale_range", "no_flip", "eval_every", "eval_flip", "eval_scales", "eval_mode", "window",
    "stride",
)  # fmt: skip


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


def _check_autocast(model: torch.nn.Module, device: torch.device) -> None:
    """Fail before training, with a clear message, if the model cannot run under bf16."""
    model.eval()
    try:
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
            model.to(device)(torch.zeros(2, 3, 32, 32, device=device))
    except (TypeError, RuntimeError) as exc:
        raise OptionError(
            f"--amp: the model does not run under bf16 autocast with --attention "
            f"{ppma_ops.get_backend()} ({exc}); try --attention reference or leave out --amp"
        ) from exc
    finally:
        model.train()


def _resolve_settings(
    args: argparse.Namespace, sources: SourcePair, world_size: int
) -> tuple[dict[str, Choice], int]:
    """Fill in crop, batch size, epochs and warmup left open (on ``args``); returns the
    choices and the optimizer steps per epoch."""
    canvas = args.canvas if args.data == "scenes" else None
    crop = choose_crop(args.crop, sources.train_sizes, canvas)
    # DistributedSampler gives every process ceil(n / world) images; partial batches are
    # dropped (a batch of one cannot train BatchNorm).
    per_process = math.ceil(len(sources.train) / world_size)
    batch = choose_batch_size(args.batch_size, per_process)
    steps = per_process // batch.value
    epochs = choose_epochs(args.epochs, steps)
    warmup = choose_warmup(
        args.warmup_steps, epochs.value * steps, epochs=args.warmup_epochs, steps_per_epoch=steps
    )
    args.crop, args.batch_size, args.epochs = crop.value, batch.value, epochs.value
    args.warmup_steps, args.warmup_epochs = warmup.value, None
    return {"crop": crop, "batch_size": batch, "epochs": epochs, "warmup": warmup}, steps


def _data_summary(sources: SourcePair) -> str:
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


def _model_spec(args: argparse.Namespace, sources: SourcePair, overrides: dict) -> ModelSpec:
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
        backbone_args=overrides,
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
            module, val_set, num_classes=spec.num_classes, ignore_index=spec.ignore_index,
            ctx=ctx, mode=args.eval_mode, flip=args.eval_flip, scales=args.eval_scales,
            window=window, stride=stride, batch_size=batch, workers=args.workers,
            progress=progress_enabled(args.progress, ctx.is_main),
        )  # fmt: skip
        return result.metrics()

    return evaluate


CURVE_PANELS = {
    "loss": ["train_loss", "val_loss"],
    "mIoU": ["val_miou"],
    "pixel accuracy": ["train_pixel_acc", "val_pixel_acc"],
}


class SegmentTask:
    """The segment app's part of ``train`` (see :class:`apps.engine.task.Task`)."""

    name = APP
    recipe_keys = RECIPE_KEYS
    default_out = None
    save_every_s = 0.0
    read_run_spec = staticmethod(read_run_spec)

    def prepare(self, args: argparse.Namespace, ctx: DistributedContext) -> TrainingRun:
        if args.data is None:  # resumed from a run that did not record its recipe
            raise OptionError("train needs --data: the resumed run did not record its data")
        overrides = model_overrides(args.backbone, args.model_arg, model_option="--backbone")
        sources = build_sources(args)
        choices, steps = _resolve_settings(args, sources, ctx.world_size)
        spec = _model_spec(args, sources, overrides)
        model = build_model(spec, pretrained=args.pretrained)
        if args.amp:
            _check_autocast(model, ctx.device)
        loader = _train_loader(args, sources, ctx)
        assert len(loader) == steps  # the settings report counted the same steps
        evaluate = _make_evaluate(args, spec, sources)
        return TrainingRun(
            model=model, train_loader=loader,
            train_step=make_train_step(args.aux_weight, spec.ignore_index), evaluate=evaluate,
            model_spec=spec.to_dict(), data_spec=sources.description, choices=choices,
            # Without validation images the most recent weights are the best.
            best_metric="val_miou" if evaluate is not None else "train_loss",
            best_mode="max" if evaluate is not None else "min", curve_panels=CURVE_PANELS,
            lr_scales={"backbone.": args.backbone_lr_scale}, eval_every=args.eval_every,
            class_names=list(spec.class_names), info={"sources": sources, "steps": steps},
        )  # fmt: skip

    def settings_rows(
        self, args: argparse.Namespace, run: TrainingRun, ctx: DistributedContext
    ) -> list[tuple[str, object]]:
        sources, steps = run.info["sources"], run.info["steps"]
        names = sources.class_names
        shown = ", ".join(names[:8]) + (f", ... ({len(names) - 8} more)" if len(names) > 8 else "")
        val_count = len(sources.val) if sources.val is not None else 0
        decay = f"poly (power {args.poly_power:g})" if args.schedule == "poly" else args.schedule
        batch, params = run.choices["batch_size"], count_parameters(run.model)
        return [
            ("data", _data_summary(sources)),
            ("images", f"{len(sources.train)} train / {val_count} val"),
            ("classes", f"{len(names)}: {shown}"),
            ("model", f"{args.backbone} + UPerNet({args.channels}), {params / 1e6:.2f}M params, "
                      f"attention {ppma_ops.get_backend()}"),
            ("crop", run.choices["crop"]),
            ("batch size", f"{batch.value} per process ({batch.source})"),
            ("steps", f"{steps} per epoch, {steps * args.epochs} in all"),
            ("epochs", run.choices["epochs"]),
            ("lr", f"{args.lr:g} AdamW, weight decay {args.weight_decay:g}, "
                   f"backbone x{args.backbone_lr_scale:g}"),
            ("warmup steps", run.choices["warmup"]),
            ("schedule", f"linear warmup, then {decay} decay to {args.min_lr_ratio:g} x lr"),
            *runtime_rows(ctx.device, ctx.world_size, torch.get_num_threads(), args.out),
            *(("note", note) for note in sources.notes),
        ]  # fmt: skip

    def finish(
        self, args: argparse.Namespace, trainer: Trainer, records: list[dict], seconds: float
    ) -> None:
        _write_summary(Path(args.out), trainer, records, seconds)


def _write_summary(out_dir: Path, trainer: Trainer, records: list[dict], elapsed: float) -> None:
    final = records[-1]
    validated = final.get("val_miou") is not None
    summary: dict[str, Any] = {
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


def run_train(args: argparse.Namespace) -> int:
    """The ``train`` command."""
    return run_training(SegmentTask(), args)
