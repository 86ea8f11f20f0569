"""The epoch loop shared by the apps: AMP, clipping, EMA, DDP, metrics, atomic checkpoints.

The app supplies what is task-specific as two callables:

- ``train_step(model, batch, device) -> (loss, sums)``: forward pass and loss for one batch
  (called under autocast when AMP is on). ``loss`` is the scalar to back-propagate; ``sums``
  holds per-batch *sums* of whatever should be reported, plus ``"count"`` (images or pixels).
  The epoch record gets ``train_<key> = sum over epoch and ranks / count`` for each other key.
- ``evaluate(model, ctx) -> dict[str, float]``: metrics on held-out data, already reduced
  over ranks (use :class:`~apps.engine.distributed.ShardSampler` + ``ctx.reduce_sums``);
  recorded as ``val_<key>``. It receives the EMA model when EMA is on.

Each epoch's record (a line of metrics.jsonl) also holds ``lr_start`` and ``lr_end``, the lr
of the epoch's first and last optimizer step (logs written before had ``lr``, the first
step's), ``step``, timings and ``is_best``.

Randomness of each epoch is re-derived from ``(seed, epoch, rank)`` and the data sampler's
``set_epoch``, and checkpoints are taken at epoch boundaries, so ``--resume`` reproduces an
uninterrupted run exactly (same weights, given deterministic kernels).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from apps.engine.checkpoint import (
    TRAINING_STATE_FORMAT,
    CheckpointError,
    load_training_state,
    save_training_state,
    save_weights,
)
from apps.engine.distributed import DistributedContext, unwrap_model, wrap_model
from apps.engine.ema import ModelEMA
from apps.engine.metrics_log import MetricsLog
from apps.engine.plots import plot_curves
from apps.engine.progress import console, progress_bar, progress_enabled
from apps.engine.schedule import WarmupSchedule
from apps.engine.seeding import capture_rng_state, restore_rng_state, seed_everything, seed_for

__all__ = [
    "EvalFn",
    "ExportFn",
    "StepFn",
    "export_safetensors",
    "Trainer",
    "TrainerConfig",
    "TrainingDiverged",
]

StepFn = Callable[[torch.nn.Module, Any, torch.device], tuple[torch.Tensor, Mapping[str, Any]]]
EvalFn = Callable[[torch.nn.Module, DistributedContext], Mapping[str, float]]
#: (inference module, destination path, meta) -> None; must write atomically.
ExportFn = Callable[[torch.nn.Module, Path, Mapping[str, Any]], None]


def export_safetensors(module: torch.nn.Module, path: Path, meta: Mapping[str, Any]) -> None:
    """Default weight export: :func:`~apps.engine.checkpoint.save_weights` (JSON meta)."""
    save_weights(module.state_dict(), path, meta)


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


@dataclass
class TrainerConfig:
    """Loop settings. Files go to ``out_dir``: last.pt, best.pt, last/best.safetensors,
    metrics.jsonl, curves.png."""

    out_dir: Path
    epochs: int
    seed: int = 0
    grad_clip: float | None = None
    amp: bool = False  # bf16 autocast (CPU and CUDA)
    ema_decay: float | None = None
    progress: bool | None = None  # None: auto (stderr is a terminal)
    best_metric: str = "val_acc"
    best_mode: Literal["max", "min"] = "max"
    eval_every: int = 1
    # curves.png is redrawn when this many seconds have passed since it was last drawn, and
    # after the last epoch of fit: drawing takes ~0.5 s, longer than an epoch of small data.
    curves_every_s: float = 30.0
    # last.pt / last.safetensors are rewritten when this many seconds have passed since they
    # were written, and after the last epoch of fit; 0 = after every epoch. Writing them costs
    # ~0.2 s, which can be half an epoch of a small data set; a crash loses at most this much
    # training. best.* are written whenever the best metric improves.
    last_every_s: float = 0.0
    curve_panels: dict[str, list[str]] = field(
        default_factory=lambda: {
            "loss": ["train_loss", "val_loss"],
            "accuracy": ["train_acc", "val_acc"],
        }
    )


class Trainer:
    """Owns model (+DDP wrapper, +EMA), optimizer, schedule and the run directory."""

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        schedule: WarmupSchedule,
        train_loader: Iterable,
        config: TrainerConfig,
        *,
        train_step: StepFn,
        evaluate: EvalFn | None = None,
        ctx: DistributedContext | None = None,
        meta: Mapping[str, Any] | None = None,
        export_weights: ExportFn = export_safetensors,
    ) -> None:
        self.ctx = ctx or DistributedContext()
        self.model = unwrap_model(model).to(self.ctx.device)
        self.train_model = wrap_model(self.model, self.ctx)
        self.optimizer, self.schedule = optimizer, schedule
        self.train_loader = train_loader
        self.config = config
        self.out_dir = Path(config.out_dir)
        self.train_step, self.evaluate = train_step, evaluate
        self.meta = dict(meta or {})
        self.export_weights = export_weights
        self.ema = ModelEMA(self.model, config.ema_decay) if config.ema_decay else None
        self.epoch = 0  # epochs completed
        self.step = 0  # optimizer steps taken
        self.best_metric: float | None = None
        self.metrics = MetricsLog(self.out_dir / "metrics.jsonl")
        self.show_progress = progress_enabled(config.progress, self.ctx.is_main)
        self._curves_drawn_at: float | None = None
        self._last_saved_at: float | None = None

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {
            "format": TRAINING_STATE_FORMAT,
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict() if self.ema else None,
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "epoch": self.epoch,
            "step": self.step,
            "best_metric": self.best_metric,
            "rng": capture_rng_state(),
            "meta": self.meta,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        try:
            self.model.load_state_dict(state["model"])
            if self.ema is not None:
                if state.get("ema") is None:
                    raise CheckpointError("the checkpoint has no EMA weights but EMA is on")
                self.ema.load_state_dict(state["ema"])
            self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, KeyError, ValueError) as exc:
            raise CheckpointError(f"checkpoint does not match this model/optimizer: {exc}") from exc
        self.schedule.load_state_dict(state["schedule"])
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        self.best_metric = state["best_metric"]
        restore_rng_state(state["rng"])

    def resume(self, path: str | Path) -> None:
        """Load a ``last.pt``/``best.pt`` written by this class; training continues after it."""
        self.load_state_dict(load_training_state(path, map_location=self.ctx.device))
        console(
            f"resumed from {path}: {self.epoch} epoch(s), {self.step} step(s) done",
            is_main=self.ctx.is_main,
        )

    def inference_module(self) -> torch.nn.Module:
        """The weights that are evaluated and exported: EMA when on, else the raw model."""
        return self.ema.module if self.ema is not None else self.model

    # ---------------------------------------------------------------- loop
    def _autocast(self) -> contextlib.AbstractContextManager:
        if not self.config.amp:
            return contextlib.nullcontext()
        return torch.autocast(self.ctx.device.type, dtype=torch.bfloat16)

    def train_epoch(self) -> dict[str, float]:
        """One pass over ``train_loader``; returns the reduced ``train_*`` metrics and
        ``lr_start`` / ``lr_end``, the lr of the epoch's first and last optimizer step."""
        epoch, cfg = self.epoch, self.config
        seed_everything(seed_for(cfg.seed, epoch, self.ctx.rank))
        sampler = getattr(self.train_loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        self.train_model.train()
        sums: dict[str, float] = {}
        lr_start = lr_end = self.schedule.lr
        start = time.perf_counter()
        bar = progress_bar(
            self.train_loader,
            total=len(self.train_loader) if hasattr(self.train_loader, "__len__") else None,
            desc=f"epoch {epoch + 1}/{cfg.epochs}",
            enabled=self.show_progress,
        )
        for batch in bar:
            if batch is None:  # every sample of the batch failed to load (reported already)
                if self.ctx.enabled:
                    raise RuntimeError(
                        "a whole batch failed to load; under torchrun every rank must take the "
                        "same number of steps -- remove the unreadable files from the dataset"
                    )
                continue
            with self._autocast():
                loss, batch_sums = self.train_step(self.train_model, batch, self.ctx.device)
            loss_value = float(loss.detach())
            if not math.isfinite(loss_value):
                raise TrainingDiverged(
                    f"loss is {loss_value} at epoch {epoch + 1}, step {self.step + 1}; "
                    "lower the learning rate, enable gradient clipping or disable --amp"
                )
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
            lr_end = self.schedule.lr  # the lr this step uses
            self.optimizer.step()
            self.schedule.step()
            self.step += 1
            if self.ema is not None:
                self.ema.update(self.model)
            for key, value in batch_sums.items():
                sums[key] = sums.get(key, 0.0) + float(value)
            if self.show_progress:
                count = max(sums.get("count", 1.0), 1.0)
                postfix = {k: f"{v / count:.4f}" for k, v in sums.items() if k != "count"}
                postfix["lr"] = f"{self.schedule.lr:.2e}"
                postfix["img/s"] = f"{sums.get('count', 0.0) / (time.perf_counter() - start):.0f}"
                bar.set_postfix(postfix, refresh=False)
        bar.close()
        elapsed = time.perf_counter() - start
        reduced = self.ctx.reduce_sums(sums or {"count": 0.0})
        count = reduced.pop("count", 0.0)
        record = {f"train_{k}": v / count if count else math.nan for k, v in reduced.items()}
        record["train_count"] = count
        record["lr_start"], record["lr_end"] = lr_start, lr_end
        record["epoch_seconds"] = elapsed
        record["samples_per_second"] = count / elapsed if elapsed > 0 else math.nan
        return record

    def _is_better(self, value: float) -> bool:
        if self.best_metric is None:
            return True
        if self.config.best_mode == "max":
            return value > self.best_metric
        return value < self.best_metric

    def fit(self, stop_after_epochs: int | None = None) -> list[dict[str, Any]]:
        """Train from the current epoch to ``config.epochs`` (or stop early after
        ``stop_after_epochs`` more epochs, e.g. for a time-limited job). Returns the records."""
        cfg = self.config
        last = cfg.epochs
        if stop_after_epochs is not None:
            last = min(last, self.epoch + stop_after_epochs)
        if self.epoch == 0 and self.ctx.is_main and self.metrics.path.exists():
            # A fresh run in an old run directory: start a new log, not a mixed one.
            self.metrics.path.unlink()
        records = []
        while self.epoch < last:
            record: dict[str, Any] = {"epoch": self.epoch + 1}
            record.update(self.train_epoch())
            self.epoch += 1
            record["step"] = self.step
            if self.evaluate is not None and (
                self.epoch % cfg.eval_every == 0 or self.epoch == cfg.epochs
            ):
                eval_start = time.perf_counter()
                module = self.inference_module()
                with self._autocast():
                    metrics = self.evaluate(module, self.ctx)
                record.update({f"val_{k}": v for k, v in metrics.items()})
                record["eval_seconds"] = time.perf_counter() - eval_start
            value = record.get(cfg.best_metric)
            # Without a validation metric the most recent weights count as the best.
            is_best = self._is_better(value) if value is not None else self.evaluate is None
            if is_best and value is not None:
                self.best_metric = float(value)
            record["is_best"] = bool(is_best)
            if self.ctx.is_main:
                final = self.epoch == last
                self.save(is_best, write_last=final or self._due(self._last_saved_at, "last"))
                self.metrics.append(record)
                self._draw_curves(final)
            self.ctx.barrier()
            console(self._summary(record), is_main=self.ctx.is_main)
            records.append(record)
        return records

    def _due(self, stamp: float | None, what: str) -> bool:
        interval = self.config.curves_every_s if what == "curves" else self.config.last_every_s
        return stamp is None or time.perf_counter() - stamp >= interval

    def _draw_curves(self, final: bool) -> None:
        if final or self._due(self._curves_drawn_at, "curves"):
            plot_curves(self.metrics.read(), self.out_dir / "curves.png", self.config.curve_panels)
            self._curves_drawn_at = time.perf_counter()

    def save(self, is_best: bool, write_last: bool = True) -> None:
        """Write last.pt + last.safetensors (unless ``write_last`` is False) and the best.*
        pair when ``is_best``."""
        state = self.state_dict()
        weights_meta = {
            **self.meta,
            "epoch": self.epoch,
            "step": self.step,
            "ema": self.ema is not None,
        }
        module = self.inference_module()
        if write_last:
            save_training_state(state, self.out_dir / "last.pt")
            self.export_weights(module, self.out_dir / "last.safetensors", weights_meta)
            self._last_saved_at = time.perf_counter()
        if is_best:
            save_training_state(state, self.out_dir / "best.pt")
            self.export_weights(module, self.out_dir / "best.safetensors", weights_meta)

    def _summary(self, record: Mapping[str, Any]) -> str:
        parts = [f"epoch {record['epoch']}/{self.config.epochs}"]
        for key in sorted(record):
            if key.startswith(("train_", "val_")) and key != "train_count":
                parts.append(f"{key} {record[key]:.4f}")
        parts.append(self._lr_text(record))
        parts.append(f"{record['samples_per_second']:.0f} samples/s")
        parts.append(f"{record['epoch_seconds']:.0f}s")
        if record.get("is_best"):
            parts.append("*best*")
        return "  ".join(parts)

    def _lr_text(self, record: Mapping[str, Any]) -> str:
        """The lr of the epoch's first to last step; only the warm-up makes it rise."""
        start, end = f"{record['lr_start']:.2e}", f"{record['lr_end']:.2e}"
        if start == end:
            return f"lr {start}"
        rising = record["lr_end"] > record["lr_start"]
        return f"lr {start} to {end}" + (" (warm-up)" if rising else "")
