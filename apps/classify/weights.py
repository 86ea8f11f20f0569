"""Loading a classifier for ``eval``/``predict`` from any supported file.

Accepted files (sniffed from their content, not their names):

- our ``*.safetensors`` (``best.safetensors``/``last.safetensors`` of a run, or a run
  directory, which means its ``best.safetensors``): ppma_models' safetensors layout, so
  ``ppma_models.load_model`` reads them too; the run spec (:mod:`apps.engine.runspec`), whose
  model description holds the class names, input size and normalisation, is the JSON string
  under the ``classify`` metadata key.
- our training states (``last.pt``/``best.pt``): EMA weights when the run kept them, unless
  ``weights="model"``.
- the authors' ImageNet ``.pth`` files (``model``/``model_ema``/``args``): EMA weights by
  default; the input size and normalisation of the model's pretrained settings
  (``ppma_models.get_pretrained_cfg``); class names ``class_0..class_999`` unless a
  class-names file is given.

Runs written before run specs stored the model description as the whole metadata (with
``task: "classification"``); :func:`read_run_spec` converts that layout.

Files are untrusted input: whatever is wrong with one (a damaged header, metadata of the
wrong type or size, tensors that do not fit, integer data for float weights) is one
``ppma_models.CheckpointError`` naming the file. The recorded config is checked with
ppma_models' own checks of a model file's config (types and ``CONFIG_LIMITS``), and a
training state's model is built on the ``meta`` device and compared with the file before any
memory is allocated.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ppma_models
from ppma_models import CheckpointError, PretrainedCfg
from ppma_models.checkpoint import CONFIG_LIMITS, load_checkpoint, read_checkpoint
from ppma_models.convert import convert_from_upstream, is_upstream_state_dict

from apps.engine.checkpoint import load_training_state
from apps.engine.model_args import config_problem
from apps.engine.runspec import RUN_FORMAT, RunSpec, is_run_spec
from apps.engine.values import is_int, is_real, short
from apps.engine.weights import app_metadata, is_safetensors, load_state_checked, state_weights

__all__ = ["APP", "LoadedClassifier", "build_model", "load_classifier", "read_run_spec"]

APP = "classify"
MAX_INPUT_SIZE = 1 << 14  # pixels per side; far above any input these models are trained on
#: The model description of a classifier run (also the keys of the first metadata layout).
MODEL_KEYS = (
    "model", "model_config", "num_classes", "class_names", "in_chans", "input_size", "mean", "std",
)  # fmt: skip
#: The settings a run resolves from the data (the sources recorded with it).
RESOLVED = ("input_size", "batch_size", "epochs", "warmup")


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


def _first_layout(meta: Mapping[str, Any], path: Path) -> RunSpec:
    """The run spec of a checkpoint written before run specs (its meta flat)."""
    recipe, sources = meta.get("recipe"), meta.get("resolved_from")
    if isinstance(recipe, dict):
        recipe = dict(recipe)
        recipe["legacy_drop_last"] = bool(meta.get("legacy_drop_last", False))
        if sources is None:  # a run from before defaults were resolved from the data
            size = meta.get("input_size")
            if not (isinstance(size, list) and size and is_int(size[0])):
                raise CheckpointError(f"{path}: the recorded input_size is damaged")
            recipe["input_size"] = size[0]
            recipe["legacy_drop_last"] = True  # it dropped every short last batch; keep its steps
            sources = dict.fromkeys(RESOLVED, "as in the resumed run")
    converted = {
        "format": RUN_FORMAT,
        "app": APP,
        "recipe": recipe if isinstance(recipe, dict) else None,
        "resolved_from": {} if sources is None else sources,
        "model": {k: meta[k] for k in MODEL_KEYS if k in meta},
        "data": {"dataset": meta.get("dataset")},
    }
    return RunSpec.from_meta(converted, str(path))


def read_run_spec(meta: object, path: Path) -> RunSpec:
    """The run spec of a classifier checkpoint's meta, in either layout."""
    if is_run_spec(meta):
        spec = RunSpec.from_meta(meta, str(path))
    elif isinstance(meta, dict) and meta.get("task") == "classification":
        spec = _first_layout(meta, path)
    else:
        raise CheckpointError(f"{path} is not a classification checkpoint")
    if spec.app != APP:
        raise CheckpointError(f"{path} is not a classification checkpoint")
    return spec


def _description_problems(model: Mapping[str, Any], classes: int, chans: int) -> list[str]:
    """What is wrong with the class names, input size and normalisation of a description."""
    names, size = model.get("class_names"), model.get("input_size")
    mean, std = model.get("mean"), model.get("std")
    checks = {
        "class_names": isinstance(names, list)
        and len(names) == classes
        and all(isinstance(n, str) for n in names),
        "input_size": isinstance(size, list)
        and len(size) == 2
        and all(is_int(v) and 1 <= v <= MAX_INPUT_SIZE for v in size),
        "mean": isinstance(mean, list) and len(mean) == chans and all(map(is_real, mean)),
        "std": isinstance(std, list)
        and len(std) == chans
        and all(is_real(v) and v > 0 for v in std),
    }
    shown = {"class_names": names, "input_size": size, "mean": mean, "std": std}
    return [f"{k}={short(shown[k])}" for k, ok in checks.items() if not ok]


def _loaded(model, spec: RunSpec, source: str, path: Path) -> LoadedClassifier:
    """The loaded classifier, once the description is known to fit ``model``."""
    bad = _description_problems(spec.model, model.num_classes, model.in_chans)
    if bad:
        raise CheckpointError(
            f"{path}: invalid classifier metadata (for {model.num_classes} classes, "
            f"{model.in_chans} input channels): {', '.join(bad)}"
        )
    desc = spec.model
    return LoadedClassifier(
        model.eval(), list(desc["class_names"]), tuple(desc["input_size"]),
        list(desc["mean"]), list(desc["std"]), source,
    )  # fmt: skip


def _check_buildable(model: Mapping[str, Any], path: Path) -> None:
    """Raise unless a model description names a classifier that can be built."""
    problem = config_problem(model.get("model_config"))
    if problem is not None:
        raise CheckpointError(f"{path}: the recorded model_config is not usable: {problem}")
    classes, name = model.get("num_classes"), model.get("model")
    if not (is_int(classes) and 1 <= classes <= CONFIG_LIMITS["classes"]):
        raise CheckpointError(f"{path}: invalid num_classes {short(classes)}")
    if not isinstance(name, str | None):
        raise CheckpointError(f"{path}: invalid model name {short(name)}")


def build_model(model: Mapping[str, Any]) -> ppma_models.PPMA:
    """The classifier a run's model description names (``model``, ``model_config``,
    ``num_classes``), once it passed the checks of :func:`_check_buildable`."""
    config = ppma_models.PPMAConfig.from_dict(dict(model["model_config"]))
    return ppma_models.PPMA(config, num_classes=int(model["num_classes"]), name=model["model"])


def _from_training_state(state: Mapping[str, Any], path: Path, weights: str) -> LoadedClassifier:
    spec = read_run_spec(state.get("meta"), path)
    _check_buildable(spec.model, path)
    use_ema = weights == "ema" and state.get("ema") is not None
    tensors = state_weights(state, use_ema, path)
    model = load_state_checked(lambda: build_model(spec.model), tensors, path)
    kind = "EMA" if use_ema else "raw"
    return _loaded(model, spec, f"ours (training state, {kind} weights)", path)


def _pretrained_cfg(model: ppma_models.PPMA) -> PretrainedCfg:
    """How the weights of a file without our description expect their input: the registered
    model's pretrained settings when it has the file's channels, else the library's default."""
    try:
        cfg = ppma_models.get_pretrained_cfg(model.name or "")
    except ValueError:  # a name the registry does not know
        cfg = None
    if cfg is None or cfg.input_size[0] != model.in_chans:
        cfg = PretrainedCfg.for_channels(model.in_chans)
    return cfg


def _generic(model, class_names: Sequence[str] | None, source: str) -> LoadedClassifier:
    names = list(class_names) if class_names else [f"class_{i}" for i in range(model.num_classes)]
    if len(names) != model.num_classes:
        raise CheckpointError(
            f"--class-names lists {len(names)} names but the model has {model.num_classes} classes"
        )
    cfg = _pretrained_cfg(model)
    size = tuple(cfg.input_size[1:])
    return LoadedClassifier(model.eval(), names, size, list(cfg.mean), list(cfg.std), source)


def _from_safetensors(path: Path, class_names: Sequence[str] | None) -> LoadedClassifier:
    model = ppma_models.load_model(path)
    if not isinstance(model, ppma_models.PPMA) or model.features_only:
        raise CheckpointError(f"{path} holds no classifier (a backbone or another kind of model)")
    meta = app_metadata(path, APP)
    if meta is not None:
        return _loaded(model, read_run_spec(meta, path), "ours (safetensors)", path)
    stored = getattr(model, "class_names", None)
    return _generic(model, class_names or stored, "ppma_models safetensors")


def _from_authors(
    path: Path, entry: str, model_name: str | None, class_names: Sequence[str] | None
) -> LoadedClassifier:
    if model_name is not None:
        raw, _ = read_checkpoint(path, weights=entry)
        if is_upstream_state_dict(raw):
            raw = convert_from_upstream(raw)
        fc = raw.get("head.fc.weight")
        if fc is None:
            raise CheckpointError(f"{path}: no classifier head in the file")
        model = ppma_models.create_model(model_name, num_classes=fc.shape[0])
    else:
        model = ppma_models.load_model(path)
    load_checkpoint(model, path, weights=entry)
    return _generic(model, class_names, f"authors ({entry})")


def load_classifier(
    path: str | os.PathLike,
    *,
    weights: str = "ema",
    model_name: str | None = None,
    class_names: Sequence[str] | None = None,
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
    if is_safetensors(path):
        return _from_safetensors(path, class_names)
    try:
        state = load_training_state(path)
    except CheckpointError:
        state = None
    if state is not None:
        return _from_training_state(state, path, weights)
    entry = "model_ema" if weights == "ema" else "model"
    return _from_authors(path, entry, model_name, class_names)
