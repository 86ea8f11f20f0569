"""Training machinery shared by the apps (classification, segmentation, and any later one).

**An app plugs in at two places** (see ``apps/classify`` and ``apps/segment``):

1. Its command line, built from the shared option groups of :mod:`apps.engine.options` and
   run by :func:`apps.engine.command.run_command`::

       defaults = TrainingDefaults(epochs_help=..., batch_help=..., warmup_help=..., out=None)
       train = sub.add_parser("train", formatter_class=HelpFormatter)
       add_run_options(train, defaults)                # --out, --resume, --stop-after-epochs
       add_model_arg_option(train.add_argument_group("model"))
       add_optimisation_options(train, defaults)       # --epochs ... --seed (+ the app's own)
       add_runtime_options(train)                      # --device --threads --workers --attention
       ...
       def main(argv=None):
           return run_command(build_parser(), argv, check=check, commands={
               "train": lambda: functools.partial(run_training, MyTask()), ...})

   ``check`` calls :func:`~apps.engine.options.check_training_options` (one error text for
   every app) and adds the app's own checks; ``run_command`` sets ``--threads`` and the
   ``--attention`` backend (``ppma_ops.set_backend``) once, and maps errors to exit codes.

2. Its ``train``, a :class:`~apps.engine.task.Task` handed to
   :func:`apps.engine.driver.run_training`, which does the rest: run directory and
   ``--resume`` (the recorded recipe restored), seeding, AdamW + warm-up/decay schedule from the
   shared options, the :class:`Trainer` with checkpoints and exported weights, the settings
   table, the epochs. The task supplies::

       name, recipe_keys, default_out, save_every_s
       prepare(args, ctx) -> TrainingRun(model, train_loader, train_step, evaluate,
                                         model_spec, data_spec, choices, best_metric, ...)
       settings_rows(args, run, choices, ctx) -> [(name, value), ...]
       read_run_spec(meta, path) -> RunSpec     # its older checkpoint layouts too
       finish(args, trainer, records, seconds)  # the summary

   Settings fitted to the data are :class:`~apps.engine.settings.Choice` values (a value and
   where it came from). Every checkpoint stores the :class:`~apps.engine.runspec.RunSpec`
   (recipe, setting sources, model and data descriptions); weights files are ppma_models'
   safetensors with the run spec under the app's name (:mod:`apps.engine.weights`), so
   ``ppma_models.load_model`` reads every app's weights. Checkpoint problems are
   ``ppma_models.CheckpointError``.

Modules (imported on first use, so the command lines answer ``--help`` without torch):

  options      the shared options, their checks (OptionError), HelpFormatter, out_problem
  settings     Choice, the settings table, the explicit warm-up rule
  model_args   --model-arg parsing and checks against the model's config
  command      run_command: parse, check, configure the process, run, exit status
  task         Task (the app's part of train) and TrainingRun (what it prepares)
  driver       run_training: the train command written once
  runspec      RunSpec: what a run is, stored with every checkpoint
  weights      the weights files (ppma_models safetensors + run spec), checked loading
  seeding      seed_everything, seed_for(seed, *parts), capture/restore_rng_state
  checkpoint   atomic_write / atomic_path, remove_stale_temp_files, save/load_training_state
               (weights_only=True), save/load_weights (the older weights layout), CheckpointError
  distributed  init_distributed -> DistributedContext, wrap_model/unwrap_model, ShardSampler
  schedule     WarmupSchedule / lr_factor: linear warm-up + cosine | poly | constant
  batching     default_batch_size, plan_epoch (every image seen, no batch of one),
               batch_length / unreadable_in_batch (batches that lost files)
  ema          ModelEMA(model, decay) with decay warm-up
  optimizer    build_adamw / weight_decay_groups (no decay on 1-D parameters; lr scales)
  progress     progress_bar (tqdm on stderr, main rank), console
  metrics_log  MetricsLog: metrics.jsonl, append-only, rolled back on resume
  plots        plot_curves, plot_confusion_matrix (Agg, atomic PNG writes)
  trainer      Trainer / TrainerConfig: the epoch loop; a kill at any moment loses nothing
               that resume cannot redo, and batches shrunk by unreadable files are skipped
"""

from __future__ import annotations

import importlib
from typing import Any

# name -> module that defines it; resolved on first access (PEP 562).
_EXPORTS = {
    "EpochPlan": "batching",
    "batch_length": "batching",
    "default_batch_size": "batching",
    "plan_epoch": "batching",
    "unreadable_in_batch": "batching",
    "CheckpointError": "checkpoint",
    "atomic_path": "checkpoint",
    "atomic_write": "checkpoint",
    "load_training_state": "checkpoint",
    "load_weights": "checkpoint",
    "remove_stale_temp_files": "checkpoint",
    "save_training_state": "checkpoint",
    "save_weights": "checkpoint",
    "run_command": "command",
    "DistributedContext": "distributed",
    "ShardSampler": "distributed",
    "init_distributed": "distributed",
    "unwrap_model": "distributed",
    "wrap_model": "distributed",
    "run_training": "driver",
    "ModelEMA": "ema",
    "MetricsLog": "metrics_log",
    "model_overrides": "model_args",
    "build_adamw": "optimizer",
    "weight_decay_groups": "optimizer",
    "HelpFormatter": "options",
    "OptionError": "options",
    "TrainingDefaults": "options",
    "plot_confusion_matrix": "plots",
    "plot_curves": "plots",
    "console": "progress",
    "progress_bar": "progress",
    "progress_enabled": "progress",
    "RunSpec": "runspec",
    "WarmupSchedule": "schedule",
    "lr_factor": "schedule",
    "warmup_steps": "schedule",
    "capture_rng_state": "seeding",
    "restore_rng_state": "seeding",
    "seed_everything": "seeding",
    "seed_for": "seeding",
    "Choice": "settings",
    "format_settings": "settings",
    "Task": "task",
    "TrainingRun": "task",
    "Trainer": "trainer",
    "TrainerConfig": "trainer",
    "TrainingDiverged": "trainer",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
