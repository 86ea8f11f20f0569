"""``train`` options left at their default, resolved from the data; the settings block.

Every rule below applies only to an option the user did not give (its argparse default is
``None``); a given value is used as is, except that a warm-up is capped (see below).

- input size: built-in sets keep their stored size (Fashion-MNIST 28, digits 8). For a
  folder, the median height and width of up to :data:`SIZE_SAMPLE` training images (read
  from the file headers) decide: when the larger is at most :data:`NATIVE_SIZE_LIMIT` px, the
  images are used at that native size, rounded up to a multiple of the model's total stride
  (32 for four stages) so every stage halves its token grid exactly; larger images, and
  fine-tuning ``--pretrained`` weights (trained at 224), get :data:`DEFAULT_INPUT_SIZE`.
- batch size: :func:`apps.engine.default_batch_size` -- a power of two giving at least
  :data:`MIN_STEPS_PER_EPOCH` steps per epoch, at most :data:`MAX_BATCH_SIZE`.
- epochs: :data:`DEFAULT_EPOCHS`, more when that would be fewer than :data:`MIN_TOTAL_STEPS`
  optimizer steps (small data: many short epochs), at most :data:`MAX_EPOCHS`.
- warm-up: :data:`DEFAULT_WARMUP_EPOCHS` epoch, at most :data:`DEFAULT_WARMUP_SHARE` of the
  run; a given ``--warmup-epochs`` is capped at :data:`MAX_WARMUP_SHARE` of the run, so the
  cosine decay always takes place.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from apps.classify.transforms import SMALL_INPUT_LIMIT
from apps.engine import EpochPlan, default_batch_size, warmup_steps

__all__ = [
    "DEFAULT_EPOCHS",
    "DEFAULT_INPUT_SIZE",
    "RunSettings",
    "format_settings",
    "measure_image_size",
    "model_stride",
    "resolve_batch_size",
    "resolve_epochs",
    "resolve_input_size",
    "resolve_warmup",
]

NATIVE_SIZE_LIMIT = SMALL_INPUT_LIMIT  # the size up to which Preprocess treats images as small
DEFAULT_INPUT_SIZE = 224
SIZE_SAMPLE = 64
MAX_BATCH_SIZE = 128
MIN_STEPS_PER_EPOCH = 4
DEFAULT_EPOCHS = 10
MIN_TOTAL_STEPS = 150
MAX_EPOCHS = 100
DEFAULT_WARMUP_EPOCHS = 1.0
DEFAULT_WARMUP_SHARE = 0.1
MAX_WARMUP_SHARE = 0.5


def measure_image_size(paths: Sequence[str], sample: int = SIZE_SAMPLE) -> tuple[int, int] | None:
    """Median ``(height, width)`` of up to ``sample`` evenly spaced files; None if none reads.

    PIL reads only the header here, so this costs milliseconds even for large photos. The
    lower median is taken, so the result is the size of an actual image.
    """
    from PIL import Image

    step = max(1, len(paths) / sample)
    chosen = [paths[int(i * step)] for i in range(min(sample, len(paths)))]
    sizes = []
    for path in chosen:
        try:
            with Image.open(path) as img:
                sizes.append(img.size)  # (width, height)
        except Exception:  # unreadable files are reported (and skipped) when training reads them
            continue
    if not sizes:
        return None
    return statistics.median_low(h for _, h in sizes), statistics.median_low(w for w, _ in sizes)


def model_stride(num_stages: int) -> int:
    """Total downsampling of a PPMA trunk: the stem's 4, then 2 per further stage."""
    return 4 * 2 ** (num_stages - 1)


def resolve_input_size(
    given: int | None,
    *,
    builtin_size: int | None,
    measured: tuple[int, int] | None,
    stride: int,
    pretrained: bool = False,
) -> tuple[int, str]:
    """``(size, where it came from)``; see the module docstring for the rules."""
    if given is not None:
        return given, "--input-size"
    if builtin_size is not None:
        return builtin_size, f"native {builtin_size}x{builtin_size}"
    if pretrained:
        return DEFAULT_INPUT_SIZE, "default for --pretrained weights"
    if measured is None:
        return DEFAULT_INPUT_SIZE, "default (no readable image to measure)"
    h, w = measured
    if max(h, w) > NATIVE_SIZE_LIMIT:
        return DEFAULT_INPUT_SIZE, f"default: images ~{h}x{w}, over {NATIVE_SIZE_LIMIT} px"
    size = stride * math.ceil(max(h, w) / stride)
    return size, f"native {h}x{w} -> {size}, a multiple of the model's stride {stride}"


def resolve_batch_size(given: int | None, images_per_process: int) -> tuple[int, str]:
    """``(batch size, where it came from)``: several steps per epoch unless given."""
    if given is not None:
        return given, "--batch-size"
    size = default_batch_size(images_per_process, MAX_BATCH_SIZE, MIN_STEPS_PER_EPOCH)
    return size, f"default: >= {MIN_STEPS_PER_EPOCH} steps/epoch, at most {MAX_BATCH_SIZE}"


def resolve_epochs(given: int | None, steps_per_epoch: int) -> tuple[int, str]:
    """``(epochs, where it came from)``: enough epochs for :data:`MIN_TOTAL_STEPS` steps."""
    if given is not None:
        return given, "--epochs"
    needed = math.ceil(MIN_TOTAL_STEPS / steps_per_epoch)
    if needed <= DEFAULT_EPOCHS:
        return DEFAULT_EPOCHS, "default"
    epochs = min(MAX_EPOCHS, needed)
    return epochs, f"default for small data: >= {MIN_TOTAL_STEPS} steps, at most {MAX_EPOCHS}"


def resolve_warmup(given: float | None, steps_per_epoch: int, total_steps: int) -> tuple[int, str]:
    """``(warm-up steps, where it came from)``; never longer than its share of the run."""
    epochs = DEFAULT_WARMUP_EPOCHS if given is None else given
    share = DEFAULT_WARMUP_SHARE if given is None else MAX_WARMUP_SHARE
    steps = warmup_steps(epochs, steps_per_epoch, total_steps, share)
    source = f"{epochs:g} epoch{'' if epochs == 1 else 's'}"
    if given is not None:
        source = f"--warmup-epochs {given:g}"
    if steps < round(epochs * steps_per_epoch):
        source += f", capped at {share:.0%} of the run"
    return steps, source


@dataclass(frozen=True)
class RunSettings:
    """What a training run resolved to, for the block printed before the first epoch."""

    data: str
    split_counts: str  # e.g. "144 train / 16 val (10% of the training images)"
    classes: int
    model: str  # e.g. "ppma_nano, 1.75 M params, attention native"
    input_size: int
    in_chans: int
    input_source: str
    plan: EpochPlan
    batch_source: str
    epochs: int
    epochs_source: str
    lr: float
    min_lr: float
    weight_decay: float
    label_smoothing: float
    warmup: int
    warmup_source: str
    device: str
    processes: int
    threads: int
    out: str


def _steps(n: int) -> str:
    return f"{n} step" if n == 1 else f"{n} steps"


def format_settings(s: RunSettings) -> str:
    """One compact block, one line per topic, in the order a reader checks a run."""
    per_epoch = f"{s.plan.steps} steps/epoch"
    if s.plan.dropped == 1:
        per_epoch += ", 1 image per epoch and process left out (a batch of one breaks BatchNorm)"
    elif s.plan.dropped:  # runs resumed from before every image was used
        per_epoch += f", {s.plan.dropped} images per epoch and process left out"
    else:
        per_epoch += ", every image every epoch"
    total = s.epochs * s.plan.steps
    rows = [
        ("data", f"{s.data}: {s.split_counts}, {s.classes} classes"),
        ("model", s.model),
        ("input", f"{s.input_size}x{s.input_size}x{s.in_chans} ({s.input_source})"),
        ("batch", f"{s.plan.batch_size} per process ({s.batch_source}); {per_epoch}"),
        ("epochs", f"{s.epochs} ({s.epochs_source}) = {total} steps"),
        ("optimizer", f"AdamW peak lr {s.lr:g}, weight decay {s.weight_decay:g}, "
                      f"label smoothing {s.label_smoothing:g}"),
        ("schedule", f"linear warm-up {_steps(s.warmup)} ({s.warmup_source}), then cosine "
                     f"to {s.min_lr:.2g} at step {total}"),
        ("runtime", f"device {s.device}, {s.processes} process(es) x {s.threads} thread(s)"),
        ("output", s.out),
    ]  # fmt: skip
    width = max(len(name) for name, _ in rows)
    return "settings:\n" + "\n".join(f"  {name:<{width}}  {text}" for name, text in rows)
