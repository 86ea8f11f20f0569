"""The seam between the shared training driver and an app: :class:`Task` and what it prepares.

:func:`apps.engine.driver.run_training` does what every app's ``train`` does -- the run
directory and ``--resume`` (restoring the recorded recipe), seeding, the optimizer and lr
schedule from the shared options, the :class:`~apps.engine.trainer.Trainer` with its
checkpoints in ppma_models' safetensors layout, the settings table, the epochs -- and asks the
app's :class:`Task` only for what differs between tasks: data, model, loss step, metrics, the
settings rows and the summary.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from apps.engine.distributed import DistributedContext
from apps.engine.runspec import RunSpec
from apps.engine.settings import Choice
from apps.engine.trainer import EvalFn, StepFn, Trainer

__all__ = ["Task", "TrainingRun"]


@dataclass
class TrainingRun:
    """What :meth:`Task.prepare` builds for one run.

    By then the task has set the options it resolved from the data on ``args`` (at least
    ``epochs``, ``batch_size`` and ``warmup_steps``), so they are recorded in the recipe.
    """

    model: torch.nn.Module
    train_loader: Iterable  # sized: len() is the optimizer steps per epoch
    train_step: StepFn  # (model, batch, device) -> (loss, sums); see apps.engine.trainer
    evaluate: EvalFn | None  # (model, ctx) -> metrics reduced over processes, or None
    model_spec: dict[str, Any]  # the run spec's model description (JSON-able)
    data_spec: dict[str, Any]  # the run spec's data description (JSON-able)
    choices: dict[str, Choice]  # the settings resolved from the data, by name
    best_metric: str = "val_acc"  # the record key that picks best.*
    best_mode: str = "max"
    curve_panels: dict[str, list[str]] | None = None  # None: the Trainer's loss/accuracy panels
    lr_scales: dict[str, float] = field(default_factory=dict)  # parameter prefix -> lr factor
    eval_every: int = 1
    class_names: list[str] | None = None  # stored in the weights files for ppma_models
    info: dict[str, Any] = field(default_factory=dict)  # what settings_rows and finish need


class Task(Protocol):
    """An app's part of ``train``. Attributes:

    - ``name``: the app (``"classify"``): the run spec's ``app`` and the key of the run spec in
      the weights files' metadata.
    - ``recipe_keys``: the app's own options that define a run (beside
      :data:`~apps.engine.options.SHARED_RECIPE_KEYS`), restored by ``--resume``.
    - ``default_out``: the run directory when ``--out`` is left out (None: required).
    - ``save_every_s``: seconds between writes of ``last.*`` (0: after every epoch).
    """

    name: str
    recipe_keys: tuple[str, ...]
    default_out: str | None
    save_every_s: float

    def prepare(self, args: argparse.Namespace, ctx: DistributedContext) -> TrainingRun:
        """Data, the settings resolved from it (set on ``args``), model, loader, step, eval."""
        ...

    def settings_rows(
        self, args: argparse.Namespace, run: TrainingRun, ctx: DistributedContext
    ) -> list[tuple[str, object]]:
        """The rows of the settings table (``run.choices`` carry a resumed run's sources)."""
        ...

    def read_run_spec(self, meta: object, path: Path) -> RunSpec:
        """The run spec of a checkpoint's meta, including this app's older layouts;
        CheckpointError naming ``path`` when it is damaged."""
        ...

    def finish(
        self, args: argparse.Namespace, trainer: Trainer, records: list[dict], seconds: float
    ) -> None:
        """Report the end of a run (main process only, after at least one epoch)."""
        ...
