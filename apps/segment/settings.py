"""The segment app's rules for training settings the command line left open.

Options whose default depends on the data are ``None`` on the command line; the functions here
turn each into an :class:`apps.engine.settings.Choice` -- the value and where it came from --
so the start of a run can say what it chose and why. An explicit option is always used as
given (or refused with an :class:`~apps.engine.options.OptionError` naming it when the run
cannot use it).

The rules, for a training set of N images per process:

- crop: the scene canvas for ``--data scenes``; for folders the median shorter side of the
  training images, at most 512 (MMSegmentation's ADE20K crop). Smaller images would otherwise
  be padded to 512, and the padding costs compute without carrying labels.
- batch size: N // 4 clamped to 2..16, so an epoch has at least four optimizer steps when the
  data allows (16 is the published per-GPU batch; BatchNorm in the head needs at least 2).
- epochs: 12, or more on small data so the run takes at least 300 optimizer steps: a dozen
  passes over a dozen images are a few dozen steps, too few to fit even easy masks.
- warmup: 200 steps, at most 10% of the run, so the learning rate always decays afterwards; a
  given warm-up follows :func:`apps.engine.settings.explicit_warmup`.
"""

from __future__ import annotations

import statistics

from apps.engine.options import OptionError
from apps.engine.settings import Choice, explicit_warmup, fitted_epochs

__all__ = [
    "DEFAULT_CROP",
    "DEFAULT_EPOCHS",
    "DEFAULT_VAL_FRACTION",
    "DEFAULT_WARMUP",
    "MIN_AUTO_STEPS",
    "WARMUP_FRACTION",
    "choose_batch_size",
    "choose_crop",
    "choose_epochs",
    "choose_warmup",
]

DEFAULT_CROP = 512
DEFAULT_VAL_FRACTION = 0.1  # of a folder without a validation folder
MAX_AUTO_BATCH = 16
MIN_STEPS_PER_EPOCH = 4
DEFAULT_EPOCHS = 12
MIN_AUTO_STEPS = 300
DEFAULT_WARMUP = 200
WARMUP_FRACTION = 0.1


def choose_crop(
    explicit: int | None, sizes: list[tuple[int, int]] | None, canvas: int | None = None
) -> Choice:
    """``sizes``: (width, height) of the training images; ``canvas``: the scenes' side."""
    if explicit is not None:
        return Choice(explicit, "--crop")
    if canvas is not None:
        return Choice(canvas, "auto: the scene canvas")
    if not sizes:
        return Choice(DEFAULT_CROP, "auto: default")
    side = int(statistics.median_low(min(w, h) for w, h in sizes))
    if side >= DEFAULT_CROP:
        return Choice(DEFAULT_CROP, f"auto: default; the training images are larger ({side}px)")
    widths, heights = {w for w, _ in sizes}, {h for _, h in sizes}
    shape = (
        f"{widths.pop()}x{heights.pop()}"
        if len(widths) == len(heights) == 1
        else f"median shorter side {side}px"
    )
    return Choice(side, f"auto: the training images ({shape}) are smaller than {DEFAULT_CROP}")


def choose_batch_size(explicit: int | None, images_per_process: int) -> Choice:
    """Per-process batch; OptionError when the data cannot fill one batch."""
    if explicit is not None:
        if explicit > images_per_process:
            raise OptionError(
                f"--batch-size {explicit} is larger than this process's share of the "
                f"{images_per_process} training images; lower it or leave it out"
            )
        return Choice(explicit, "--batch-size")
    if images_per_process < 2:
        raise OptionError(
            f"--data: {images_per_process} training image(s) per process; training needs "
            "at least 2 (BatchNorm in the head needs two values per channel)"
        )
    batch = max(2, min(MAX_AUTO_BATCH, images_per_process // MIN_STEPS_PER_EPOCH))
    return Choice(
        batch,
        f"auto: {images_per_process} training images per process / {MIN_STEPS_PER_EPOCH} steps "
        f"per epoch, within 2..{MAX_AUTO_BATCH}",
    )


def choose_epochs(explicit: int | None, steps_per_epoch: int) -> Choice:
    small = "auto: {default} epochs would be only {default_steps} steps; small data gets at "
    return fitted_epochs(
        explicit, steps_per_epoch, default=DEFAULT_EPOCHS, min_steps=MIN_AUTO_STEPS,
        texts=("auto: default", small + "least {min_steps}"),
    )  # fmt: skip


def choose_warmup(
    explicit: int | None,
    total_steps: int,
    *,
    epochs: float | None = None,
    steps_per_epoch: int = 0,
) -> Choice:
    """Linear-warmup steps, always fewer than ``total_steps`` so the schedule decays.

    ``explicit``: ``--warmup-steps``; ``epochs``: ``--warmup-epochs``.
    """
    given = explicit_warmup(explicit, epochs, steps_per_epoch, total_steps)
    cap = int(WARMUP_FRACTION * total_steps)  # runs under 10 steps warm up not at all
    if given is not None or DEFAULT_WARMUP <= cap:
        return given or Choice(DEFAULT_WARMUP, "auto: default")
    why = f"the default {DEFAULT_WARMUP} capped at {WARMUP_FRACTION:.0%} of {total_steps} steps"
    return Choice(cap, f"auto: {why}")
