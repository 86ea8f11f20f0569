"""Reading checkpoint files: the authors' ``torch.save`` pickles and safetensors files.

Files are untrusted input. ``.pth`` pickles are read with ``torch.load(weights_only=True)`` and
an explicit allow-list (only ``argparse.Namespace`` by default): a file that needs any other
Python object is refused, never unpickled. Whatever is wrong with a file (damage, a foreign
layout, a hostile pickle or header) is one :class:`CheckpointError` naming it.
"""

from __future__ import annotations

import argparse
import pickle
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from .errors import CheckpointError
from .metadata import RESERVED_METADATA

#: Classes a checkpoint may contain besides tensors and plain containers.
DEFAULT_ALLOWED_GLOBALS: tuple[type, ...] = (argparse.Namespace,)


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


# --------------------------------------------------------------------------------- files
def file_format(path: Path) -> str:
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
    fmt = file_format(path)
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


def safetensors_header(path: Path) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """Each tensor's shape and the metadata, read from the header without loading any data."""
    if file_format(path) != "safetensors":
        raise CheckpointError(f"{str(path)!r} is not a safetensors file")
    try:
        with safe_open(str(path), framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
            return shapes, dict(f.metadata() or {})
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{str(path)!r} is not a valid safetensors file: {exc}") from exc


def read_metadata(path: str | Path) -> dict[str, str]:
    """The application metadata of a safetensors file: every metadata entry except those
    ppma_models reserves for rebuilding the model (given to ``save_safetensors(metadata=...)``).

    Only the header is read. A file that is not safetensors raises :class:`CheckpointError`.
    """
    _, meta = safetensors_header(Path(path))
    return {k: v for k, v in meta.items() if k not in RESERVED_METADATA}
