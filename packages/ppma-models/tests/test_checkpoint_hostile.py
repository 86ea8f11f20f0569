"""Damaged, foreign or hostile checkpoint files: each is refused (or loaded with a warning)
with one message naming the file, before anything large is allocated."""

from __future__ import annotations

import argparse
import dataclasses
import json
import traceback
from pathlib import Path

import pytest
import torch
from ppma_models import create_model, load_checkpoint, save_safetensors
from ppma_models.checkpoint import CheckpointError
from safetensors import safe_open
from safetensors.torch import save_file

NUM_CLASSES = 3


@dataclasses.dataclass
class TrainingArgs:
    """Stands for the custom objects some training scripts pickle next to the weights."""

    lr: float = 1e-3


@pytest.fixture(scope="module")
def good_file(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    """A correct ppma_nano safetensors file and the model it was written from."""
    torch.manual_seed(0)
    model = create_model("ppma_nano", num_classes=NUM_CLASSES, attention="reference").eval()
    path = tmp_path_factory.mktemp("good") / "nano.safetensors"
    save_safetensors(model, path, class_names=["a", "b", "c"])
    return path, model


def _contents(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata())  # noqa: SIM118


def _variant(good: Path, path: Path, *, state=None, **metadata: str | None) -> Path:
    """``good`` rewritten with some tensors replaced and metadata entries set (None: removed)."""
    tensors, meta = _contents(good)
    tensors.update(state or {})
    for key, value in metadata.items():
        if value is None:
            meta.pop(key)
        else:
            meta[key] = value
    save_file(tensors, str(path), metadata=meta)
    return path


def _config(good: Path, **changes: object) -> str:
    """The good file's config JSON with some fields changed (None: removed)."""
    data = json.loads(_contents(good)[1]["config"])
    data.update(changes)
    return json.dumps({k: v for k, v in data.items() if v is not None})


def _cast_floats(state: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {k: v.to(dtype) for k, v in state.items() if v.is_floating_point()}


# ------------------------------------------------------------------------ .pth files
def test_pickle_needing_a_custom_class_gets_the_library_message(tmp_path, good_file):
    _, model = good_file
    path = tmp_path / "custom.pth"
    torch.save({"model": model.state_dict(), "args": TrainingArgs()}, path)
    with pytest.raises(CheckpointError) as caught:
        load_checkpoint(model, path)
    message = str(caught.value)
    assert str(path) in message and "TrainingArgs" in message
    assert "not a checkpoint this library can read safely" in message
    # No chained torch error whose advice (weights_only=False) would run the file's code.
    assert caught.value.__cause__ is None and caught.value.__suppress_context__
    shown = "".join(traceback.format_exception(caught.value))
    assert "weights_only` set to `False" not in shown and "weights_only=False" not in shown


@pytest.mark.parametrize("keep", [0.001, 0.1, 0.5, 0.9])
def test_truncated_files_are_one_error_naming_the_file(tmp_path, good_file, keep):
    good, model = good_file
    pth = tmp_path / "cut.pth"
    torch.save({"model": model.state_dict(), "args": argparse.Namespace(model="x")}, pth)
    for source in (pth, good):
        data = source.read_bytes()
        cut = tmp_path / f"cut{source.suffix}"
        cut.write_bytes(data[: int(len(data) * keep)])
        with pytest.raises(CheckpointError) as caught:
            load_checkpoint(model, cut)
        assert str(cut) in str(caught.value)


def test_a_damaged_pickle_stream_is_one_error_naming_the_file(tmp_path, good_file):
    _, model = good_file
    path = tmp_path / "damaged.pth"
    path.write_bytes(b"\x80\x02e.")  # APPENDS without a mark: torch's unpickler hits IndexError
    with pytest.raises(CheckpointError, match="is not a readable PyTorch checkpoint") as caught:
        load_checkpoint(model, path)
    assert str(path) in str(caught.value)
