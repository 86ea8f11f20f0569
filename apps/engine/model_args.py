"""``--model-arg KEY=VALUE`` overrides of a model config, shared by the apps' command lines."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

__all__ = ["parse_model_args"]


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
