"""Training machinery shared by the apps (classification, segmentation).

One concept per module; an app combines them::

    from apps.engine import (DistributedContext, Trainer, TrainerConfig, WarmupSchedule,
                             build_adamw, init_distributed)

    ctx = init_distributed(device="auto")          # torchrun-aware; gloo on CPU, NCCL on GPU
    model = ...                                     # plain nn.Module (Trainer wraps it in DDP)
    optimizer = build_adamw(model, lr=1e-3, weight_decay=0.05)   # no decay on 1-D/A_log/dt_bias
    schedule = WarmupSchedule(optimizer, total_steps=epochs * len(loader), warmup_steps=200,
                              decay="cosine")      # or "poly" (power=...) or "constant"

    def train_step(model, batch, device):          # runs under bf16 autocast when amp=True
        x, y = (t.to(device) for t in batch)
        logits = model(x)
        loss = loss_fn(logits, y)
        return loss, {"loss": loss.detach() * len(y), "acc": (logits.argmax(1) == y).sum(),
                      "count": len(y)}             # sums; Trainer logs train_<k> = sum/count

    def evaluate(model, ctx):                      # EMA weights when EMA is on
        ...                                        # shard with ShardSampler, then
        return {"acc": ..., "loss": ...}           # ctx.reduce_sums(...) -> val_acc, val_loss

    trainer = Trainer(model, optimizer, schedule, loader,
                      TrainerConfig(out_dir=run_dir, epochs=epochs, seed=0, amp=True,
                                    ema_decay=0.999, grad_clip=1.0, best_metric="val_acc"),
                      train_step=train_step, evaluate=evaluate, ctx=ctx,
                      meta={...plain JSON-able description of model/data...},
                      export_weights=fn)            # optional: (module, path, meta) -> None,
                                                   # default safetensors + JSON meta
    if resume: trainer.resume(run_dir / "last.pt")  # also repairs what a kill cut short
    trainer.fit()                                  # per epoch, in this order: metrics.jsonl,
                                                   # best.safetensors/.pt, last.safetensors/.pt,
                                                   # curves.png
    ctx.shutdown()

Modules:
  seeding      seed_everything, seed_for(seed, *parts), capture/restore_rng_state (tensors only)
  checkpoint   atomic_write, atomic_path (for writers that take a file name; both give
               the umask's file mode), remove_stale_temp_files (left by killed writers),
               save/load_training_state (weights_only=True), save/load_weights
               (safetensors + JSON meta), CheckpointError
  distributed  init_distributed -> DistributedContext(rank, world_size, device, reduce_sums,
               barrier, shutdown), wrap_model/unwrap_model, ShardSampler (eval, no padding)
  schedule     WarmupSchedule / lr_factor: linear warmup + cosine | poly | constant;
               warmup_steps: a warm-up in epochs, capped to a fraction of the run
  batching     default_batch_size (several steps per epoch), plan_epoch (every image seen,
               no batch of one), batch_length / unreadable_in_batch (batches that lost files)
  ema          ModelEMA(model, decay) with decay warm-up
  optimizer    build_adamw / weight_decay_groups
  progress     progress_bar (tqdm on stderr, main rank, auto-off when not a tty), console
  metrics_log  MetricsLog: metrics.jsonl, append-only, de-duplicated per epoch on read,
               roll_back to the epoch a run resumes from
  plots        plot_curves, plot_confusion_matrix (Agg, atomic PNG writes)
  trainer      Trainer / TrainerConfig: the epoch loop; a kill at any moment loses nothing
               that resume cannot redo, and batches shrunk by unreadable files are skipped
"""

from apps.engine.batching import (
    EpochPlan,
    batch_length,
    default_batch_size,
    plan_epoch,
    unreadable_in_batch,
)
from apps.engine.checkpoint import (
    CheckpointError,
    atomic_path,
    atomic_write,
    load_training_state,
    load_weights,
    remove_stale_temp_files,
    save_training_state,
    save_weights,
)
from apps.engine.distributed import (
    DistributedContext,
    ShardSampler,
    init_distributed,
    unwrap_model,
    wrap_model,
)
from apps.engine.ema import ModelEMA
from apps.engine.metrics_log import MetricsLog
from apps.engine.optimizer import build_adamw, weight_decay_groups
from apps.engine.plots import plot_confusion_matrix, plot_curves
from apps.engine.progress import console, progress_bar, progress_enabled
from apps.engine.schedule import WarmupSchedule, lr_factor, warmup_steps
from apps.engine.seeding import capture_rng_state, restore_rng_state, seed_everything, seed_for
from apps.engine.trainer import Trainer, TrainerConfig, TrainingDiverged

__all__ = [
    "CheckpointError",
    "DistributedContext",
    "EpochPlan",
    "MetricsLog",
    "ModelEMA",
    "ShardSampler",
    "Trainer",
    "TrainerConfig",
    "TrainingDiverged",
    "WarmupSchedule",
    "atomic_path",
    "atomic_write",
    "batch_length",
    "build_adamw",
    "capture_rng_state",
    "console",
    "default_batch_size",
    "init_distributed",
    "load_training_state",
    "load_weights",
    "lr_factor",
    "plan_epoch",
    "plot_confusion_matrix",
    "plot_curves",
    "progress_bar",
    "progress_enabled",
    "remove_stale_temp_files",
    "restore_rng_state",
    "save_training_state",
    "save_weights",
    "seed_everything",
    "seed_for",
    "unreadable_in_batch",
    "unwrap_model",
    "warmup_steps",
    "weight_decay_groups",
    "wrap_model",
]
