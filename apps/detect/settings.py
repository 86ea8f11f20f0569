"""The detect app's rules for training settings the command line left open.

As in the segment app (:mod:`apps.segment.settings`), options whose good value depends on the
data are ``None`` on the command line and become :class:`apps.engine.settings.Choice` values
-- the value and where it came from -- once the data is known. An explicit option is used as
given, or refused with an :class:`~apps.engine.options.OptionError` naming it.

The rules, for a training set of N images per process:

- batch size: N // 4 clamped to 1..8, so an epoch has at least four optimizer steps when the
  data allows. Detector batches stay small (mmdetection's 1x trains 2 images per GPU): a
  Mask R-CNN step holds every image's proposals and RoI features.
- epochs: 12 (mmdetection's 1x schedule), or more on small data so the run takes at least
  300 optimizer steps.
- warmup: 500 steps (mmdetection's linear warm-up), at most 10% of the run; a given warm-up
  follows :func:`apps.engine.settings.explicit_warmup`.
"""

from __future__ import annotations

from apps.engine.options import OptionError
from apps.engine.settings import Choice, explicit_warmup, fitted_epochs

__all__ = [
    "DEFAULT_EPOCHS",
    "DEFAULT_VAL_FRACTION",
    "DEFAULT_WARMUP",
    "MAX_AUTO_BATCH",
    "MIN_AUTO_STEPS",
    "WARMUP_FRACTION",
    "choose_batch_size",
    "choose_epochs",
    "choose_warmup",
]

DEFAULT_VAL_FRACTION = 0.1  # of a COCO folder with a single annotation file
MAX_AUTO_BATCH = 8
MIN_STEPS_PER_EPOCH = 4
DEFAULT_EPOCHS = 12  # mmdetection's 1x schedule
MIN_AUTO_STEPS = 300
DEFAULT_WARMUP = 500  # mmdetection's linear warm-up, in steps
WARMUP_FRACTION = 0.1


def choose_batch_size(explicit: int | None, images_per_process: int) -> Choice:
    """Images per process and step; OptionError when the data cannot fill one batch."""
    if explicit is not None:
        if explicit > images_per_process:
            raise OptionError(
                f"--batch-size {explicit} is larger than this process's share of the "
                f"{images_per_process} training images; lower it or leave it out"
            )
        return Choice(explicit, "--batch-size")
    batch = max(1, min(MAX_AUTO_BATCH, images_per_process // MIN_STEPS_PER_EPOCH))
    return Choice(
        batch,
        f"auto: {images_per_process} training images per process / {MIN_STEPS_PER_EPOCH} steps "
        f"per epoch, within 1..{MAX_AUTO_BATCH}",
    )


def choose_epochs(explicit: int | None, steps_per_epoch: int) -> Choice:
    small = "auto: {default} epochs would be only {default_steps} steps; small data gets at "
    return fitted_epochs(
        explicit, steps_per_epoch, default=DEFAULT_EPOCHS, min_steps=MIN_AUTO_STEPS,
        texts=("auto: mmdetection's 1x schedule", small + "least {min_steps}"),
    )  # fmt: skip


def choose_warmup(
    explicit: int | None, total_steps: int, *, epochs: float | None, steps_per_epoch: int
) -> Choice:
    """Linear-warmup steps, always fewer than ``total_steps`` so the schedule decays.

    ``explicit``: ``--warmup-steps``; ``epochs``: ``--warmup-epochs``.
    """
    given = explicit_warmup(explicit, epochs, steps_per_epoch, total_steps)
    cap = int(WARMUP_FRACTION * total_steps)
    if given is not None or DEFAULT_WARMUP <= cap:
        return given or Choice(DEFAULT_WARMUP, "auto: mmdetection's default")
    why = f"the default {DEFAULT_WARMUP} capped at {WARMUP_FRACTION:.0%} of {total_steps} steps"
    return Choice(cap, f"auto: {why}")
