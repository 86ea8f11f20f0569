"""The apps' weights files, and loading weights into a model only once they are known to fit.

Every app writes ``best.safetensors``/``last.safetensors`` in ppma_models' safetensors layout
(:func:`ppma_models.save_safetensors`), so ``ppma_models.load_model`` rebuilds the network from
the file alone; the app's run spec (:mod:`apps.engine.runspec`) rides along as a JSON string
under the app's name in the metadata (``{"classify": "{...}"}``). Runs written before this
layout are read by the apps from :func:`apps.engine.checkpoint.load_weights`' layout.

Files are untrusted input: :func:`load_state_checked` compares a state dict with the model it
should fill -- built first on the ``meta`` device, which allocates nothing -- and checks the
kinds of data, so a damaged or forged file is one :class:`~ppma_models.CheckpointError` naming
it rather than a huge allocation or a silent cast.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import ppma_models
import torch
from ppma_models import CheckpointError
from ppma_models.checkpoint import LoadResult, check_dtypes

from apps.engine.checkpoint import atomic_path, load_training_state, load_weights
from apps.engine.runspec import RunSpec

Spec = TypeVar("Spec")

__all__ = [
    "app_metadata",
    "is_safetensors",
    "load_state_checked",
    "state_weights",
    "weights_exporter",
]


def is_safetensors(path: Path) -> bool:
    """Whether ``path`` starts like a safetensors file (a header length, then JSON)."""
    with Path(path).open("rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{"


def weights_exporter(
    app: str, class_names: Sequence[str] | None = None
) -> Callable[[torch.nn.Module, Path, Mapping[str, Any]], None]:
    """The Trainer's export hook: ``module`` in ppma_models' layout, with ``meta`` (the run
    spec plus the epoch) as JSON under ``app`` in the metadata; written atomically."""
    names = None if class_names is None else list(class_names)

    def export(module: torch.nn.Module, path: Path, meta: Mapping[str, Any]) -> None:
        with atomic_path(path) as tmp:
            ppma_models.save_safetensors(
                module, tmp, class_names=names, metadata={app: json.dumps(dict(meta))}
            )

    return export


def app_metadata(path: str | Path, app: str) -> object | None:
    """The JSON value stored under ``app`` in a safetensors file's metadata; None when the
    file holds none (written by another program, or in an older layout)."""
    text = ppma_models.read_metadata(path).get(app)
    if text is None:
        return None
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise CheckpointError(f"{path}: metadata {app!r} is not valid JSON ({exc})") from None


def state_weights(state: Mapping[str, Any], use_ema: bool, path: Path) -> dict:
    """The model weights (or EMA weights) of a training state, checked to be a state dict."""
    entry = state.get("ema") if use_ema else state
    weights = entry.get("module" if use_ema else "model") if isinstance(entry, dict) else None
    if not isinstance(weights, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in weights.items()
    ):
        what = "EMA weights" if use_ema else "model weights"
        raise CheckpointError(f"{path}: the training state's {what} are not a state dict")
    return weights


def load_state_checked(
    build: Callable[[], torch.nn.Module], weights: Mapping[str, torch.Tensor], path: Path
) -> torch.nn.Module:
    """``build()`` loaded with ``weights``, every name, shape and kind of data checked first.

    The model is first built on the ``meta`` device, which allocates nothing, so a recorded
    architecture far larger than the file is refused before any memory is spent on it.
    ``load_state_dict`` would cast integer data into float weights without a word; the
    library's dtype check refuses that (and converts other float precisions with a warning).
    """
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in build().state_dict().items()}
    wrong = [
        f"{k}: file {tuple(weights[k].shape)} vs model {shape}"
        for k, shape in expected.items()
        if k in weights and tuple(weights[k].shape) != shape
    ]
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if wrong or missing or unexpected:
        raise CheckpointError(
            f"{path}: the weights do not fit the recorded model: {len(wrong)} shape(s) differ "
            f"{wrong[:4]}, {len(missing)} missing {missing[:4]}, "
            f"{len(unexpected)} unexpected {unexpected[:4]}"
        )
    model = build()
    check_dtypes(weights, model.state_dict(), LoadResult(str(path), "weights"))
    model.load_state_dict(weights)
    return model


def load_run(
    path: str | Path,
    *,
    app: str,
    read_run_spec: Callable[[object, Path], RunSpec],
    parse_spec: Callable[[Any], Spec],
    build: Callable[[Spec], torch.nn.Module],
    stored_problem: Callable[[torch.nn.Module, Spec], str | None],
) -> tuple[torch.nn.Module, RunSpec]:
    """The model (in eval mode) and the run spec of an app's checkpoint.

    path: a run directory (its best.safetensors), a ``.safetensors`` weights file (our layout,
    or the earlier one: the state dict with the run's meta as JSON) or a ``.pt`` training
    state (its EMA weights when present). read_run_spec turns the stored meta into the run
    spec (older layouts included); parse_spec reads the model spec from ``run.model``; build
    makes the model it describes; stored_problem says what is wrong with a model
    ``ppma_models.load_model`` rebuilt from our layout (None when it is the recorded one).
    """
    path = Path(path)
    if path.is_dir():
        path = path / "best.safetensors"
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    state = weights = None
    if not is_safetensors(path):
        state = load_training_state(path)
        meta = state.get("meta")
    elif (meta := app_metadata(path, app)) is None:  # the earlier layout
        weights, meta = load_weights(path)
    run = read_run_spec(meta, path)
    try:
        spec = parse_spec(run.model)
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    if state is not None:
        weights = state_weights(state, isinstance(state.get("ema"), dict), path)
    if weights is not None:
        model = load_state_checked(lambda: build(spec), weights, path)
    else:
        model = ppma_models.load_model(path)
        problem = stored_problem(model, spec)
        if problem is not None:
            raise CheckpointError(f"{path}: {problem}")
    return model.eval(), run
