"""``--model-arg KEY=VALUE`` overrides of a model config, shared by the apps' command lines."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable
from typing import Any

__all__ = ["parse_model_args", "with_stage_count"]


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_model_args(items: Iterable[str] | None) -> dict[str, Any]:
    """``["dims=32,64", "head_hidden=256"]`` -> ``{"dims": (32, 64), "head_hidden": 256}``.

    Values are JSON where they parse (numbers, true/false) and strings otherwise; a comma makes
    a tuple. Raises ValueError for an item without ``=``.
    """
    overrides: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--model-arg expects KEY=VALUE, got {item!r}")
        parts = [_parse_value(v.strip()) for v in value.split(",")]
        overrides[key.strip()] = tuple(parts) if "," in value else parts[0]
    return overrides


def with_stage_count(base: Any, overrides: dict[str, Any]) -> dict[str, Any]:
    """``overrides`` completed for a model with fewer stages than the dataclass ``base``.

    When ``dims`` has fewer entries than ``base.dims``, each per-stage field (a tuple as long
    as ``base.dims``) that ``overrides`` leave out keeps its first entries, so
    ``dims=32,64,128 depths=1,2,1`` is a three-stage model without spelling out heads, MLP
    ratios and attention kinds. More stages than the base: returned unchanged (the config's
    own check names the fields still missing).
    """
    dims = overrides.get("dims")
    stages = len(base.dims)
    if not isinstance(dims, tuple | list) or len(dims) >= stages:
        return dict(overrides)
    completed = dict(overrides)
    for f in dataclasses.fields(base):
        value = getattr(base, f.name)
        if f.name not in overrides and isinstance(value, tuple) and len(value) == stages:
            completed[f.name] = value[: len(dims)]
    return completed
