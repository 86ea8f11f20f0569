"""Exponential moving average of model weights (with a warm-up of the decay)."""

from __future__ import annotations

import copy
from typing import Any

import torch

__all__ = ["ModelEMA"]


class ModelEMA:
    """Keeps ``ema = d * ema + (1 - d) * weights`` after each :meth:`update`.

    The effective decay is ``min(decay, (1 + n) / (10 + n))`` after ``n`` updates, so early
    averages are not dominated by the random initialisation. Floating-point buffers (e.g.
    BatchNorm running statistics) are averaged too; integer buffers are copied.
    """

    def __init__(self, model: torch.nn.Module, decay: float = 0.999) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.updates = 0
        self.module = copy.deepcopy(model).eval()
        # (EMA floats, model floats, EMA others, model others) of the model last seen.
        self._source: torch.nn.Module | None = None
        self._cached: tuple[list, list, list, list] = ([], [], [], [])
        for p in self.module.parameters():
            p.requires_grad_(False)

    def current_decay(self) -> float:
        return min(self.decay, (1.0 + self.updates) / (10.0 + self.updates))

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        d = self.current_decay()
        self.updates += 1
        averaged, sources, copied, copy_sources = self._pairs(model)
        # One multi-tensor kernel instead of ~250 tiny lerps: several % of a small model's step.
        torch._foreach_lerp_(averaged, sources, 1.0 - d)
        for target, value in zip(copied, copy_sources, strict=True):
            target.copy_(value)

    def _pairs(self, model: torch.nn.Module) -> tuple[list, list, list, list]:
        """(EMA, model) tensors matched by name, built once per model: walking two state
        dicts every step costs more than the averaging. State-dict tensors share storage with
        the parameters and buffers, which the optimizer and ``load_state_dict`` update in place."""
        if self._source is not model:
            source = model.state_dict()
            pairs = [(v, source[k]) for k, v in self.module.state_dict().items()]
            for ema_value, value in pairs:
                if ema_value.dtype != value.dtype:
                    raise TypeError(
                        f"EMA and model dtypes differ: {ema_value.dtype}, {value.dtype}"
                    )
            floating = [p for p in pairs if p[0].dtype.is_floating_point]
            other = [p for p in pairs if not p[0].dtype.is_floating_point]
            self._cached = (
                [e for e, _ in floating],
                [v for _, v in floating],
                [e for e, _ in other],
                [v for _, v in other],
            )
            self._source = model
        return self._cached

    def state_dict(self) -> dict[str, Any]:
        return {"module": self.module.state_dict(), "updates": self.updates, "decay": self.decay}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["module"])
        self.updates = int(state["updates"])
        self.decay = float(state["decay"])
