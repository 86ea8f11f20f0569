"""``train``: the classifier's part of the shared training driver (:mod:`apps.engine.driver`).

:class:`ClassifyTask` supplies the data (train and val images, with transforms), the options
resolved from it (input size, batch size, epochs, warm-up; :mod:`apps.classify.settings`),
the model, the cross-entropy step, the val accuracy, the settings rows and the summary line;
the driver does the rest and stores the resolved recipe with every checkpoint, so ``--resume``
continues the same run.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ppma_models
import ppma_ops
import torch
from ppma_models.checkpoint import INPUT_CONV, read_checkpoint
from ppma_models.convert import convert_from_upstream, is_upstream_state_dict
from ppma_models.registry import get_config
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from apps.classify import settings as rules
from apps.classify.datasets import (
    BUILTIN_DATASETS,
    DataError,
    DatasetSpec,
    FolderDataset,
    collate_skipping_failed,
    load_split,
    split_indices,
)
from apps.classify.transforms import Preprocess
from apps.classify.weights import APP, read_run_spec
from apps.engine.batching import EpochPlan, plan_epoch
from apps.engine.distributed import DistributedContext, ShardSampler
from apps.engine.driver import run_training
from apps.engine.model_args import model_overrides
from apps.engine.settings import Choice, runtime_rows
from apps.engine.task import TrainingRun
from apps.engine.trainer import Trainer

__all__ = ["RECIPE_KEYS", "ClassifyTask", "build_classifier", "run_train"]

#: The classifier's options that define a run (beside the shared ones); ``legacy_drop_last``
#: marks runs from before every image was used each epoch.
RECIPE_KEYS = (
    "data", "data_dir", "subset", "val_fraction", "input_size", "model", "pretrained",
    "label_smoothing", "drop_path", "augment", "hflip", "legacy_drop_last",
)  # fmt: skip

# last.* after an epoch only when this many seconds passed since the previous ones (and
# always at the end): on small data writing them takes longer than the epoch itself.
LAST_EVERY_S = 30.0


def _pretrained_stem_channels(path: str) -> int | None:
    """Input channels of the stem kernel in a ``--pretrained`` file (None: no stem in it)."""
    state, _ = read_checkpoint(path)
    if is_upstream_state_dict(state):
        state = convert_from_upstream(state)
    stem = state.get(INPUT_CONV)
    return int(stem.shape[1]) if isinstance(stem, torch.Tensor) and stem.ndim == 4 else None


def _fold_stem_to_grey(model: ppma_models.PPMA, source: str) -> ppma_models.PPMA:
    """``model`` for one input channel: its stem kernel summed over the colour channels.

    A grey image fed as identical R, G and B planes gives the colour kernel's response of
    the summed kernel on the grey plane, so the fine-tuning starts from exactly the
    pretrained function while the model (and its files) take the data's single channel.
    """
    if model.in_chans != 3:
        raise DataError(
            f"--pretrained {source}: its stem takes {model.in_chans} channels; only a 3-channel "
            "(RGB) or 1-channel stem can be fitted to greyscale data"
        )
    grey = ppma_models.PPMA(
        model.config.replace(in_chans=1), num_classes=model.num_classes, name=model.name
    )
    state = model.state_dict()
    state[INPUT_CONV] = state[INPUT_CONV].sum(dim=1, keepdim=True)
    grey.load_state_dict(state)
    return grey


def build_classifier(
    args: argparse.Namespace, num_classes: int, in_chans: int, overrides: dict[str, Any]
) -> torch.nn.Module:
    """The model ``train`` fits, from ``--model``, ``--model-arg`` and friends.

    It takes ``in_chans`` channels whatever ``--pretrained`` was trained on: a one-channel
    stem is spread over RGB by the library, an RGB stem is folded for grey data here.
    """
    overrides = {k: v for k, v in overrides.items() if k != "in_chans"}
    build_chans = in_chans
    if args.pretrained and in_chans == 1:
        build_chans = _pretrained_stem_channels(args.pretrained) or in_chans
    model = ppma_models.create_model(
        args.model, num_classes=num_classes, in_chans=build_chans,
        drop_path_rate=args.drop_path, pretrained=args.pretrained, **overrides,
    )  # fmt: skip
    if model.in_chans != in_chans:
        model = _fold_stem_to_grey(model, args.pretrained)
    return model


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


def _train_step(criterion: torch.nn.Module):
    def train_step(model: torch.nn.Module, batch, device: torch.device):
        x, y = (t.to(device, non_blocking=True) for t in batch)
        logits = model(x).float()
        loss = criterion(logits, y)
        return loss, {
            "loss": loss.detach() * len(y),
            "acc": (logits.argmax(1) == y).sum(),
            "count": len(y),
        }

    return train_step


@dataclass
class _Data:
    train: Dataset
    val: Dataset | None
    spec: DatasetSpec
    in_chans: int
    val_source: str  # where the val images come from, for the settings block

    def counts(self) -> str:
        if self.val is None:
            return f"{len(self.train)} train images, no val (best = last epoch)"
        return f"{len(self.train)} train / {len(self.val)} val images (val: {self.val_source})"


def _load_data(args: argparse.Namespace, overrides: dict[str, Any]) -> _Data:
    """Train and val images (no transforms yet); val is never the test split."""
    # The data's own channels even with --pretrained: build_classifier fits the stem to them.
    channels = overrides.get("in_chans", None)
    train_set, spec = load_split(args.data, "train", data_dir=args.data_dir, channels=channels or 3)
    in_chans = channels or spec.in_chans
    if args.subset is not None and args.subset < len(train_set):
        _, chosen = split_indices(len(train_set), args.subset / len(train_set), args.seed + 1)
        train_set = train_set.subset(chosen)
    folder_val = Path(args.data) / "val"
    if spec.name not in BUILTIN_DATASETS and folder_val.is_dir():
        val_set, _ = load_split(args.data, "val", channels=in_chans, class_names=spec.class_names)
        return _Data(train_set, val_set, spec, in_chans, str(folder_val))
    if args.val_fraction > 0:
        keep, held = split_indices(len(train_set), args.val_fraction, args.seed)
        source = f"{args.val_fraction:.0%} of the training images, seed {args.seed}"
        return _Data(train_set.subset(keep), train_set.subset(held), spec, in_chans, source)
    return _Data(train_set, None, spec, in_chans, "")


def _plan(args: argparse.Namespace, n_images: int, world_size: int) -> EpochPlan:
    plan = plan_epoch(n_images, args.batch_size, world_size)
    if getattr(args, "legacy_drop_last", False) and plan.images >= args.batch_size:
        return EpochPlan(plan.images, plan.batch_size, True, plan.images // args.batch_size)
    return plan


def _resolve(
    args: argparse.Namespace, data: _Data, overrides: dict[str, Any], world_size: int
) -> dict[str, Choice]:
    """Fill the options left at None from the data (on ``args``); returns the choices."""
    if len(data.train) == 0:
        raise DataError(f"--data {args.data}: no training images")
    config = get_config(args.model).replace(
        **{k: v for k, v in overrides.items() if k != "in_chans"}
    )
    builtin = data.spec.input_size[0] if data.spec.name in BUILTIN_DATASETS else None
    measured = None
    if args.input_size is None and builtin is None and isinstance(data.train, FolderDataset):
        measured = rules.measure_image_size([path for path, _ in data.train.samples])
    size = rules.resolve_input_size(
        args.input_size, builtin_size=builtin, measured=measured,
        stride=rules.model_stride(config), pretrained=bool(args.pretrained),
    )  # fmt: skip
    batch = rules.resolve_batch_size(args.batch_size, -(-len(data.train) // world_size))
    args.input_size, args.batch_size = size.value, batch.value
    steps = _plan(args, len(data.train), world_size).steps
    epochs = rules.resolve_epochs(args.epochs, steps)
    total = epochs.value * steps
    warmup = rules.resolve_warmup(args.warmup_epochs, steps, total, args.warmup_steps)
    args.epochs, args.warmup_steps, args.warmup_epochs = epochs.value, warmup.value, None
    return {"input_size": size, "batch_size": batch, "epochs": epochs, "warmup": warmup}


def _set_transforms(args: argparse.Namespace, data: _Data) -> dict[str, Any]:
    spec, in_chans = data.spec, data.in_chans
    spec.input_size = (args.input_size, args.input_size)
    hflip = (spec.hflip if args.hflip is None else args.hflip) and args.augment != "none"
    common = {"size": spec.input_size, "mean": spec.mean * (in_chans // len(spec.mean)),
              "std": spec.std * (in_chans // len(spec.std)), "channels": in_chans}  # fmt: skip
    data.train.transform = Preprocess(
        **common, train=True, hflip=hflip, crop=args.augment == "auto"
    )
    if data.val is not None:
        data.val.transform = Preprocess(**common, train=False)
    return common


def _loaders(args: argparse.Namespace, data: _Data, ctx: DistributedContext):
    # No drop_last in the sampler: it pads with repeats instead, so every image is seen.
    plan = _plan(args, len(data.train), ctx.world_size)
    sampler = DistributedSampler(
        data.train, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True, seed=args.seed
    )
    train_loader = _loader(data.train, args.batch_size, sampler, args.workers, plan.drop_last)
    val_loader = None
    if data.val is not None and len(data.val):
        val_sampler = ShardSampler(len(data.val), ctx.rank, ctx.world_size)
        val_loader = _loader(data.val, args.batch_size, val_sampler, args.workers, False)
    return plan, train_loader, val_loader


def _model_spec(args: argparse.Namespace, data: _Data, model, common: Mapping) -> dict:
    """The run spec's model description: what eval and predict need to rebuild and feed it."""
    return {
        "model": args.model, "model_config": model.config.to_dict(),
        "num_classes": len(data.spec.class_names), "class_names": list(data.spec.class_names),
        "in_chans": data.in_chans, "input_size": list(data.spec.input_size),
        "mean": list(common["mean"]), "std": list(common["std"]),
    }  # fmt: skip


class ClassifyTask:
    """The classifier's part of ``train`` (see :class:`apps.engine.task.Task`)."""

    name = APP
    recipe_keys = RECIPE_KEYS
    default_out = "runs/classify"
    save_every_s = LAST_EVERY_S
    read_run_spec = staticmethod(read_run_spec)

    def prepare(self, args: argparse.Namespace, ctx: DistributedContext) -> TrainingRun:
        overrides = model_overrides(args.model, args.model_arg)
        data = _load_data(args, overrides)
        choices = _resolve(args, data, overrides, ctx.world_size)
        common = _set_transforms(args, data)
        plan, train_loader, val_loader = _loaders(args, data, ctx)
        num_classes = len(data.spec.class_names)
        model = build_classifier(args, num_classes, data.in_chans, overrides).to(ctx.device)
        criterion = torch.nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)
        evaluate = _evaluate_fn(val_loader, torch.nn.CrossEntropyLoss()) if val_loader else None
        return TrainingRun(
            model=model, train_loader=train_loader, train_step=_train_step(criterion),
            evaluate=evaluate, model_spec=_model_spec(args, data, model, common),
            data_spec={"dataset": data.spec.name}, choices=choices,
            best_metric="val_acc" if evaluate is not None else "train_acc",
            class_names=list(data.spec.class_names), info={"data": data, "plan": plan},
        )  # fmt: skip

    def settings_rows(
        self, args: argparse.Namespace, run: TrainingRun, ctx: DistributedContext
    ) -> list[tuple[str, object]]:
        data, plan = run.info["data"], run.info["plan"]
        params = sum(p.numel() for p in run.model.parameters())
        name = args.model + (" with --model-arg changes" if args.model_arg else "")
        native = "" if ppma_ops.native_available() else " [reference ops: native kernels not built]"
        total = args.epochs * plan.steps
        warmup = run.choices["warmup"]
        steps = f"{warmup.value} step" + ("" if warmup.value == 1 else "s")
        decay = "cosine" if args.schedule == "cosine" else f"poly (power {args.poly_power:g})"
        return [
            ("data", f"{data.spec.name}: {data.counts()}, {len(data.spec.class_names)} classes"),
            ("model", f"{name}, {params / 1e6:.2f} M params, attention {ppma_ops.get_backend()}"
                      f"{native}"),
            ("input", f"{args.input_size}x{args.input_size}x{data.in_chans} "
                      f"({run.choices['input_size'].source})"),
            ("batch", f"{plan.batch_size} per process ({run.choices['batch_size'].source}); "
                      f"{rules.plan_text(plan)}"),
            ("epochs", f"{args.epochs} ({run.choices['epochs'].source}) = {total} steps"),
            ("optimizer", f"AdamW peak lr {args.lr:g}, weight decay {args.weight_decay:g}, "
                          f"label smoothing {args.label_smoothing:g}"),
            ("schedule", f"linear warm-up {steps} ({warmup.source}), then {decay} to "
                         f"{args.lr * args.min_lr_ratio:.2g} at step {total}"),
            *runtime_rows(ctx.device, ctx.world_size, torch.get_num_threads(), args.out),
        ]  # fmt: skip

    def finish(
        self, args: argparse.Namespace, trainer: Trainer, records: list[dict], seconds: float
    ) -> None:
        metric, last = trainer.config.best_metric, records[-1]
        print(
            f"done: {trainer.epoch}/{args.epochs} epochs, {metric} last "
            f"{last.get(metric, float('nan')):.4f} best {trainer.best_metric:.4f}; weights in "
            f"{Path(args.out) / 'best.safetensors'} ({seconds / 60:.1f} min)"
        )


def run_train(args: argparse.Namespace) -> int:
    """The ``train`` command."""
    return run_training(ClassifyTask(), args)
