"""Loading a classifier for ``eval``/``predict`` from any supported file, and exporting ours.

Accepted files (sniffed from their content, not their names):

- our ``*.safetensors`` (``best.safetensors``/``last.safetensors`` of a run, or a run
  directory, which means its ``best.safetensors``): ppma_models' safetensors layout, so
  ``ppma_models.load_model`` reads them too; the classifier's own description (class names,
  input size, normalisation, data set) is the JSON string under the ``classify`` metadata key.
- our training states (``last.pt``/``best.pt``): EMA weights when the run kept them, unless
  ``weights="model"``.
- the authors' ImageNet ``.pth`` files (``model``/``model_ema``/``args``): EMA weights by
  default; 224x224 RGB input with ImageNet normalisation; class names ``class_0..class_999``
  unless a class-names file is given.

Files are untrusted input: whatever is wrong with one (a damaged header, metadata of the
wrong type or size, tensors that do not fit, integer data for float weights) is one
:class:`CheckpointError` naming the file. Our metadata is checked with ppma_models' own
checks of a model file's config (types and ``CONFIG_LIMITS``), and a training state's model
is built on the ``meta`` device and compared with the file before any memory is allocated.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ppma_models
import torch
from ppma_models import checkpoint
from ppma_models.checkpoint import (
    CONFIG_LIMITS,
    LoadResult,
    check_dtypes,
    load_checkpoint,
    read_checkpoint,
    save_safetensors,
)
from ppma_models.checkpoint import CheckpointError as ModelCheckpointError
from ppma_models.convert import convert_from_upstream, is_upstream_state_dict

from apps.engine.checkpoint import CheckpointError, atomic_path, load_training_state

__all__ = [
    "LoadedClassifier",
    "build_model",
    "config_problem",
    "export_classifier",
    "load_classifier",
    "load_state_checked",
]

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
META_KEY = "classify"
MAX_INPUT_SIZE = 1 << 14  # pixels per side; far above any input these models are trained on


@dataclass
class LoadedClassifier:
    """A model in eval mode plus what is needed to feed it and name its outputs."""

    model: ppma_models.PPMA
    class_names: list[str]
    input_size: tuple[int, int]
    mean: list[float]
    std: list[float]
    source: str  # "ours (safetensors)", "ours (training state, EMA)", "authors (model_ema)"...

    @property
    def in_chans(self) -> int:
        return self.model.in_chans


def config_problem(data: object) -> str | None:
    """What makes a PPMAConfig dict unusable, or None.

    The library's checks of a model file's config (JSON types, :data:`CONFIG_LIMITS`) come
    first, so arithmetic never meets a string and no huge model is built; then PPMAConfig's
    own consistency checks. Widths below 1 are named on their own: the library reports them
    only as outside its limits.
    """
    if isinstance(data, dict):
        for name in ("dims", "head_hidden"):
            value = data.get(name)
            values = value if isinstance(value, list) else [value]
            if any(isinstance(v, int) and not isinstance(v, bool) and v < 1 for v in values):
                return f"{name} must be >= 1, got {value}"
    problem = checkpoint.config_problem(data)
    if problem is not None:
        return problem
    try:
        ppma_models.PPMAConfig.from_dict(data)
    except (TypeError, ValueError) as exc:
        return str(exc)
    return None


def build_model(meta: Mapping[str, Any], attention: str = "native") -> ppma_models.PPMA:
    """The architecture described by a checkpoint's meta (``model``, ``model_config``);
    ``meta`` must have passed :func:`_check_training_meta`."""
    config = ppma_models.PPMAConfig.from_dict(dict(meta["model_config"]))
    return ppma_models.PPMA(
        config, num_classes=int(meta["num_classes"]), attention=attention, name=meta["model"]
    )


def export_classifier(module: torch.nn.Module, path: Path, meta: Mapping[str, Any]) -> None:
    """Trainer export hook: ppma_models safetensors + our meta, written atomically."""
    with atomic_path(path) as tmp:
        save_safetensors(
            module,
            tmp,
            class_names=list(meta["class_names"]),
            metadata={META_KEY: json.dumps(dict(meta), sort_keys=True)},
        )


def _is_safetensors(path: Path) -> bool:
    with path.open("rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{"


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _description_problems(meta: Mapping[str, Any], classes: int, chans: int) -> list[str]:
    """What is wrong with the class names, input size and normalisation of ``meta``."""
    names, size = meta.get("class_names"), meta.get("input_size")
    mean, std = meta.get("mean"), meta.get("std")
    checks = {
        "class_names": isinstance(names, list)
        and len(names) == classes
        and all(isinstance(n, str) for n in names),
        "input_size": isinstance(size, list)
        and len(size) == 2
        and all(_is_int(v) and 1 <= v <= MAX_INPUT_SIZE for v in size),
        "mean": isinstance(mean, list) and len(mean) == chans and all(map(_is_real, mean)),
        "std": isinstance(std, list)
        and len(std) == chans
        and all(_is_real(v) and v > 0 for v in std),
    }
    shown = {"class_names": names, "input_size": size, "mean": mean, "std": std}
    return [f"{k}={_short(shown[k])}" for k, ok in checks.items() if not ok]


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _from_meta(model, meta: object, source: str, path: Path) -> LoadedClassifier:
    """The loaded classifier, once ``meta`` is known to describe ``model``'s inputs/outputs."""
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: the classifier metadata is not a JSON object")
    bad = _description_problems(meta, model.num_classes, model.in_chans)
    if bad:
        raise CheckpointError(
            f"{path}: invalid classifier metadata (for {model.num_classes} classes, "
            f"{model.in_chans} input channels): {', '.join(bad)}"
        )
    return LoadedClassifier(
        model.eval(),
        list(meta["class_names"]),
        tuple(meta["input_size"]),
        list(meta["mean"]),
        list(meta["std"]),
        source,
    )


def _check_training_meta(meta: object, path: Path) -> None:
    """Raise unless a training state's ``meta`` describes a buildable classifier."""
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: the training state has no metadata dict")
    if meta.get("task") != "classification":
        raise CheckpointError(f"{path} is not a classification checkpoint")
    problem = config_problem(meta.get("model_config"))
    if problem is not None:
        raise CheckpointError(f"{path}: the recorded model_config is not usable: {problem}")
    classes, name = meta.get("num_classes"), meta.get("model")
    if not (_is_int(classes) and 1 <= classes <= CONFIG_LIMITS["classes"]):
        raise CheckpointError(f"{path}: invalid num_classes {_short(classes)}")
    if not isinstance(name, str | None):
        raise CheckpointError(f"{path}: invalid model name {_short(name)}")


def _state_tensors(state: Mapping[str, Any], use_ema: bool, path: Path) -> dict:
    """The weights of a training state: a dict of tensors, or a CheckpointError."""
    entry = state.get("ema") if use_ema else state
    weights = entry.get("module" if use_ema else "model") if isinstance(entry, dict) else None
    if not isinstance(weights, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in weights.items()
    ):
        what = "EMA weights" if use_ema else "model weights"
        raise CheckpointError(f"{path}: the training state's {what} are not a state dict")
    return weights


def load_state_checked(
    build: Callable[[str], torch.nn.Module],
    weights: Mapping[str, torch.Tensor],
    path: Path,
    attention: str,
) -> torch.nn.Module:
    """``build(attention)`` loaded with ``weights``, all shapes and dtypes checked first.

    The model is first built on the ``meta`` device, which allocates nothing, so a recorded
    architecture far larger than the file is refused before any memory is spent on it.
    ``load_state_dict`` would cast integer data into float weights without a word; the
    library's dtype check refuses that (and reports float precision changes).
    """
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in build("reference").state_dict().items()}
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
    model = build(attention)
    own = model.state_dict()
    try:
        check_dtypes(weights, own, LoadResult(str(path), "training state"))
    except ModelCheckpointError as exc:
        raise CheckpointError(str(exc)) from None
    model.load_state_dict(weights)
    return model


def _generic(model, class_names: Sequence[str] | None, source: str) -> LoadedClassifier:
    names = list(class_names) if class_names else [f"class_{i}" for i in range(model.num_classes)]
    if len(names) != model.num_classes:
        raise CheckpointError(
            f"--class-names lists {len(names)} names but the model has {model.num_classes} classes"
        )
    if model.in_chans == 3:
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    else:
        mean, std = [0.5] * model.in_chans, [0.25] * model.in_chans
    return LoadedClassifier(model.eval(), names, (224, 224), mean, std, source)


def _json(text: str, path: Path) -> object:
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise CheckpointError(f"{path}: metadata {META_KEY!r} is not valid JSON ({exc})") from None


def _from_training_state(
    state: Mapping[str, Any], path: Path, weights: str, attention: str
) -> LoadedClassifier:
    meta = state.get("meta")
    _check_training_meta(meta, path)
    use_ema = weights == "ema" and state.get("ema") is not None
    tensors = _state_tensors(state, use_ema, path)
    model = load_state_checked(lambda att: build_model(meta, att), tensors, path, attention)
    kind = "EMA" if use_ema else "raw"
    return _from_meta(model, meta, f"ours (training state, {kind} weights)", path)


def load_classifier(
    path: str | os.PathLike,
    *,
    weights: str = "ema",
    model_name: str | None = None,
    class_names: Sequence[str] | None = None,
    attention: str = "native",
) -> LoadedClassifier:
    """Build and load the classifier stored in ``path`` (see the module docstring).

    weights: "ema" (default) or "model" -- which weights of a file holding both.
    model_name: registry name for an authors' file whose ``args`` do not say it.
    class_names: names for a file that carries none (the authors' files).
    """
    if weights not in ("ema", "model"):
        raise ValueError(f"weights must be 'ema' or 'model', got {weights!r}")
    path = Path(path)
    if path.is_dir():
        path = path / "best.safetensors"
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        if _is_safetensors(path):
            model = ppma_models.checkpoint.load_model(path, attention=attention)
            if model.features_only:
                raise CheckpointError(f"{path} holds a backbone without a classifier head")
            _, info = read_checkpoint(path)
            meta = info.metadata.get(META_KEY)
            if meta is not None:
                return _from_meta(model, _json(meta, path), "ours (safetensors)", path)
            stored = getattr(model, "class_names", None)
            return _generic(model, class_names or stored, "ppma_models safetensors")
        try:
            state = load_training_state(path)
        except CheckpointError:
            state = None
        if state is not None:
            return _from_training_state(state, path, weights, attention)
        # The authors' files.
        entry = "model_ema" if weights == "ema" else "model"
        if model_name is not None:
            raw, _ = read_checkpoint(path, weights=entry)
            if is_upstream_state_dict(raw):
                raw = convert_from_upstream(raw)
            fc = raw.get("head.fc.weight")
            if fc is None:
                raise CheckpointError(f"{path}: no classifier head in the file")
            model = ppma_models.create_model(
                model_name, num_classes=fc.shape[0], attention=attention
            )
        else:
            model = ppma_models.checkpoint.load_model(path, attention=attention)
        load_checkpoint(model, path, weights=entry)
        return _generic(model, class_names, f"authors ({entry})")
    except ModelCheckpointError as exc:
        raise CheckpointError(str(exc)) from exc
