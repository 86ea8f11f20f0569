"""Atomic checkpoint files: full training state (torch) and exported weights (safetensors).

Two formats, chosen for what each file is for:

- **Training state** (``last.pt``, ``best.pt``): ``torch.save`` of a dict holding only tensors and
  plain containers (dict/list/tuple/str/int/float/bool/None), so :func:`load_training_state`
  reads it with ``torch.load(weights_only=True)`` -- no pickled objects, no code execution.
  Keys written by :class:`apps.engine.trainer.Trainer`: ``format``, ``model``, ``ema``,
  ``optimizer``, ``schedule``, ``epoch`` (epochs completed), ``step``, ``best_metric``,
  ``rng``, ``meta`` (the app's plain-dict description of the model and data), and since the
  run directory is kept consistent across kills ``best_epoch`` and ``record`` (the metrics.jsonl
  record of the epoch the state ends; older files lack both).
- **Weights** (:func:`save_weights`): a state dict with a JSON ``meta`` string in the
  safetensors metadata -- the Trainer's default export, and the layout of the segment app's
  weights files before they moved to ppma_models' layout (:mod:`apps.engine.weights`).

A missing, unreadable or foreign file is a :class:`ppma_models.CheckpointError` (the one error
type of checkpoints, from the library to the apps) naming the file.

Every write goes to a temporary file in the destination directory, is flushed and fsync-ed,
then ``os.replace``-d over the destination (atomic on POSIX) and the directory is fsync-ed. A
process killed at any point leaves either the old file or the new one, never a torn file.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any

import torch
from ppma_models import CheckpointError

__all__ = [
    "TRAINING_STATE_FORMAT",
    "CheckpointError",
    "atomic_path",
    "atomic_write",
    "load_training_state",
    "load_weights",
    "new_file_mode",
    "remove_stale_temp_files",
    "save_training_state",
    "save_weights",
]

TRAINING_STATE_FORMAT = "ppma-training-state/1"
TEMP_SUFFIX = ".tmp"


def _fsync_directory(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # some filesystems do not allow opening directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def new_file_mode() -> int:
    """The mode ``open()`` gives a new file: 0o666 less the process umask."""
    try:  # Linux reports the umask without changing it
        with open("/proc/self/status", encoding="ascii") as f:
            umask = next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError, IndexError):
        # Elsewhere it can only be read by setting it (briefly, for all threads).
        umask = os.umask(0o022)
        os.umask(umask)
    return 0o666 & ~umask


def _temp_file(path: Path) -> tuple[int, str]:
    """A new temporary file next to ``path`` (same filesystem, so the rename is atomic),
    with the mode of an ordinary new file rather than mkstemp's owner-only 0600."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
    try:
        os.fchmod(fd, new_file_mode())
    except OSError:  # filesystems without permissions keep their own
        pass
    return fd, tmp_name


def _discard(tmp_name: str) -> None:
    try:
        os.unlink(tmp_name)
    except FileNotFoundError:
        pass


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> Path:
    """Call ``write(file)`` on a temporary file next to ``path``, then atomically rename it.

    If ``write`` raises (or the process dies) the previous ``path`` is untouched; the
    temporary file is removed on exceptions (after a kill it is left behind, and
    :func:`remove_stale_temp_files` clears it).
    """
    path = Path(path)
    fd, tmp_name = _temp_file(path)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        _discard(tmp_name)
        raise
    _fsync_directory(path.parent)
    return path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path`` for a writer that only accepts file names
    (e.g. ``safetensors.torch.save_file``); on success it is fsync-ed and renamed over
    ``path``, on an exception it is removed and ``path`` is untouched."""
    path = Path(path)
    fd, tmp_name = _temp_file(path)
    os.close(fd)
    try:
        yield Path(tmp_name)
        with open(tmp_name, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        _discard(tmp_name)
        raise
    _fsync_directory(path.parent)


def remove_stale_temp_files(directory: str | os.PathLike) -> list[Path]:
    """Delete the temporary files that killed writers left in ``directory``.

    Only names of the form this module creates (``.<name>.<random>.tmp``) are touched.
    Call it while no other process writes to ``directory``. Returns the removed paths.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    removed = []
    for candidate in sorted(directory.glob(f".*{TEMP_SUFFIX}")):
        if candidate.is_file() and not candidate.is_symlink():
            _discard(str(candidate))
            removed.append(candidate)
    return removed


def save_training_state(state: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Atomically ``torch.save`` a training-state dict (tensors and plain containers only)."""
    return atomic_write(path, lambda f: torch.save(dict(state), f))


def load_training_state(
    path: str | os.PathLike, map_location: str | torch.device = "cpu"
) -> dict[str, Any]:
    """Load a file written by :func:`save_training_state` with ``weights_only=True``."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError, ...
        raise CheckpointError(
            f"cannot read training checkpoint {path}: {type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}"
        ) from exc
    if not isinstance(state, dict) or state.get("format") != TRAINING_STATE_FORMAT:
        raise CheckpointError(
            f"{path} is not a training checkpoint written by this program "
            f"(expected format {TRAINING_STATE_FORMAT!r})"
        )
    return state


def save_weights(
    state_dict: Mapping[str, torch.Tensor], path: str | os.PathLike, meta: Mapping[str, Any]
) -> Path:
    """Atomically write ``state_dict`` as safetensors with ``meta`` (JSON) in the header."""
    from safetensors.torch import save

    # safetensors refuses shared or non-contiguous storage; inference weights need neither.
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}
    blob = save(tensors, metadata={"meta": json.dumps(dict(meta), sort_keys=True)})
    return atomic_write(path, lambda f: f.write(blob))


def load_weights(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a file written by :func:`save_weights`: ``(state_dict, meta)``."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file {path} does not exist")
    try:
        blob = path.read_bytes()
        tensors = load(blob)
        header_len = int.from_bytes(blob[:8], "little")
        header = json.loads(blob[8 : 8 + header_len])
        meta = json.loads(header.get("__metadata__", {}).get("meta", "{}"))
    except (SafetensorError, ValueError, OSError) as exc:
        raise CheckpointError(f"cannot read safetensors file {path}: {exc}") from exc
    return tensors, meta
