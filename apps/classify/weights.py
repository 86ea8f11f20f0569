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
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ppma_models
import torch
from ppma_models.checkpoint import CheckpointError as ModelCheckpointError
from ppma_models.checkpoint import load_checkpoint, read_checkpoint, save_safetensors
from ppma_models.convert import convert_from_upstream, is_upstream_state_dict

from apps.engine.checkpoint import CheckpointError, atomic_path, load_training_state

__all__ = ["LoadedClassifier", "build_model", "export_classifier", "load_classifier"]

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
META_KEY = "classify"


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


def build_model(meta: Mapping[str, Any], attention: str = "native") -> ppma_models.PPMA:
    """The architecture described by a checkpoint's meta (``model``, ``model_config``)."""
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


def _from_meta(model, meta: Mapping[str, Any], source: str) -> LoadedClassifier:
    return LoadedClassifier(
        model.eval(),
        list(meta["class_names"]),
        tuple(meta["input_size"]),
        list(meta["mean"]),
        list(meta["std"]),
        source,
    )


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
                return _from_meta(model, json.loads(meta), "ours (safetensors)")
            stored = getattr(model, "class_names", None)
            return _generic(model, class_names or stored, "ppma_models safetensors")
        try:
            state = load_training_state(path)
        except CheckpointError:
            state = None
        if state is not None:
            meta = state["meta"]
            if meta.get("task") != "classification":
                raise CheckpointError(f"{path} is not a classification checkpoint")
            model = build_model(meta, attention)
            use_ema = weights == "ema" and state.get("ema") is not None
            model.load_state_dict(state["ema"]["module"] if use_ema else state["model"])
            kind = "EMA" if use_ema else "raw"
            return _from_meta(model, meta, f"ours (training state, {kind} weights)")
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
