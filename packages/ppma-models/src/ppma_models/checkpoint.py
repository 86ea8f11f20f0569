"""Reading and writing PPMA weights.

Two kinds of files:

* the authors' PyTorch files (``torch.save`` pickles): classification checkpoints — a dict
  with ``model``, ``model_ema``, ``optimizer``, ``epoch`` and an ``args`` argparse.Namespace —
  and mmseg/mmdet checkpoints — ``state_dict`` (or ``model``) with backbone keys under
  ``backbone.`` and per-stage ``outnorm{i}`` LayerNorms. They are read with
  ``torch.load(weights_only=True)`` and an explicit allow-list (only ``argparse.Namespace`` by
  default): a file that needs any other Python object is refused, never unpickled.
* our safetensors files: the state dict in our names plus metadata (model name, config,
  number of classes, optional class names), so :func:`load_model` can rebuild the model.

Files are untrusted input. Whatever is wrong with one (a damaged file, a foreign layout, a
hostile pickle or header) is reported as one :class:`CheckpointError` naming the file:

* :func:`load_model` reads a safetensors file's metadata and tensor shapes from its header,
  checks the metadata's types and :data:`CONFIG_LIMITS`, builds the described model on the
  ``meta`` device, and compares every shape with the header before anything is allocated; so
  a header describing a huge model cannot make it allocate more than the file holds.
* Tensor dtypes: a tensor must be of the same kind as the model's (floating point, integer,
  bool, complex); integer data in a float parameter is refused, since casting it would load
  a silently wrong model. Another floating-point precision (float16, bfloat16, float64, ...)
  is converted to the model's and reported: a :class:`CheckpointWarning` per source dtype
  names the file, the dtype, the number of tensors and whether the values survived exactly,
  and :attr:`LoadResult.converted` lists the tensors.
"""

from __future__ import annotations

import argparse
import json
import math
import pickle
import re
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .config import PPMAConfig
from .convert import (
    AngleMismatchError,
    convert_from_upstream,
    convert_to_upstream,
    is_upstream_state_dict,
)
from .model import PPMA

__all__ = [
    "CONFIG_LIMITS",
    "CheckpointError",
    "CheckpointWarning",
    "LoadResult",
    "adapt_input_channels",
    "check_dtypes",
    "config_problem",
    "load_checkpoint",
    "load_model",
    "read_checkpoint",
    "save_safetensors",
    "save_upstream",
]

#: Classes a checkpoint may contain besides tensors and plain containers.
DEFAULT_ALLOWED_GLOBALS: tuple[type, ...] = (argparse.Namespace,)
#: metadata["format"] of the safetensors files we write.
SAFETENSORS_FORMAT = "ppma_models"
WEIGHT_CHOICES = ("auto", "model_ema", "model")
#: Bounds on the architecture a safetensors file's metadata may describe. The shapes it implies
#: are compared with the file's header anyway; these bounds keep that comparison (a model built
#: on the meta device, a few modules per block) quick, and refuse values no PPMA model uses.
CONFIG_LIMITS: dict[str, int] = {
    "stages": 8,
    "blocks": 512,  # sum(depths)
    "width": 1 << 16,  # each of dims and head_hidden
    "in_chans": 1024,
    "mlp_ratio": 64,
    "classes": 1 << 20,
}
# Upstream classification model names (args.model) → our registry names.
UPSTREAM_MODEL_NAMES = {
    "PPMAViT_T": "ppma_tiny",
    "PPMAViT_S": "ppma_small",
    "PPMAViT_B": "ppma_base",
}


class CheckpointError(ValueError):
    """A checkpoint file is unreadable, unsafe, or does not fit the model."""


class CheckpointWarning(UserWarning):
    """A checkpoint was loaded, but not exactly as stored (e.g. its float precision changed)."""


@dataclass
class LoadResult:
    """What :func:`load_checkpoint` did. Key names are ours."""

    path: str
    kind: str  #: "safetensors", "classification", "dense" (mmseg/mmdet) or "state_dict"
    source: str | None = None  #: which entry of the file was used (model_ema, model, state_dict)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)  #: in the file, deliberately not loaded
    kept_init: list[str] = field(default_factory=list)  #: in the model, deliberately not loaded
    adapted: list[str] = field(default_factory=list)  #: loaded after adapt_input_channels
    converted: list[str] = field(default_factory=list)  #: float tensors cast to the model's dtype
    metadata: dict[str, str] = field(default_factory=dict)


# The first convolution of the stem: the only weight whose shape depends on in_chans.
INPUT_CONV = "stem.conv1.weight"


def adapt_input_channels(weight: torch.Tensor, in_chans: int) -> torch.Tensor:
    """A stem kernel (out, c, kh, kw) for ``in_chans`` input channels instead of c.

    From one channel (a greyscale model, e.g. Fashion-MNIST) to several, the kernel is shared
    by every channel and divided by their number, so a grey image given as identical channels
    yields the pretrained response. Other conversions are refused: which channel means what
    is not known.
    """
    if weight.ndim != 4:
        raise CheckpointError(
            f"stem kernel must be 4-D (out, in, kh, kw), got {tuple(weight.shape)}"
        )
    if weight.shape[1] == in_chans:
        return weight
    if weight.shape[1] != 1:
        raise CheckpointError(
            f"cannot adapt a stem kernel with {weight.shape[1]} input channels to {in_chans}; "
            "only one-channel (greyscale) kernels are spread over several channels"
        )
    return weight.expand(-1, in_chans, -1, -1) / in_chans


# --------------------------------------------------------------------------------- reading
def _file_format(path: Path) -> str:
    """The file kind from its first bytes: safetensors, torch-zip or torch-legacy."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {str(path)!r} does not exist")
    with path.open("rb") as f:
        head = f.read(16)
    if len(head) >= 9:
        header_len = int.from_bytes(head[:8], "little")
        if head[8:9] == b"{" and 0 < header_len <= path.stat().st_size - 8:
            return "safetensors"
    if head[:4] == b"PK\x03\x04":
        return "torch-zip"
    if head[:1] == b"\x80" and len(head) > 1 and head[1] in range(2, 6):
        return "torch-legacy"
    raise CheckpointError(
        f"{str(path)!r} is neither a PyTorch checkpoint nor a safetensors file "
        f"(first bytes {head[:8]!r})"
    )


def _torch_reason(exc: BaseException) -> str:
    """The first line of what torch says went wrong, without its advice around it."""
    text = str(exc)
    # torch wraps the unpickler's reason in advice to retry with weights_only=False, which
    # would execute whatever the file contains; only the reason itself is worth repeating.
    inner = re.search(r"WeightsUnpickler error:\s*(.+)", text, re.S)
    if inner:
        text = inner[1]
    lines = text.strip().splitlines()
    return lines[0].strip() if lines else type(exc).__name__


def _safe_torch_load(path: Path, allowed_globals: Iterable[type]) -> object:
    """``torch.load(weights_only=True)`` with the allow-list; every failure a CheckpointError."""
    allowed = [*DEFAULT_ALLOWED_GLOBALS, *allowed_globals]
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # \S+: module paths need not be identifiers (e.g. a module loaded from a file path).
        found = re.search(r"GLOBAL (\S+)", str(exc))
        what = (
            f"it needs the object {found[1]!r}, and unpickling arbitrary objects can run code"
            if found
            else f"its pickle stops the safe reader ({_torch_reason(exc)}): the file is damaged "
            "or holds more than tensors and plain containers"
        )
        # "from None": the chained torch error would repeat its advice to load the file with
        # weights_only=False, i.e. to run the code this refusal protects against.
        raise CheckpointError(
            f"refusing to load {str(path)!r}: it is not a checkpoint this library can read "
            f"safely; {what}. Checkpoints are read with torch.load(weights_only=True) allowing "
            f"only {[g.__qualname__ for g in allowed]}; if you trust the file and the object "
            "is harmless data, pass it in allowed_globals."
        ) from None
    except Exception as exc:
        # Damaged data makes torch.load fail in many ways (RuntimeError, OSError, EOFError,
        # and AssertionError or IndexError from inside the unpickler); all mean the same.
        raise CheckpointError(
            f"{str(path)!r} is not a readable PyTorch checkpoint "
            f"({type(exc).__name__}: {_torch_reason(exc)})"
        ) from exc


def _is_state_dict(obj: object) -> bool:
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    )


def _strip_prefix(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in state.items()}


def read_checkpoint(
    path: str | Path,
    *,
    weights: str = "model_ema",
    allowed_globals: Sequence[type] = (),
) -> tuple[dict[str, torch.Tensor], LoadResult]:
    """The raw state dict stored in ``path`` (keys as in the file, wrapper prefixes removed).

    weights: for classification files holding both, "model_ema" (the weights behind the
    published top-1 numbers) or "model". A "module." (DDP) prefix is removed; for mmseg/mmdet
    files only the ``backbone.`` keys are returned (the rest is listed in ``dropped``).
    """
    if weights not in ("model_ema", "model"):
        raise ValueError(f"weights must be 'model_ema' or 'model', got {weights!r}")
    path = Path(path)
    fmt = _file_format(path)
    if fmt == "safetensors":
        try:
            state = load_file(str(path))
            with safe_open(str(path), framework="pt") as f:
                metadata = dict(f.metadata() or {})
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"{str(path)!r} is not a valid safetensors file: {exc}") from exc
        return state, LoadResult(str(path), "safetensors", metadata=metadata)

    obj = _safe_torch_load(path, allowed_globals)
    result = LoadResult(str(path), "state_dict")
    if _is_state_dict(obj):
        state = dict(obj)
    elif isinstance(obj, Mapping):
        candidates = [weights, "model", "model_ema"] if "state_dict" not in obj else []
        candidates.append("state_dict")
        key = next((k for k in candidates if _is_state_dict(obj.get(k))), None)
        if key is None:
            raise CheckpointError(
                f"{str(path)!r}: no state dict found; top-level keys are {sorted(map(str, obj))} "
                "(expected 'model'/'model_ema' or 'state_dict')"
            )
        if weights == "model_ema" and key == "model" and "model_ema" in obj:
            raise CheckpointError(f"{str(path)!r}: 'model_ema' is present but not a state dict")
        state = dict(obj[key])
        result.source = key
        result.kind = "classification" if "model" in obj or "model_ema" in obj else "state_dict"
        args = obj.get("args")
        if isinstance(args, argparse.Namespace):
            result.metadata["upstream_model"] = str(getattr(args, "model", ""))
    else:
        raise CheckpointError(f"{str(path)!r}: expected a dict, found {type(obj).__name__}")

    if all(k.startswith("module.") for k in state):
        state = _strip_prefix(state, "module.")
    if any(k.startswith("backbone.") for k in state):
        result.dropped = sorted(k for k in state if not k.startswith("backbone."))
        state = {k[len("backbone.") :]: v for k, v in state.items() if k.startswith("backbone.")}
        result.kind = "dense"
    return state, result


# --------------------------------------------------------------------------------- loading
def _dtype_kind(dtype: torch.dtype) -> str:
    if dtype == torch.bool:
        return "bool"
    if dtype.is_complex:
        return "complex"
    return "floating-point" if dtype.is_floating_point else "integer"


def check_dtypes(
    state: Mapping[str, torch.Tensor], own: Mapping[str, torch.Tensor], result: LoadResult
) -> None:
    """Refuse tensors of another kind than the model's; warn about float precision changes.

    ``load_state_dict`` would cast integer data into a float parameter without a word, and
    the model would run with wrong weights; no genuine checkpoint stores weights that way.
    A float tensor of another precision is cast too, but that is a property of the file
    (half-precision exports) rather than damage, so it is loaded and reported.
    """
    common = [k for k in state if k in own]
    wrong = [
        f"{k} ({state[k].dtype}, model {own[k].dtype})"
        for k in common
        if _dtype_kind(state[k].dtype) != _dtype_kind(own[k].dtype)
    ]
    if wrong:
        raise CheckpointError(
            f"{result.path}: {len(wrong)} tensor(s) hold data of another kind than the model's "
            "(integer or bool data where the model has floating-point weights, or the "
            "reverse); the file is damaged or not a PPMA checkpoint: " + ", ".join(wrong[:8])
        )
    cast = sorted(
        k for k in common if state[k].is_floating_point() and state[k].dtype != own[k].dtype
    )
    result.converted += cast
    for (src, dst), n in sorted(
        Counter((state[k].dtype, own[k].dtype) for k in cast).items(), key=str
    ):
        exact = torch.promote_types(src, dst) == dst
        warnings.warn(
            f"{result.path}: {n} tensor(s) stored as {src} were converted to the model's {dst} "
            f"({'exactly' if exact else 'with rounding'})",
            CheckpointWarning,
            stacklevel=4,  # the caller of load_checkpoint
        )


def _check_fit(
    model: PPMA,
    state: Mapping[str, torch.Tensor],
    own: Mapping[str, torch.Tensor],
    result: LoadResult,
    strict: bool,
) -> None:
    """Raise unless every file tensor fits its model tensor (and, if strict, keys match)."""
    mismatched = [
        f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and tuple(v.shape) != tuple(own[k].shape)
    ]
    if mismatched:
        raise CheckpointError(
            f"{result.path}: {len(mismatched)} tensor shape(s) do not fit the model "
            f"{model.name or ''}: " + "; ".join(mismatched[:8])
        )
    result.missing = sorted(set(own) - set(state) - set(result.kept_init))
    result.unexpected = sorted(set(state) - set(own))
    if strict and (result.missing or result.unexpected):
        raise CheckpointError(
            f"{result.path} does not match the model {model.name or ''}: "
            f"{len(result.missing)} missing key(s) {result.missing[:8]}, "
            f"{len(result.unexpected)} unexpected key(s) {result.unexpected[:8]} "
            "(pass strict=False to load the matching part)"
        )
    check_dtypes(state, own, result)


def load_checkpoint(
    model: PPMA,
    path: str | Path,
    *,
    strict: bool = True,
    weights: str = "auto",
    reset_mismatched_classifier: bool = False,
    allowed_globals: Sequence[type] = (),
) -> LoadResult:
    """Load an authors' checkpoint or one of our safetensors files into ``model``.

    weights: "auto" picks ``model_ema`` for classifiers and ``model`` for features models
    (as the authors' dense training does), or name the entry explicitly.
    Upstream key names are converted (see :mod:`ppma_models.convert`). Rules:

    * a features model loading a classification file drops the classifier head and keeps
      its freshly initialised per-stage LayerNorms (the authors' pretrain → dense path);
    * per-stage LayerNorms for stages outside ``model.out_indices`` are dropped;
    * with ``reset_mismatched_classifier`` a head with another number of classes is dropped
      and the model's fresh final layer is kept (fine-tuning);
    * any other missing or unexpected key raises :class:`CheckpointError` unless
      ``strict=False``; a shape mismatch always raises, except a one-channel stem kernel
      loaded into a model with more input channels (:func:`adapt_input_channels`);
    * integer or bool data for a float tensor raises; float data of another precision is
      converted with a :class:`CheckpointWarning` (see the module docstring).
    """
    if weights not in WEIGHT_CHOICES:
        raise ValueError(f"weights must be one of {WEIGHT_CHOICES}, got {weights!r}")
    if weights == "auto":
        weights = "model" if model.features_only else "model_ema"
    state, result = read_checkpoint(path, weights=weights, allowed_globals=allowed_globals)
    if is_upstream_state_dict(state):
        try:
            state = convert_from_upstream(state, model.config)
        except AngleMismatchError as exc:
            raise CheckpointError(f"{result.path} does not fit the model: {exc}") from exc

    own = model.state_dict()
    if model.features_only:
        head = sorted(k for k in state if k.startswith("head."))
        result.dropped += head
        extra_norms = sorted(k for k in state if k.startswith("out_norms.") and k not in own)
        result.dropped += extra_norms
        state = {k: v for k, v in state.items() if k not in set(head) | set(extra_norms)}
        if not any(k.startswith("out_norms.") for k in state):
            result.kept_init += sorted(k for k in own if k.startswith("out_norms."))
    fc_keys = ("head.fc.weight", "head.fc.bias")
    if reset_mismatched_classifier and not model.features_only:
        fc = state.get("head.fc.weight")
        if fc is not None and (
            "head.fc.weight" not in own or fc.shape != own["head.fc.weight"].shape
        ):
            result.dropped += [k for k in fc_keys if k in state]
            result.kept_init += [k for k in fc_keys if k in own]
            state = {k: v for k, v in state.items() if k not in fc_keys}

    stem, own_stem = state.get(INPUT_CONV), own.get(INPUT_CONV)
    # Only a 4-D kernel is a candidate; anything else is reported by the shape check.
    if stem is not None and own_stem is not None and stem.ndim == own_stem.ndim == 4:
        if stem.shape[1] != own_stem.shape[1] and _dtype_kind(stem.dtype) == "floating-point":
            state = {**state, INPUT_CONV: adapt_input_channels(stem, own_stem.shape[1])}
            result.adapted.append(INPUT_CONV)

    _check_fit(model, state, own, result, strict)
    model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    return result


# --------------------------------------------------------------------------------- writing
def save_safetensors(
    model: PPMA,
    path: str | Path,
    *,
    class_names: Sequence[str] | None = None,
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write the model's state dict (our key names) and what is needed to rebuild it."""
    if class_names is not None and model.head is not None and len(class_names) != model.num_classes:
        raise ValueError(
            f"class_names has {len(class_names)} entries but the model has {model.num_classes} "
            "classes"
        )
    info = {
        "format": SAFETENSORS_FORMAT,
        "format_version": "1",
        "model_name": model.name or "",
        "config": json.dumps(model.config.to_dict()),
        "num_classes": str(model.num_classes),
        "features_only": json.dumps(model.features_only),
        "out_indices": json.dumps(list(model.out_indices)),
    }
    if class_names is not None:
        info["class_names"] = json.dumps(list(class_names))
    for k, v in (metadata or {}).items():
        if k in info:
            raise ValueError(f"metadata key {k!r} is reserved")
        info[str(k)] = str(v)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata=info)


def save_upstream(model: PPMA, path: str | Path) -> None:
    """Write ``{"model": state}`` in the authors' key layout (for their code)."""
    torch.save({"model": convert_to_upstream(model.state_dict())}, path)


# ------------------------------------------------------------------------------ rebuilding
def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


# PPMAConfig field -> (check of one value, per-stage list?, what is expected). JSON gives no
# types, so each is checked before PPMAConfig does arithmetic with it.
_CONFIG_FIELDS: dict[str, tuple[Callable[[object], bool], bool, str]] = {
    "dims": (_is_int, True, "a list of integers"),
    "depths": (_is_int, True, "a list of integers"),
    "heads": (_is_int, True, "a list of integers"),
    "mlp_ratios": (_is_real, True, "a list of numbers"),
    "attention_kinds": (lambda v: isinstance(v, str), True, "a list of strings"),
    "layer_scale": (lambda v: isinstance(v, bool), True, "a list of booleans"),
    "drop_path_rate": (_is_real, False, "a number"),
    "layer_scale_init": (_is_real, False, "a number"),
    "head_hidden": (_is_int, False, "an integer"),
    "in_chans": (_is_int, False, "an integer"),
}
_REQUIRED_CONFIG = ("dims", "depths", "heads", "mlp_ratios", "attention_kinds")
_REQUIRED_METADATA = ("format_version", "config", "num_classes", "features_only", "out_indices")


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def config_problem(data: object) -> str | None:
    """What makes a metadata config unusable (types, :data:`CONFIG_LIMITS`), or None."""
    if not isinstance(data, dict):
        return f"expected a JSON object, got {_short(data)}"
    unknown = sorted(set(data) - set(_CONFIG_FIELDS))
    missing = [k for k in _REQUIRED_CONFIG if k not in data]
    if unknown or missing:
        return f"unknown field(s) {unknown}, missing field(s) {missing}"
    for name, value in data.items():
        check, per_stage, expected = _CONFIG_FIELDS[name]
        ok = isinstance(value, list) and all(map(check, value)) if per_stage else check(value)
        if not ok:
            return f"{name} must be {expected}, got {_short(value)}"
    lim = CONFIG_LIMITS
    widths = [*data["dims"], data.get("head_hidden", 1)]
    bounds = [
        (1 <= len(data["dims"]) <= lim["stages"], f"1 to {lim['stages']} stages"),
        (min(data["depths"], default=0) >= 0, "depths >= 0"),
        (sum(data["depths"]) <= lim["blocks"], f"at most {lim['blocks']} blocks in all"),
        (all(1 <= w <= lim["width"] for w in widths), f"dims, head_hidden <= {lim['width']}"),
        (1 <= data.get("in_chans", 3) <= lim["in_chans"], f"in_chans <= {lim['in_chans']}"),
        (
            all(0 < r <= lim["mlp_ratio"] for r in data["mlp_ratios"]),
            f"0 < mlp_ratios <= {lim['mlp_ratio']}",
        ),
    ]
    broken = [rule for ok, rule in bounds if not ok]
    return f"outside the limits ({'; '.join(broken)})" if broken else None


@dataclass(frozen=True)
class _StoredModel:
    """The model a safetensors file's metadata describes."""

    config: PPMAConfig
    num_classes: int
    features_only: bool
    out_indices: tuple[int, ...]
    name: str | None
    class_names: list[str] | None

    def build(self, attention: str) -> PPMA:
        return PPMA(
            self.config,
            num_classes=self.num_classes,
            features_only=self.features_only,
            out_indices=self.out_indices,
            attention=attention,
            name=self.name,
        )


def _metadata_json(path: str, meta: Mapping[str, str], key: str) -> object:
    try:
        return json.loads(meta[key])
    except (ValueError, RecursionError) as exc:
        raise CheckpointError(f"{path}: metadata {key!r} is not valid JSON ({exc})") from None


def _stored_config(path: str, meta: Mapping[str, str]) -> PPMAConfig:
    data = _metadata_json(path, meta, "config")
    problem = config_problem(data)
    if problem is None:
        try:
            return PPMAConfig.from_dict(data)
        except (TypeError, ValueError) as exc:
            problem = str(exc)
    raise CheckpointError(f"{path}: the metadata's config is not usable: {problem}")


def _stored_model(path: str, meta: Mapping[str, str]) -> _StoredModel:
    """Parse and check the metadata written by :func:`save_safetensors`."""
    if meta.get("format") != SAFETENSORS_FORMAT:
        raise CheckpointError(
            f"{path}: safetensors file without ppma_models metadata; build the model "
            "with create_model(...) and use load_checkpoint instead"
        )
    missing = [k for k in _REQUIRED_METADATA if k not in meta]
    if missing:
        raise CheckpointError(f"{path}: the ppma_models metadata lacks {missing}")
    if meta["format_version"] != "1":
        raise CheckpointError(
            f"{path}: format_version {_short(meta['format_version'])} is not readable here "
            "(this version of ppma_models reads '1')"
        )
    config = _stored_config(path, meta)
    values = {k: _metadata_json(path, meta, k) for k in _REQUIRED_METADATA[2:]}
    names = _metadata_json(path, meta, "class_names") if "class_names" in meta else None
    checks = {
        "num_classes": _is_int(values["num_classes"])
        and 0 <= values["num_classes"] <= CONFIG_LIMITS["classes"],
        "features_only": isinstance(values["features_only"], bool),
        "out_indices": isinstance(values["out_indices"], list)
        and all(map(_is_int, values["out_indices"])),
        "class_names": names is None
        or (isinstance(names, list) and all(isinstance(n, str) for n in names)),
    }
    shown = {**values, "class_names": names}
    bad = [f"{k}={_short(shown[k])}" for k, ok in checks.items() if not ok]
    if bad:
        raise CheckpointError(f"{path}: invalid metadata value(s): {', '.join(bad)}")
    if names is not None and not values["features_only"] and len(names) != values["num_classes"]:
        raise CheckpointError(
            f"{path}: the metadata lists {len(names)} class names for "
            f"{values['num_classes']} classes"
        )
    return _StoredModel(
        config,
        values["num_classes"],
        values["features_only"],
        tuple(values["out_indices"]),
        meta.get("model_name") or None,
        names,
    )


def _safetensors_header(path: Path) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """Each tensor's shape and the metadata, read from the header without loading any data."""
    try:
        with safe_open(str(path), framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
            return shapes, dict(f.metadata() or {})
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{str(path)!r} is not a valid safetensors file: {exc}") from exc


def _check_header(path: str, stored: _StoredModel, header: Mapping[str, tuple[int, ...]]) -> None:
    """Compare the file's tensors with those of the model its metadata describes.

    The model is built on the meta device: parameters get shapes but no memory, so a config
    describing a model far larger than the file costs nothing before it is refused.
    """
    try:
        with torch.device("meta"):
            # "reference": this model never runs, so no warning about missing native ops.
            expected = {
                k: tuple(v.shape) for k, v in stored.build("reference").state_dict().items()
            }
    except (TypeError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: the metadata describes no valid model: {exc}") from None
    wrong = [
        f"{k} is {header[k]} in the file, {expected[k]} by the metadata"
        for k in expected
        if header.get(k, expected[k]) != expected[k]
    ]
    missing = sorted(set(expected) - set(header))
    unexpected = sorted(set(header) - set(expected))
    problems = [
        f"{len(found)} {what}: {', '.join(found[:4])}{', ...' if len(found) > 4 else ''}"
        for what, found in (
            ("shape(s) differ", wrong),
            ("tensor(s) missing", missing),
            ("unexpected tensor(s)", unexpected),
        )
        if found
    ]
    if problems:
        raise CheckpointError(
            f"{path}: the tensors do not match the model its metadata describes; "
            + "; ".join(problems)
        )


def _upstream_model(
    path: str, state: Mapping[str, torch.Tensor], upstream_name: str | None, attention: str
) -> PPMA:
    """The registered model an authors' classification file names in ``args.model``."""
    from .registry import create_model

    name = UPSTREAM_MODEL_NAMES.get(upstream_name or "")
    if name is None:
        raise CheckpointError(
            f"{path}: cannot tell which model this is (args.model = {upstream_name!r}); "
            "use create_model(name, pretrained=path)"
        )
    try:
        converted = convert_from_upstream(state) if is_upstream_state_dict(state) else state
    except AngleMismatchError as exc:
        raise CheckpointError(f"{path} does not fit {name}: {exc}") from exc
    fc = converted.get("head.fc.weight")
    if fc is not None and fc.ndim != 2:
        raise CheckpointError(f"{path}: head.fc.weight has shape {tuple(fc.shape)}, not 2-D")
    num_classes = fc.shape[0] if fc is not None else 0
    return create_model(name, num_classes=num_classes, pretrained=path, attention=attention)


def load_model(
    path: str | Path,
    *,
    attention: str = "native",
    allowed_globals: Sequence[type] = (),
) -> PPMA:
    """Rebuild a model from a file alone.

    Works for our safetensors files (config in the metadata; ``model.class_names`` is set
    when saved) and for the authors' classification checkpoints whose ``args.model`` names
    PPMAViT_T/S/B. A safetensors file's metadata and shapes are checked against each other
    before the model is built (see the module docstring).
    """
    path = Path(path)
    if _file_format(path) == "safetensors":
        header, meta = _safetensors_header(path)
        stored = _stored_model(str(path), meta)
        _check_header(str(path), stored, header)
        model = stored.build(attention)
        load_checkpoint(model, path)
        if stored.class_names is not None:
            model.class_names = stored.class_names
        return model
    state, result = read_checkpoint(path, allowed_globals=allowed_globals)
    return _upstream_model(result.path, state, result.metadata.get("upstream_model"), attention)
