"""The run spec: what a training run is, stored with every checkpoint it writes.

A run spec holds the *recipe* (the resolved values of the options that define the run, which
``--resume`` restores), where each setting fitted to the data came from (so a resumed run
prints the same settings table), and the app's descriptions of its *model* (enough to rebuild
the network and feed it: class names, input size, normalisation, head sizes...) and its
*data* (enough for ``eval`` to find the validation images again). It is a plain JSON-able
dict: the ``meta`` of ``last.pt``/``best.pt``, and the JSON string under the app's name in the
metadata of ``last.safetensors``/``best.safetensors``::

    {"format": "ppma-run/1", "app": "segment", "recipe": {...}, "resolved_from": {...},
     "model": {...}, "data": {...}}

Files are untrusted input: :meth:`RunSpec.from_meta` checks the types of these fields and
raises :class:`~ppma_models.CheckpointError` naming the file; each app checks the inside of
its own ``model`` and ``data`` descriptions. Checkpoints written before run specs existed are
converted by the app that wrote them (``Task.read_run_spec``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ppma_models import CheckpointError

from apps.engine.values import short

__all__ = ["RUN_FORMAT", "RunSpec", "is_run_spec"]

RUN_FORMAT = "ppma-run/1"


def is_run_spec(meta: object) -> bool:
    """Whether ``meta`` is in the run-spec layout (rather than an app's older one)."""
    return isinstance(meta, Mapping) and meta.get("format") == RUN_FORMAT


@dataclass(frozen=True)
class RunSpec:
    """What a run is: its app, model and data descriptions, recipe and setting sources.

    ``recipe`` is None for runs recorded before recipes were (their ``--resume`` keeps the
    command line); ``sources`` maps a setting name (``"epochs"``) to where it came from.
    """

    app: str
    model: dict[str, Any]
    data: dict[str, Any]
    recipe: dict[str, Any] | None = None
    sources: dict[str, str] = field(default_factory=dict)

    def to_meta(self) -> dict[str, Any]:
        """The plain dict stored in checkpoints."""
        return {
            "format": RUN_FORMAT,
            "app": self.app,
            "recipe": None if self.recipe is None else dict(self.recipe),
            "resolved_from": dict(self.sources),
            "model": dict(self.model),
            "data": dict(self.data),
        }

    @classmethod
    def from_meta(cls, meta: object, where: str) -> RunSpec:
        """The spec a checkpoint recorded; CheckpointError naming ``where`` (the file) when a
        field is missing or of the wrong type."""
        if not is_run_spec(meta):
            raise CheckpointError(f"{where}: no run description (format {RUN_FORMAT!r}) in it")
        checks = {
            "app": lambda v: isinstance(v, str),
            "recipe": lambda v: v is None or (isinstance(v, dict) and all(map(_is_name, v))),
            "resolved_from": lambda v: (
                isinstance(v, dict)
                and all(_is_name(k) and isinstance(s, str) for k, s in v.items())
            ),
            "model": lambda v: isinstance(v, dict),
            "data": lambda v: isinstance(v, dict),
        }
        bad = [f"{k}={short(meta.get(k))}" for k, ok in checks.items() if not ok(meta.get(k))]
        if bad:
            raise CheckpointError(f"{where}: damaged run description: {', '.join(bad)}")
        return cls(
            app=meta["app"],
            model=dict(meta["model"]),
            data=dict(meta["data"]),
            recipe=None if meta["recipe"] is None else dict(meta["recipe"]),
            sources=dict(meta["resolved_from"]),
        )


def _is_name(key: object) -> bool:
    return isinstance(key, str)
