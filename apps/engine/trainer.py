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

A process killed at any moment leaves a run directory that resume makes whole. Each epoch
writes, in this order: its metrics.jsonl record, best.safetensors and best.pt (when the metric
improved), last.safetensors and last.pt (when due). best.pt and last.pt are full training
states, so the newer of the two is where the run stands; everything written before it exists
complete. :meth:`Trainer.resume` starts from that state and rewrites whatever a kill left
behind it or ahead of it: metrics.jsonl is cut back to the resumed epoch, last.* and best.*
are rewritten from the states that hold them, and stale temporary files are removed.

A batch that lost all its samples, or all but one, to unreadable files is skipped with a
warning that names the files: BatchNorm cannot train on a batch of one. Under torchrun the
step is skipped on every process, so all take the same number of steps.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from apps.engine.batching import batch_length, planned_batch_size, unreadable_in_batch
from apps.engine.checkpoint import (
    TRAINING_STATE_FORMAT,
    CheckpointError,
    load_training_state,
    remove_stale_temp_files,
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


def _weights_meta(state: Mapping[str, Any]) -> dict[str, Any]:
    """The meta exported with the weights of a training state: the app's meta + position."""
    return {
        **state["meta"],
        "epoch": state["epoch"],
        "step": state["step"],
        "ema": state.get("ema") is not None,
    }


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


@dataclass
class TrainerConfig:
    """Loop settings. Files go to ``out_dir``: last.pt, best.pt, last/best.safetensors,
    metrics.jsonl, curves.png (a fresh run removes those of an earlier run there)."""

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
    # training. best.* are written whenever the best metric improves; best.pt is a full
    # training state, so resume continues from it when it is newer than last.pt, and cuts
    # metrics.jsonl back to the epoch it continues from.
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
        self.best_epoch: int | None = None  # the epoch best.* hold
        self._record: dict[str, Any] | None = None  # the latest epoch's metrics record
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
            "best_epoch": self.best_epoch,
            "record": self._record,
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
        self.best_epoch = state.get("best_epoch")  # absent from files of older versions
        self._record = state.get("record")
        restore_rng_state(state["rng"])

    def resume(self, path: str | Path) -> None:
        """Load a ``last.pt``/``best.pt`` written by this class; training continues after it.

        For a ``last.pt``, a newer ``best.pt`` beside it wins: a kill between the two writes
        of an epoch leaves best.pt ahead. The run directory is then repaired to agree with
        the state loaded (see the module docstring), even when no epoch is left to train.
        """
        source, state, epochs = self._newest_state(Path(path))
        self.load_state_dict(state)
        if self.ctx.is_main:
            self._repair_run_dir(source, state, epochs)
        self.ctx.barrier()
        console(
            f"resumed from {source}: {self.epoch} epoch(s), {self.step} step(s) done",
            is_main=self.ctx.is_main,
        )

    def _newest_state(self, path: Path) -> tuple[Path, dict[str, Any], dict[Path, int]]:
        """``path``, or the ``best.pt`` next to a ``last.pt`` when that one is newer: the
        file, its state, and the epoch of each file read (resolved path -> epoch)."""
        candidates = [path]
        if path.name == "last.pt":  # a kill in the first epoch's save can leave only best.pt
            candidates.append(path.with_name("best.pt"))
        # Nothing there: loading ``path`` raises the error that names it.
        candidates = [c for c in candidates if c.is_file()] or [path]
        found = []
        for rank, candidate in enumerate(candidates):
            state = load_training_state(candidate, map_location=self.ctx.device)
            found.append((int(state["epoch"]), -rank, candidate, state))
        _, _, source, state = max(found, key=lambda item: item[:2])  # ties: ``path``
        return source, state, {c.resolve(): epoch for epoch, _, c, _ in found}

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
        for position, batch in enumerate(bar):
            if self._skip_batch(batch, position):
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

    def _skip_batch(self, batch: Any, position: int) -> bool:
        """True for a step that must not run: a batch is ``None`` (no sample loaded) or was
        shrunk by unreadable files to a single sample, which BatchNorm cannot train on.

        Under torchrun every rank must take the same steps, so one rank's damaged batch
        skips the step on all of them (one small collective per step decides).
        """
        planned = planned_batch_size(self.train_loader)
        damaged = batch is None or (batch_length(batch) == 1 and bool(planned) and planned > 1)
        if damaged:
            self._warn_skipped(batch, position, planned)
        if not self.ctx.enabled:
            return damaged
        flag = torch.tensor([float(damaged)], device=self.ctx.device)
        return bool(self.ctx.all_reduce_sum(flag).item() > 0)

    def _warn_skipped(self, batch: Any, position: int, planned: int | None) -> None:
        """Name the files a skipped batch lost (when the loader can be replayed)."""
        names = unreadable_in_batch(self.train_loader, position)
        if names:
            files = "unreadable: " + ", ".join(names)
        else:  # the loader cannot be replayed; the dataset's own warnings name the files
            files = "unreadable files are named in the warnings above"
        kept = "no sample" if batch is None else f"1 sample of {planned}"
        rank = f" (process {self.ctx.rank}; skipped on every process)" if self.ctx.enabled else ""
        console(
            f"warning: skipped the training step of epoch {self.epoch + 1}, batch "
            f"{position + 1}{rank}: {kept} loaded ({files})",
            is_main=True,
        )

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
        if self.epoch == 0 and self.ctx.is_main:
            self._start_run_dir()
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
            if is_best:
                self.best_epoch = self.epoch
            record["is_best"] = bool(is_best)
            if self.ctx.is_main:
                final = self.epoch == last
                # The record first: every later file of this epoch implies it exists.
                self._record = self.metrics.append(record)
                self.save(is_best, write_last=final or self._due(self._last_saved_at, "last"))
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
        """Write the best.* pair when ``is_best``, then last.safetensors + last.pt (unless
        ``write_last`` is False).

        Each training state comes after its weights, and last.pt comes last: resume trusts
        the newest state, so whatever it implies must exist before it does.
        """
        state = self.state_dict()
        module = self.inference_module()
        if is_best:
            self.export_weights(module, self.out_dir / "best.safetensors", _weights_meta(state))
            save_training_state(state, self.out_dir / "best.pt")
        if write_last:
            self.export_weights(module, self.out_dir / "last.safetensors", _weights_meta(state))
            save_training_state(state, self.out_dir / "last.pt")
            self._last_saved_at = time.perf_counter()

    # ---------------------------------------------------------------- run directory
    def _start_run_dir(self) -> None:
        """A fresh run: clear what an earlier run in this directory left, so that a kill
        before the first save cannot mix the two (resume would take an old best.pt)."""
        remove_stale_temp_files(self.out_dir)
        for name in ("metrics.jsonl", "last.pt", "best.pt", "last.safetensors", "best.safetensors"):
            (self.out_dir / name).unlink(missing_ok=True)

    def _repair_run_dir(
        self, source: Path, state: Mapping[str, Any], epochs: Mapping[Path, int]
    ) -> None:
        """Make the run directory what an uninterrupted run that stopped after ``state``
        (loaded from ``source``) would have left; ``epochs``: those of the files read."""
        remove_stale_temp_files(self.out_dir)
        self.metrics.roll_back(self.epoch, state.get("record"))
        self._repair_best(state, epochs)
        last = self.out_dir / "last.pt"
        if source.resolve() != last.resolve():
            save_training_state(state, last)
        # Re-export even when last.pt came from here: a kill can leave it behind its weights.
        module = self.inference_module()
        self.export_weights(module, self.out_dir / "last.safetensors", _weights_meta(state))
        if self.metrics.path.exists():
            self._draw_curves(final=True)

    def _repair_best(self, state: Mapping[str, Any], epochs: Mapping[Path, int]) -> None:
        """Rewrite best.* from the state of the best epoch that ``state`` names."""
        best_epoch, best_path = state.get("best_epoch"), self.out_dir / "best.pt"
        if best_epoch is None:  # a file of an older version: nothing to check against
            return
        if best_epoch == self.epoch:  # the loaded state is the best one
            # Both files hold the same state when saved at the same epoch.
            if epochs.get(best_path.resolve()) != self.epoch:
                save_training_state(state, best_path)
            best_state, module = state, self.inference_module()
        else:
            best_state = load_training_state(best_path) if best_path.is_file() else None
            if best_state is None or best_state["epoch"] != best_epoch:
                console(
                    f"warning: {best_path} does not hold epoch {best_epoch}, the best so far; "
                    "best.* stay as they are until the metric improves"
                )
                return
            module = self._inference_module_of(best_state)
        self.export_weights(module, self.out_dir / "best.safetensors", _weights_meta(best_state))

    def _inference_module_of(self, state: Mapping[str, Any]) -> torch.nn.Module:
        """A copy of :meth:`inference_module` holding the weights of ``state``."""
        module = copy.deepcopy(self.inference_module())
        module.load_state_dict(state["ema"]["module"] if self.ema is not None else state["model"])
        return module

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
