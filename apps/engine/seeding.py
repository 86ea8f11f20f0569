"""Seeds and random-generator state (torch, NumPy, Python) as plain tensors.

Training re-derives every generator from ``(seed, epoch, rank)`` at the start of each epoch
(:func:`seed_for`), so an epoch's randomness -- shuffling, augmentation, dropout, drop path --
does not depend on how the run got there: resuming from an epoch-boundary checkpoint replays
exactly what an uninterrupted run does. :func:`capture_rng_state` / :func:`restore_rng_state`
additionally carry the generators' states through a checkpoint as tensors, so the file loads
with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import math
import random

import numpy as np
import torch

__all__ = ["capture_rng_state", "restore_rng_state", "seed_everything", "seed_for"]


def seed_for(seed: int, *parts: int) -> int:
    """A well-mixed 31-bit seed derived from ``seed`` and e.g. ``(epoch, rank)``."""
    return int(np.random.SeedSequence([seed, *parts]).generate_state(1)[0] & 0x7FFFFFFF)


def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, NumPy's global generator and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed)  # noqa: NPY002 -- the global generator is what libraries use
    torch.manual_seed(seed)  # also seeds every CUDA device


def capture_rng_state() -> dict[str, torch.Tensor]:
    """The current generator states, as tensors only (safe for ``weights_only`` loading)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()  # noqa: NPY002
    if kind != "MT19937":
        raise RuntimeError(f"unexpected NumPy generator {kind!r}")
    version, py_state, py_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
        "numpy_pos": torch.tensor([pos, has_gauss], dtype=torch.int64),
        "numpy_gauss": torch.tensor(cached, dtype=torch.float64),
        "python": torch.tensor([version, *py_state], dtype=torch.int64),
        "python_gauss": torch.tensor(
            math.nan if py_gauss is None else py_gauss, dtype=torch.float64
        ),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: dict[str, torch.Tensor]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    torch.set_rng_state(state["torch"].cpu())
    pos, has_gauss = (int(v) for v in state["numpy_pos"])
    np.random.set_state(  # noqa: NPY002
        (
            "MT19937",
            state["numpy_keys"].numpy().astype(np.uint32),
            pos,
            has_gauss,
            float(state["numpy_gauss"]),
        )
    )
    py = [int(v) for v in state["python"]]
    gauss = float(state["python_gauss"])
    random.setstate((py[0], tuple(py[1:]), None if math.isnan(gauss) else gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"].cpu())
