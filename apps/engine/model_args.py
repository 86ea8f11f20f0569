"""``--model-arg KEY=VALUE`` overrides of a registered model's config, for every app.

:func:`model_overrides` is what a ``train`` command calls: it parses the items, completes the
per-stage fields for a model with fewer stages, and checks the result as a model file's config
is checked, so a bad value is one :class:`~apps.engine.options.OptionError` naming
``--model-arg`` before any work. :func:`overrides_problem` is the same check for overrides read
back from a checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable
from typing import Any

from ppma_models import PPMAConfig, get_config
from ppma_models.checkpoint import config_problem as file_config_problem

from apps.engine.options import OptionError

__all__ = [
    "config_problem",
    "model_overrides",
    "overrides_problem",
    "parse_model_args",
    "with_stage_count",
]


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_model_args(items: Iterable[str] | None) -> dict[str, Any]:
    """``["dims=32,64", "head_hidden=256"]`` -> ``{"dims": (32, 64), "head_hidden": 256}``.

    Values are JSON where they parse (numbers, true/false) and strings otherwise; a comma makes
    a tuple. Raises OptionError for an item without ``=``.
    """
    overrides: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise OptionError(f"--model-arg expects KEY=VALUE, got {item!r}")
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


def _any_below_one(value: object) -> bool:
    values = value if isinstance(value, list) else [value]
    return any(isinstance(v, int) and not isinstance(v, bool) and v < 1 for v in values)


def config_problem(data: object) -> str | None:
    """What makes a PPMAConfig dict (JSON types: lists, not tuples) unusable, or None.

    The library's checks of a model file's config (JSON types, ``CONFIG_LIMITS``) come first,
    so arithmetic never meets a string and no huge model is built; then PPMAConfig's own
    consistency checks. Widths below 1 are named on their own: the library reports them only
    as outside its limits.
    """
    if isinstance(data, dict):
        small = [k for k in ("dims", "head_hidden") if _any_below_one(data.get(k))]
        if small:
            return f"{small[0]} must be >= 1, got {data[small[0]]}"
    problem = file_config_problem(data)
    if problem is not None:
        return problem
    try:
        PPMAConfig.from_dict(data)
    except (TypeError, ValueError) as exc:
        return str(exc)
    return None


def overrides_problem(model: str, overrides: dict[str, Any]) -> str | None:
    """What makes the registered ``model`` with ``overrides`` unusable, or None."""
    try:
        base = get_config(model)
    except ValueError as exc:
        return str(exc)
    known = {f.name for f in dataclasses.fields(base)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        return f"unknown PPMAConfig field(s) {unknown}; known: {sorted(known)}"
    plain = {k: list(v) if isinstance(v, tuple) else v for k, v in overrides.items()}
    return config_problem({**base.to_dict(), **plain})


def model_overrides(
    model: str, items: Iterable[str] | None, *, model_option: str = "--model"
) -> dict[str, Any]:
    """``--model-arg`` items as checked overrides of the registered ``model`` (named by
    ``model_option``), the per-stage fields completed for fewer stages
    (:func:`with_stage_count`)."""
    try:
        base = get_config(model)
    except ValueError as exc:
        raise OptionError(f"{model_option} {model}: {exc}") from None
    overrides = with_stage_count(base, parse_model_args(items))
    problem = overrides_problem(model, overrides)
    if problem is not None:
        raise OptionError(f"--model-arg: {problem}")
    return overrides
