"""The classifier's rules for ``train`` options left at their default, resolved from the data.

Every rule below applies only to an option the user did not give (its argparse default is
``None``); a given value is used as is, except for the warm-up (see below). Each rule returns
an :class:`apps.engine.settings.Choice`, the value and where it came from.

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
  run; a given ``--warmup-epochs`` is capped at half the run and a given ``--warmup-steps``
  must be shorter than the run (:func:`apps.engine.settings.explicit_warmup`), so the decay
  always takes place.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

from ppma_models import PPMAConfig

from apps.classify.transforms import SMALL_INPUT_LIMIT
from apps.engine.batching import EpochPlan, default_batch_size
from apps.engine.schedule import warmup_steps
from apps.engine.settings import Choice, explicit_warmup, fitted_epochs

__all__ = [
    "DEFAULT_EPOCHS",
    "DEFAULT_INPUT_SIZE",
    "measure_image_size",
    "model_stride",
    "plan_text",
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


def model_stride(config: PPMAConfig) -> int:
    """Total downsampling of a PPMA trunk: the stem's (4, or 2), then 2 per further stage."""
    return config.strides[-1]


def resolve_input_size(
    given: int | None,
    *,
    builtin_size: int | None,
    measured: tuple[int, int] | None,
    stride: int,
    pretrained: bool = False,
) -> Choice:
    """Square input size; see the module docstring for the rules."""
    if given is not None:
        return Choice(given, "--input-size")
    if builtin_size is not None:
        return Choice(builtin_size, f"native {builtin_size}x{builtin_size}")
    if pretrained:
        return Choice(DEFAULT_INPUT_SIZE, "default for --pretrained weights")
    if measured is None:
        return Choice(DEFAULT_INPUT_SIZE, "default (no readable image to measure)")
    h, w = measured
    if max(h, w) > NATIVE_SIZE_LIMIT:
        return Choice(DEFAULT_INPUT_SIZE, f"default: images ~{h}x{w}, over {NATIVE_SIZE_LIMIT} px")
    size = stride * math.ceil(max(h, w) / stride)
    return Choice(size, f"native {h}x{w} -> {size}, a multiple of the model's stride {stride}")


def resolve_batch_size(given: int | None, images_per_process: int) -> Choice:
    """Batch size per process: several steps per epoch unless given."""
    if given is not None:
        return Choice(given, "--batch-size")
    size = default_batch_size(images_per_process, MAX_BATCH_SIZE, MIN_STEPS_PER_EPOCH)
    return Choice(size, f"default: >= {MIN_STEPS_PER_EPOCH} steps/epoch, at most {MAX_BATCH_SIZE}")


def resolve_epochs(given: int | None, steps_per_epoch: int) -> Choice:
    """Epochs: enough for :data:`MIN_TOTAL_STEPS` steps unless given."""
    texts = ("default", "default for small data: >= {min_steps} steps, at most {max_epochs}")
    return fitted_epochs(
        given, steps_per_epoch, default=DEFAULT_EPOCHS, min_steps=MIN_TOTAL_STEPS,
        max_epochs=MAX_EPOCHS, texts=texts,
    )  # fmt: skip


def resolve_warmup(
    given: float | None, steps_per_epoch: int, total_steps: int, steps: int | None = None
) -> Choice:
    """Warm-up steps: ``--warmup-steps`` (``steps``) or ``--warmup-epochs`` (``given``) as the
    engine's rule takes them, else :data:`DEFAULT_WARMUP_EPOCHS` capped at its share."""
    return explicit_warmup(steps, given, steps_per_epoch, total_steps) or _default_warmup(
        steps_per_epoch, total_steps
    )


def _default_warmup(steps_per_epoch: int, total_steps: int) -> Choice:
    epochs = DEFAULT_WARMUP_EPOCHS
    chosen = warmup_steps(epochs, steps_per_epoch, total_steps, DEFAULT_WARMUP_SHARE)
    source = f"{epochs:g} epoch{'' if epochs == 1 else 's'}"
    if chosen < round(epochs * steps_per_epoch):
        source += f", capped at {DEFAULT_WARMUP_SHARE:.0%} of the run"
    return Choice(chosen, source)


def plan_text(plan: EpochPlan) -> str:
    """The steps of an epoch and which images it leaves out, for the settings table."""
    text = f"{plan.steps} steps/epoch"
    if plan.dropped == 1:
        return text + ", 1 image per epoch and process left out (a batch of one breaks BatchNorm)"
    if plan.dropped:  # runs resumed from before every image was used
        return text + f", {plan.dropped} images per epoch and process left out"
    return text + ", every image every epoch"
