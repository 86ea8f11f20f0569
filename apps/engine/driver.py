"""The ``train`` command of every app, written once: run directory and ``--resume`` -> data ->
model -> optimizer and schedule -> :class:`~apps.engine.trainer.Trainer` -> fit -> summary.

The app supplies a :class:`~apps.engine.task.Task`; everything here reads only the shared
options of :mod:`apps.engine.options` from ``args``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from ppma_models import CheckpointError

from apps.engine.checkpoint import load_training_state
from apps.engine.distributed import DistributedContext, init_distributed
from apps.engine.optimizer import build_adamw
from apps.engine.options import SHARED_RECIPE_KEYS, OptionError, out_problem
from apps.engine.precision import resolve_amp
from apps.engine.progress import console
from apps.engine.runspec import RunSpec
from apps.engine.schedule import WarmupSchedule
from apps.engine.seeding import seed_everything
from apps.engine.settings import format_settings, keep_recorded
from apps.engine.task import Task, TrainingRun
from apps.engine.trainer import Trainer, TrainerConfig
from apps.engine.weights import weights_exporter

__all__ = ["recipe_keys", "resume_checkpoint", "restore_recipe", "run_training"]


def recipe_keys(task: Task) -> tuple[str, ...]:
    """Every option that defines a run of ``task``: the shared ones and the app's."""
    return SHARED_RECIPE_KEYS + tuple(k for k in task.recipe_keys if k not in SHARED_RECIPE_KEYS)


def resume_checkpoint(args: argparse.Namespace, default_out: str | None) -> Path | None:
    """Settle ``args.out``; return the training state ``--resume`` names (None: a new run).

    ``--resume PATH`` continues in the folder of PATH, ``--resume auto`` from ``OUT/last.pt``.
    """
    if args.resume is None or args.resume == "auto":
        args.out = args.out or default_out
        if args.out is None:
            needs = "--resume auto needs" if args.resume else "train needs"
            raise OptionError(f"{needs} --out, the run directory")
        problem = out_problem(args.out)
        if problem is not None:
            raise OptionError(problem)
        return None if args.resume is None else Path(args.out) / "last.pt"
    path = Path(args.resume)
    if args.out is not None and Path(args.out).resolve() != path.parent.resolve():
        raise OptionError(
            f"--out {args.out}: --resume {args.resume} continues its run in {path.parent}; "
            "leave --out out"
        )
    args.out = str(path.parent)
    return path


def restore_recipe(task: Task, args: argparse.Namespace, checkpoint: Path) -> RunSpec:
    """Set ``args`` to the recipe recorded in ``checkpoint`` (or in the ``best.pt`` beside a
    ``last.pt`` that a kill in the first save never wrote); returns the run spec."""
    source = checkpoint
    if source.name == "last.pt" and not source.is_file() and source.with_name("best.pt").is_file():
        source = source.with_name("best.pt")
    spec = task.read_run_spec(load_training_state(source).get("meta"), source)
    if spec.app != task.name:
        raise CheckpointError(f"--resume {args.resume}: a {spec.app} run, not a {task.name} one")
    if spec.recipe is None:  # recorded before runs kept their recipe: the command line stands
        return spec
    # Only recipe keys may come from the file: a damaged one must not set, say, --out.
    if not set(spec.recipe) <= set(recipe_keys(task)):
        raise CheckpointError(f"--resume {args.resume}: the recorded recipe is damaged")
    for key, value in spec.recipe.items():
        given = getattr(args, key, None)
        if key in getattr(args, "given", ()) and _plain(given) != _plain(value):
            console(
                f"warning: --{key.replace('_', '-')} {_shown(given)} is not used: a resumed run "
                f"keeps the value of its recipe ({_shown(value)})"
            )
        setattr(args, key, value)
    return spec


def _plain(value: object) -> object:
    """Tuples and lists alike (the recipe comes back from the file with either)."""
    return list(value) if isinstance(value, tuple | list) else value


def _shown(value: object) -> str:
    return " ".join(map(str, value)) if isinstance(value, tuple | list) else str(value)


def run_training(task: Task, args: argparse.Namespace) -> int:
    """``train`` as the parsed command line (and a resumed run's recipe) says."""
    checkpoint = resume_checkpoint(args, task.default_out)
    recorded = restore_recipe(task, args, checkpoint).sources if checkpoint else None
    # AdamW's second moments underflow into denormals, which are ~100x slower on x86 CPUs.
    torch.set_flush_denormal(True)
    ctx = init_distributed(args.device)
    try:
        return _train(task, args, ctx, checkpoint, recorded)
    finally:
        ctx.shutdown()


def _train(
    task: Task,
    args: argparse.Namespace,
    ctx: DistributedContext,
    checkpoint: Path | None,
    recorded: dict[str, str] | None,
) -> int:
    start = time.perf_counter()
    seed_everything(args.seed)  # identical initial weights on every process
    run = task.prepare(args, ctx)
    run.choices = keep_recorded(run.choices, recorded)
    trainer = _trainer(task, args, run, ctx)
    if checkpoint is not None:
        trainer.resume(checkpoint)
    rows = task.settings_rows(args, run, ctx)
    console(format_settings(rows), is_main=ctx.is_main)
    records = trainer.fit(stop_after_epochs=args.stop_after_epochs)
    if ctx.is_main and records:
        task.finish(args, trainer, records, time.perf_counter() - start)
    return 0


def _trainer(
    task: Task, args: argparse.Namespace, run: TrainingRun, ctx: DistributedContext
) -> Trainer:
    optimizer = build_adamw(
        run.model, lr=args.lr, weight_decay=args.weight_decay, lr_scales=run.lr_scales
    )
    schedule = WarmupSchedule(
        optimizer,
        total_steps=args.epochs * len(run.train_loader),
        warmup_steps=args.warmup_steps,
        decay=args.schedule,
        power=args.poly_power,
        min_ratio=args.min_lr_ratio,
    )
    spec = RunSpec(
        app=task.name,
        model=run.model_spec,
        data=run.data_spec,
        recipe={key: getattr(args, key, None) for key in recipe_keys(task)},
        sources={name: choice.source for name, choice in run.choices.items()},
    )
    amp, amp_note = resolve_amp(args.amp, ctx.device)
    if args.amp:
        console(amp_note, is_main=ctx.is_main)
    config = TrainerConfig(
        out_dir=Path(args.out),
        epochs=args.epochs,
        seed=args.seed,
        grad_clip=args.grad_clip or None,
        amp=amp,
        ema_decay=args.ema_decay or None,
        progress=args.progress,
        best_metric=run.best_metric,
        best_mode=run.best_mode,
        eval_every=run.eval_every,
        last_every_s=task.save_every_s,
    )
    if run.curve_panels is not None:
        config.curve_panels = run.curve_panels
    return Trainer(
        run.model, optimizer, schedule, run.train_loader, config,
        train_step=run.train_step, evaluate=run.evaluate, ctx=ctx, meta=spec.to_meta(),
        export_weights=weights_exporter(task.name, run.class_names),
    )  # fmt: skip
