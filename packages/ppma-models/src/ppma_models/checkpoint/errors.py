"""The exceptions and warnings of checkpoint reading and loading."""

from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint file is unreadable, unsafe, or does not fit the model."""


class CheckpointWarning(UserWarning):
    """A checkpoint was loaded, but not exactly as stored (e.g. its float precision changed)."""
