"""``python -m apps.detect train``: the detect app's part of the shared training driver.

:class:`DetectTask` supplies what is task-specific -- data, augmentation, Mask R-CNN and its own
losses (RPN objectness and box, RoI classification, box and mask), COCO AP on the validation
images, the settings rows and ``summary.json`` -- and :func:`apps.engine.driver.run_training`
does the rest: run directory and ``--resume`` with the recorded recipe, AdamW and the lr
schedule, bf16 autocast, gradient clipping, EMA, DDP under ``torchrun``, atomic
``last``/``best`` checkpoints with exact resume, weights that ``ppma_models.load_model``
reads, metrics.jsonl and curves.png.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import ppma_ops
import torch
from torch.utils.data import DataLoader

from apps.detect.data import (
    DetectionSamples,
    SourcePair,
    build_sources,
    collate,
)
from apps.detect.evaluate import evaluate_detection
from apps.detect.metrics import ground_truth
from apps.detect.model import APP, DetectorSpec, build_model, read_run_spec, scene_settings
from apps.detect.settings import choose_batch_size, choose_epochs, choose_warmup
from apps.detect.transforms import TrainAugment
from apps.engine.batching import EpochShuffleSampler
from apps.engine.distributed import DistributedContext
from apps.engine.driver import run_training
from apps.engine.model_args import model_overrides, parse_model_args
from apps.engine.options import OptionError
from apps.engine.progress import console, progress_enabled
from apps.engine.settings import Choice, runtime_rows
from apps.engine.task import TrainingRun
from apps.engine.trainer import EvalFn, StepFn, Trainer

__all__ = ["LOSS_NAMES", "RECIPE_KEYS", "DetectTask", "make_train_step", "run_train"]

#: The losses torchvision's Mask R-CNN returns in training mode; their sum is minimised.
LOSS_NAMES = ("loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg", "loss_mask")

#: The detect options that define a run (beside the shared ones), restored by --resume.
RECIPE_KEYS = (
    "data", "canvas", "min_items", "max_items", "min_size", "max_size", "scene_seed",
    "train_scenes", "val_scenes", "fmnist_dir", "val_fraction", "skip_bad", "backbone",
    "detector_arg", "pretrained", "drop_path", "backbone_lr_scale", "scale_range", "no_flip",
    "eval_every",
)  # fmt: skip


def make_train_step() -> StepFn:
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


def _spec(args: argparse.Namespace, sources: SourcePair) -> DetectorSpec:
    """The detector of the command line: ``--model-arg`` and ``--detector-arg`` checked
    before any weights are built."""
    backbone_args = model_overrides(args.backbone, args.model_arg, model_option="--backbone")
    settings = scene_settings(args.canvas) if args.data == "scenes" else {}
    try:
        settings.update(parse_model_args(args.detector_arg))
    except OptionError as exc:
        raise OptionError(str(exc).replace("--model-arg", "--detector-arg")) from None
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
        raise OptionError(f"--detector-arg: {exc}") from None
    return spec


def _resolve_settings(
    args: argparse.Namespace, sources: SourcePair, world_size: int
) -> tuple[dict[str, Choice], int]:
    """Fill in batch size, epochs and warmup left open (on ``args``); returns the choices and
    the optimizer steps per epoch."""
    # DistributedSampler gives every process ceil(n / world) images; partial batches are
    # dropped, so every step sees a full batch.
    per_process = math.ceil(len(sources.train) / world_size)
    batch = choose_batch_size(args.batch_size, per_process)
    steps = per_process // batch.value
    epochs = choose_epochs(args.epochs, steps)
    warmup = choose_warmup(
        args.warmup_steps, epochs.value * steps, epochs=args.warmup_epochs, steps_per_epoch=steps
    )
    args.batch_size, args.epochs = batch.value, epochs.value
    args.warmup_steps, args.warmup_epochs = warmup.value, None
    return {"batch_size": batch, "epochs": epochs, "warmup": warmup}, steps


def _train_loader(
    args: argparse.Namespace, spec: DetectorSpec, sources: SourcePair, ctx: DistributedContext
) -> DataLoader:
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
        drop_last=True,
    )


def _make_evaluate(
    args: argparse.Namespace, spec: DetectorSpec, sources: SourcePair
) -> EvalFn | None:
    """The Trainer's ``evaluate``: COCO AP on the validation images, or None without any."""
    if sources.val is None:
        return None
    val = sources.val
    gt = ground_truth((val.ground_truth(i) for i in range(len(val))), spec.num_classes)

    def evaluate(module, ctx):
        scores, _ = evaluate_detection(
            module, val, spec.num_classes, ctx=ctx, batch_size=args.batch_size,
            workers=args.workers, progress=progress_enabled(args.progress, ctx.is_main), gt=gt,
        )  # fmt: skip
        return scores.metrics()

    return evaluate


CURVE_PANELS = {
    "loss": ["train_loss"],
    "losses": [f"train_{name.removeprefix('loss_')}" for name in LOSS_NAMES],
    "AP (IoU 0.50:0.95)": ["val_box_ap", "val_mask_ap"],
    "AP50": ["val_box_ap50", "val_mask_ap50"],
}


def _data_summary(sources: SourcePair) -> str:
    desc = sources.description
    if desc["kind"] == "scenes":
        c = desc["scene_config"]
        return (
            f"scenes: {c['canvas']}px canvas, {c['min_items']}-{c['max_items']} garments of "
            f"{c['min_size']}-{c['max_size']}px, seed {desc['scene_seed']}"
        )
    val = desc["val"]
    if "annotations" in val:
        where = f"validation: {val['annotations']}"
    elif val["images"]:
        where = f"validation: {val['fraction']:g} of it held out (seed {val['seed']})"
    else:
        where = "no validation images (best = lowest train loss)"
    return f"COCO {desc['train']}; {where}"


class DetectTask:
    """The detect app's part of ``train`` (see :class:`apps.engine.task.Task`)."""

    name = APP
    recipe_keys = RECIPE_KEYS
    default_out = None
    save_every_s = 0.0
    read_run_spec = staticmethod(read_run_spec)

    def prepare(self, args: argparse.Namespace, ctx: DistributedContext) -> TrainingRun:
        if args.data is None:  # resumed from a run that did not record its recipe
            raise OptionError("train needs --data: the resumed run did not record its data")
        model_overrides(args.backbone, args.model_arg, model_option="--backbone")  # fail early
        sources = build_sources(args)
        choices, steps = _resolve_settings(args, sources, ctx.world_size)
        spec = _spec(args, sources)
        model = build_model(spec, pretrained=args.pretrained)
        loader = _train_loader(args, spec, sources, ctx)
        assert len(loader) == steps  # the settings table counted the same steps
        evaluate = _make_evaluate(args, spec, sources)
        return TrainingRun(
            model=model, train_loader=loader, train_step=make_train_step(), evaluate=evaluate,
            model_spec=spec.to_dict(), data_spec=sources.description, choices=choices,
            # Without validation images the most recent weights are the best.
            best_metric="val_box_ap" if evaluate is not None else "train_loss",
            best_mode="max" if evaluate is not None else "min", curve_panels=CURVE_PANELS,
            lr_scales={"backbone.body.": args.backbone_lr_scale}, eval_every=args.eval_every,
            class_names=list(spec.class_names),
            info={"sources": sources, "steps": steps, "spec": spec},
        )  # fmt: skip

    def settings_rows(
        self, args: argparse.Namespace, run: TrainingRun, ctx: DistributedContext
    ) -> list[tuple[str, object]]:
        sources, steps, spec = run.info["sources"], run.info["steps"], run.info["spec"]
        s = spec.detection_settings()
        names = spec.class_names
        shown = ", ".join(names[:8]) + (f", ... ({len(names) - 8} more)" if len(names) > 8 else "")
        val_count = len(sources.val) if sources.val is not None else 0
        batch = run.choices["batch_size"]
        params = sum(p.numel() for p in run.model.parameters())
        return [
            ("data", _data_summary(sources)),
            ("images", f"{len(sources.train)} train / {val_count} val"),
            ("classes", f"{len(names)}: {shown}"),
            ("model", f"Mask R-CNN + FPN({s.fpn_channels}) on {args.backbone}, "
                      f"{params / 1e6:.2f}M params, attention {ppma_ops.get_backend()}"),
            ("image size", f"{s.min_size}-{s.max_size}, scale jitter {tuple(args.scale_range)}"),
            ("anchors", f"{s.anchor_scale:g} x stride, ratios {list(s.aspect_ratios)}"),
            ("batch size", f"{batch.value} per process ({batch.source})"),
            ("steps", f"{steps} per epoch, {steps * args.epochs} in all"),
            ("epochs", run.choices["epochs"]),
            ("lr", f"{args.lr:g} AdamW, weight decay {args.weight_decay:g}, "
                   f"backbone x{args.backbone_lr_scale:g}"),
            ("warmup steps", run.choices["warmup"]),
            ("schedule", f"linear warmup, then {args.schedule} decay to "
                         f"{args.min_lr_ratio:g} x lr"),
            *runtime_rows(ctx.device, ctx.world_size, torch.get_num_threads(), args.out),
            *(("note", note) for note in sources.notes[:20]),
        ]  # fmt: skip

    def finish(
        self, args: argparse.Namespace, trainer: Trainer, records: list[dict], seconds: float
    ) -> None:
        _write_summary(Path(args.out), trainer, records, seconds)


def _write_summary(out_dir: Path, trainer: Trainer, records: list[dict], elapsed: float) -> None:
    final = records[-1]
    keys = ("val_box_ap", "val_box_ap50", "val_mask_ap", "val_mask_ap50")
    validated = final.get("val_box_ap") is not None
    summary: dict[str, Any] = {
        "epochs": trainer.epoch,
        "wall_seconds": elapsed,
        **{k: final.get(k) for k in keys},
        "best_val_box_ap": trainer.best_metric if validated else None,
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if validated:
        console(
            f"held-out box AP {100 * final['val_box_ap']:.2f}, mask AP "
            f"{100 * final['val_mask_ap']:.2f} ({elapsed / 60:.1f} min)"
        )


def run_train(args: argparse.Namespace) -> int:
    """The ``train`` command."""
    return run_training(DetectTask(), args)
