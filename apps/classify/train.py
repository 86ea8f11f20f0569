"""``train``: fit a PPMA classifier; files land in ``--out`` (see apps.engine.trainer).

Options left at their default (input size, batch size, epochs, warm-up) are resolved from
the data by :mod:`apps.classify.settings`, printed in a settings block before the first
epoch, and stored resolved in the checkpoint's recipe, so ``--resume`` continues the same run.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ppma_models
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
from apps.classify.weights import config_problem, export_classifier
from apps.engine import (
    DistributedContext,
    EpochPlan,
    ShardSampler,
    Trainer,
    TrainerConfig,
    WarmupSchedule,
    build_adamw,
    console,
    init_distributed,
    load_training_state,
    plan_epoch,
    seed_everything,
)
from apps.engine.model_args import parse_model_args as engine_model_args
from apps.engine.model_args import with_stage_count

__all__ = ["RECIPE_KEYS", "build_classifier", "model_overrides", "parse_model_args", "run_train"]

# Arguments that define a run; stored (resolved) in the checkpoint so --resume continues the
# same recipe.
RECIPE_KEYS = (
    "data", "data_dir", "subset", "val_fraction", "input_size", "model", "model_arg", "pretrained",
    "epochs", "batch_size", "lr", "min_lr_ratio", "weight_decay", "warmup_epochs",
    "label_smoothing", "drop_path", "ema_decay", "amp", "grad_clip", "seed", "augment", "hflip",
)  # fmt: skip


# last.* after an epoch only when this many seconds passed since the previous ones (and
# always at the end): on small data writing them takes longer than the epoch itself.
LAST_EVERY_S = 30.0


def parse_model_args(items: list[str] | None) -> dict[str, Any]:
    """``--model-arg`` items as PPMAConfig overrides (see apps.engine.model_args)."""
    try:
        return engine_model_args(items)
    except ValueError as exc:
        raise DataError(str(exc)) from exc


def model_overrides(model: str, items: list[str] | None) -> dict[str, Any]:
    """``--model-arg`` overrides of ``model``'s config, completed for fewer stages and checked.

    Raises DataError naming ``--model-arg`` for an unknown field, a value of the wrong type
    or size (checked as a model file's config is, before any arithmetic on it) or an
    inconsistent config.
    """
    base = get_config(model)
    overrides = with_stage_count(base, parse_model_args(items))
    known = {f.name for f in dataclasses.fields(base)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise DataError(
            f"--model-arg: unknown PPMAConfig field(s) {unknown}; known: {sorted(known)}"
        )
    plain = {k: list(v) if isinstance(v, tuple) else v for k, v in overrides.items()}
    problem = config_problem({**base.to_dict(), **plain})
    if problem is not None:
        raise DataError(f"--model-arg: {problem}")
    return overrides


def _pretrained_stem_channels(path: str) -> int | None:
    """Input channels of the stem kernel in a ``--pretrained`` file (None: no stem in it)."""
    state, _ = read_checkpoint(path)
    if is_upstream_state_dict(state):
        state = convert_from_upstream(state)
    stem = state.get(INPUT_CONV)
    return int(stem.shape[1]) if isinstance(stem, torch.Tensor) and stem.ndim == 4 else None


def _fold_stem_to_grey(model: ppma_models.PPMA, attention: str, source: str) -> ppma_models.PPMA:
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
        model.config.replace(in_chans=1), num_classes=model.num_classes,
        attention=attention, name=model.name,
    )  # fmt: skip
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
        args.model, num_classes=num_classes, in_chans=build_chans, attention=args.attention,
        drop_path_rate=args.drop_path, pretrained=args.pretrained, **overrides,
    )  # fmt: skip
    if model.in_chans != in_chans:
        model = _fold_stem_to_grey(model, args.attention, args.pretrained)
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


def _recipe_from_checkpoint(args: argparse.Namespace) -> argparse.Namespace:
    source = Path(args.resume)
    if source.name == "last.pt" and not source.is_file() and source.with_name("best.pt").is_file():
        source = source.with_name("best.pt")  # a kill in the first save can leave only best.pt
    state = load_training_state(source)
    meta = state.get("meta")
    if not isinstance(meta, dict) or meta.get("task") != "classification":
        raise DataError(f"--resume {args.resume}: not a classification training checkpoint")
    recipe = meta.get("recipe")
    # Only recipe keys may come from the file: a damaged one must not set, say, --out.
    if not isinstance(recipe, dict) or not set(recipe) <= set(RECIPE_KEYS):
        raise DataError(f"--resume {args.resume}: the recorded recipe is damaged")
    for key, value in recipe.items():
        setattr(args, key, value)
    args.resolved_from = meta.get("resolved_from")
    args.legacy_drop_last = bool(meta.get("legacy_drop_last", False))
    if args.resolved_from is None:  # a run from before defaults were resolved
        args.input_size = int(meta["input_size"][0])
        args.resolved_from = dict.fromkeys(_SOURCES, "as in the resumed run")
        args.legacy_drop_last = True  # it dropped every short last batch; keep its steps
    args.out = str(Path(args.resume).parent)
    return args


def run_train(args: argparse.Namespace) -> int:
    if args.resume:
        args = _recipe_from_checkpoint(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    # AdamW's second moments underflow into denormals, which are ~100x slower on x86 CPUs.
    torch.set_flush_denormal(True)
    ctx = init_distributed(args.device)
    try:
        return _train(args, ctx)
    finally:
        ctx.shutdown()


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


_SOURCES = ("input_size", "batch_size", "epochs", "warmup")


def _plan(args: argparse.Namespace, n_images: int, world_size: int) -> EpochPlan:
    plan = plan_epoch(n_images, args.batch_size, world_size)
    if getattr(args, "legacy_drop_last", False) and plan.images >= args.batch_size:
        return EpochPlan(plan.images, plan.batch_size, True, plan.images // args.batch_size)
    return plan


def _resolve(
    args: argparse.Namespace, data: _Data, overrides: dict[str, Any], world_size: int
) -> dict[str, str]:
    """Fill the options left at None from the data; returns where each value came from."""
    if len(data.train) == 0:
        raise DataError(f"--data {args.data}: no training images")
    config = get_config(args.model).replace(
        **{k: v for k, v in overrides.items() if k != "in_chans"}
    )
    stride = rules.model_stride(config.num_stages)
    builtin = data.spec.input_size[0] if data.spec.name in BUILTIN_DATASETS else None
    measured = None
    if args.input_size is None and builtin is None and isinstance(data.train, FolderDataset):
        measured = rules.measure_image_size([path for path, _ in data.train.samples])
    args.input_size, size_from = rules.resolve_input_size(
        args.input_size, builtin_size=builtin, measured=measured, stride=stride,
        pretrained=bool(args.pretrained),
    )  # fmt: skip
    per_process = -(-len(data.train) // world_size)
    args.batch_size, batch_from = rules.resolve_batch_size(args.batch_size, per_process)
    steps = _plan(args, len(data.train), world_size).steps
    args.epochs, epochs_from = rules.resolve_epochs(args.epochs, steps)
    warmup, warmup_from = rules.resolve_warmup(args.warmup_epochs, steps, args.epochs * steps)
    args.warmup_epochs = warmup / steps  # the recipe keeps what was used
    found = dict(zip(_SOURCES, (size_from, batch_from, epochs_from, warmup_from), strict=True))
    resumed = getattr(args, "resolved_from", None) or {}
    return {k: resumed.get(k, v) for k, v in found.items()}


def _set_transforms(args: argparse.Namespace, data: _Data) -> dict[str, Any]:
    spec, in_chans = data.spec, data.in_chans
    spec.input_size = (args.input_size, args.input_size)
    hflip = spec.hflip if args.hflip is None else args.hflip
    common = {"size": spec.input_size, "mean": spec.mean * (in_chans // len(spec.mean)),
              "std": spec.std * (in_chans // len(spec.std)), "channels": in_chans}  # fmt: skip
    data.train.transform = Preprocess(
        **common, train=True, hflip=hflip, augment=args.augment != "none"
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


def _train(args: argparse.Namespace, ctx: DistributedContext) -> int:
    seed_everything(args.seed)
    overrides = model_overrides(args.model, args.model_arg)
    data = _load_data(args, overrides)
    sources = _resolve(args, data, overrides, ctx.world_size)
    common = _set_transforms(args, data)
    plan, train_loader, val_loader = _loaders(args, data, ctx)
    spec, num_classes = data.spec, len(data.spec.class_names)
    model = build_classifier(args, num_classes, data.in_chans, overrides).to(ctx.device)

    total_steps = args.epochs * plan.steps
    warmup = round(args.warmup_epochs * plan.steps)
    optimizer = build_adamw(model, lr=args.lr, weight_decay=args.weight_decay)
    schedule = WarmupSchedule(
        optimizer, total_steps, warmup, decay="cosine", min_ratio=args.min_lr_ratio
    )
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)

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
        "task": "classification", "model": args.model, "model_config": model.config.to_dict(),
        "num_classes": num_classes, "class_names": list(spec.class_names),
        "in_chans": data.in_chans, "input_size": list(spec.input_size),
        "mean": list(common["mean"]), "std": list(common["std"]), "dataset": spec.name,
        "recipe": {k: getattr(args, k) for k in RECIPE_KEYS}, "resolved_from": sources,
        "legacy_drop_last": getattr(args, "legacy_drop_last", False),
    }  # fmt: skip
    config = TrainerConfig(
        out_dir=Path(args.out), epochs=args.epochs, seed=args.seed, grad_clip=args.grad_clip,
        amp=args.amp, ema_decay=args.ema_decay or None, progress=args.progress,
        best_metric="val_acc" if val_loader is not None else "train_acc",
        last_every_s=LAST_EVERY_S,
    )  # fmt: skip
    evaluate = _evaluate_fn(val_loader, torch.nn.CrossEntropyLoss()) if val_loader else None
    trainer = Trainer(
        model, optimizer, schedule, train_loader, config, train_step=train_step,
        evaluate=evaluate, ctx=ctx, meta=meta, export_weights=export_classifier,
    )  # fmt: skip
    if args.resume:
        trainer.resume(args.resume)
    console(_settings_text(args, data, plan, sources, model, ctx), is_main=ctx.is_main)
    records = trainer.fit(stop_after_epochs=args.stop_after_epochs)
    if ctx.is_main and records:
        _print_done(trainer, records, config.best_metric, args)
    return 0


def _settings_text(
    args: argparse.Namespace, data: _Data, plan: EpochPlan, sources: dict[str, str],
    model: torch.nn.Module, ctx: DistributedContext,
) -> str:  # fmt: skip
    n_params = sum(p.numel() for p in model.parameters())
    model_name = args.model + (" with --model-arg changes" if args.model_arg else "")
    native = "" if ppma_ops_native() else " [reference ops: native kernels not built]"
    settings = rules.RunSettings(
        data=data.spec.name, split_counts=data.counts(), classes=len(data.spec.class_names),
        model=f"{model_name}, {n_params / 1e6:.2f} M params, attention {model.attention}{native}",
        input_size=args.input_size, in_chans=data.in_chans, input_source=sources["input_size"],
        plan=plan, batch_source=sources["batch_size"], epochs=args.epochs,
        epochs_source=sources["epochs"], lr=args.lr, min_lr=args.lr * args.min_lr_ratio,
        weight_decay=args.weight_decay, label_smoothing=args.label_smoothing,
        warmup=round(args.warmup_epochs * plan.steps), warmup_source=sources["warmup"],
        device=str(ctx.device), processes=ctx.world_size, threads=torch.get_num_threads(),
        out=str(args.out),
    )  # fmt: skip
    return rules.format_settings(settings)


def _print_done(
    trainer: Trainer, records: list[dict], best_metric: str, args: argparse.Namespace
) -> None:
    last = records[-1]
    print(
        f"done: {trainer.epoch}/{args.epochs} epochs, {best_metric} last "
        f"{last.get(best_metric, float('nan')):.4f} best {trainer.best_metric:.4f}; weights in "
        f"{Path(args.out) / 'best.safetensors'}",
        file=sys.stdout,
    )


def ppma_ops_native() -> bool:
    import ppma_ops

    return bool(ppma_ops.native_available())


def default_workers() -> int:
    return min(4, max(0, (os.cpu_count() or 1) - 1))
