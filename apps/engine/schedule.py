"""Learning-rate schedule: linear warmup, then cosine, polynomial or constant decay.

Stepped once per optimizer step. The state is a single step counter, so it checkpoints as a
plain dict and resumes exactly.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:  # the schedule only reads and sets param_groups; keep torch out of --help
    import torch

__all__ = ["WarmupSchedule", "lr_factor", "warmup_steps"]

Decay = Literal["cosine", "poly", "constant"]


def lr_factor(
    step: int,
    total_steps: int,
    warmup_steps: int = 0,
    decay: Decay = "cosine",
    min_ratio: float = 0.0,
    power: float = 1.0,
) -> float:
    """Multiplier of the base learning rate for optimizer step ``step`` (0-based).

    Warmup rises linearly to 1 over ``warmup_steps`` (first step 1/warmup_steps, never 0);
    afterwards the factor decays from 1 to ``min_ratio`` at ``total_steps``.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if decay == "constant":
        return 1.0
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    if decay == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    elif decay == "poly":
        shape = (1.0 - progress) ** power
    else:
        raise ValueError(f"decay must be 'cosine', 'poly' or 'constant', got {decay!r}")
    return min_ratio + (1.0 - min_ratio) * shape


def warmup_steps(
    warmup_epochs: float, steps_per_epoch: int, total_steps: int, max_fraction: float = 1.0
) -> int:
    """Warm-up length in optimizer steps: ``warmup_epochs`` epochs, at most ``max_fraction``
    of the ``total_steps`` run.

    The cap keeps a warm-up given in epochs from eating a short run: with fewer epochs than
    warm-up epochs the lr would never reach its peak, let alone decay.
    """
    if warmup_epochs < 0 or not 0.0 <= max_fraction <= 1.0:
        raise ValueError(f"need warmup_epochs >= 0 and max_fraction in [0, 1]: {warmup_epochs}")
    wanted = round(warmup_epochs * steps_per_epoch)
    return max(0, min(wanted, math.floor(max_fraction * total_steps), total_steps))


class WarmupSchedule:
    """Sets every param group's ``lr`` to ``base_lr * lr_factor(step, ...)``.

    ``base_lr`` is each group's ``lr`` when the schedule is created. The lr for the first step
    is set at construction; call :meth:`step` after each ``optimizer.step()``.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        total_steps: int,
        warmup_steps: int = 0,
        decay: Decay = "cosine",
        min_ratio: float = 0.0,
        power: float = 1.0,
    ) -> None:
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        if not 0 <= warmup_steps <= total_steps:
            raise ValueError(f"warmup_steps must be in [0, {total_steps}], got {warmup_steps}")
        lr_factor(0, total_steps, warmup_steps, decay, min_ratio, power)  # validates decay
        self.optimizer = optimizer
        self.total_steps, self.warmup_steps = total_steps, warmup_steps
        self.decay, self.min_ratio, self.power = decay, min_ratio, power
        self.base_lrs = [g.setdefault("initial_lr", g["lr"]) for g in optimizer.param_groups]
        self.last_step = 0
        self._apply()

    def factor(self) -> float:
        return lr_factor(
            self.last_step,
            self.total_steps,
            self.warmup_steps,
            self.decay,
            self.min_ratio,
            self.power,
        )

    def _apply(self) -> None:
        f = self.factor()
        for group, base in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
            group["lr"] = base * f

    def step(self) -> None:
        self.last_step += 1
        self._apply()

    @property
    def lr(self) -> float:
        """Current lr of the first param group."""
        return float(self.optimizer.param_groups[0]["lr"])

    def state_dict(self) -> dict[str, int]:
        return {"last_step": self.last_step}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.last_step = int(state["last_step"])
        self._apply()
