"""Damaged, foreign or hostile checkpoint files: each is refused (or loaded with a warning)
with one message naming the file, before anything large is allocated."""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import traceback
import warnings
from pathlib import Path

import pytest
import torch
from ppma_models import PPMAConfig, create_model, load_checkpoint, load_model, save_safetensors
from ppma_models.checkpoint import CheckpointError, CheckpointWarning
from ppma_models.checkpoint import metadata as ckpt_metadata
from ppma_models.testing import rewrite_safetensors, safetensors_contents, seeded_model

NUM_CLASSES = 3


@dataclasses.dataclass
class TrainingArgs:
    """Stands for the custom objects some training scripts pickle next to the weights."""

    lr: float = 1e-3


@pytest.fixture(scope="module")
def good_file(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    """A correct ppma_nano safetensors file and the model it was written from."""
    model = seeded_model("ppma_nano", num_classes=NUM_CLASSES).eval()
    path = tmp_path_factory.mktemp("good") / "nano.safetensors"
    save_safetensors(model, path, class_names=["a", "b", "c"])
    return path, model


def _config(good: Path, **changes: object) -> str:
    """The good file's config JSON with some fields changed (None: removed)."""
    data = json.loads(safetensors_contents(good)[1]["config"])
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


# ------------------------------------------------------------------------------ dtypes
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool])
def test_non_float_weights_are_refused_naming_file_and_tensor(tmp_path, good_file, dtype):
    good, model = good_file
    stem = safetensors_contents(good)[0]["stem.conv1.weight"]
    one = rewrite_safetensors(
        good, tmp_path / "one.safetensors", tensors={"stem.conv1.weight": stem.to(dtype)}
    )
    pattern = rf"{re.escape(str(one))}: 1 tensor\(s\) hold data .*stem\.conv1\.weight \({dtype}"
    with pytest.raises(CheckpointError, match=pattern):
        load_model(one)
    with pytest.raises(CheckpointError, match=pattern):
        load_checkpoint(model, one)

    every = tmp_path / "every.pth"  # the authors' format goes through the same check
    torch.save({"model": {**model.state_dict(), **_cast_floats(model.state_dict(), dtype)}}, every)
    fresh = create_model("ppma_nano", num_classes=NUM_CLASSES)
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(every))}: \d+ tensor\(s\) hold"):
        load_checkpoint(fresh, every)


@pytest.mark.parametrize(
    ("dtype", "how"),
    [(torch.float16, "exactly"), (torch.bfloat16, "exactly"), (torch.float64, "with rounding")],
)
def test_other_float_precisions_are_converted_with_a_warning(tmp_path, good_file, dtype, how):
    good, model = good_file
    stored = _cast_floats(safetensors_contents(good)[0], dtype)
    path = rewrite_safetensors(good, tmp_path / "cast.safetensors", tensors=stored)
    pattern = (
        rf"{re.escape(str(path))}: {len(stored)} tensor\(s\) stored as {dtype} were "
        rf"converted to the model's torch.float32 \({how}\)"
    )
    with pytest.warns(CheckpointWarning, match=pattern):
        rebuilt = load_model(path)
    for key, value in stored.items():
        assert torch.equal(rebuilt.state_dict()[key], value.float()), key
    fresh = create_model("ppma_nano", num_classes=NUM_CLASSES)
    with pytest.warns(CheckpointWarning, match=pattern):
        result = load_checkpoint(fresh, path)
    assert result.converted == sorted(stored)


def test_a_correct_file_loads_bit_exactly_without_warnings(good_file):
    good, model = good_file
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rebuilt = load_model(good).eval()
    assert rebuilt.class_names == ["a", "b", "c"]
    for key, value in model.state_dict().items():
        assert torch.equal(rebuilt.state_dict()[key], value), key
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), model(x))


def test_stem_kernel_of_the_wrong_rank_is_a_shape_error(tmp_path, good_file):
    good, model = good_file
    path = rewrite_safetensors(
        good, tmp_path / "flat.safetensors", tensors={"stem.conv1.weight": torch.ones(9)}
    )
    with pytest.raises(
        CheckpointError, match=rf"{re.escape(str(path))}: 1 tensor shape\(s\) do not fit"
    ):
        load_checkpoint(model, path)


# ---------------------------------------------------------------------------- metadata
@pytest.mark.parametrize(
    ("dims", "message"),
    [
        ([100000] * 4, r"config is not usable: outside the limits \(dims, head_hidden <= 65536"),
        ([60000] * 4, r"\d+ shape\(s\) differ: stem\.conv1\.weight is \(16, 3, 3, 3\) in the file"),
    ],
)
def test_huge_config_in_metadata_is_refused_before_allocating(
    tmp_path, good_file, monkeypatch, dims, message
):
    good, _ = good_file
    path = rewrite_safetensors(good, tmp_path / "huge.safetensors", config=_config(good, dims=dims))
    real_ppma = ckpt_metadata.PPMA
    devices = []

    def guarded(config: PPMAConfig, **kwargs: object):
        # Stops the test before ~90 GB are requested if the metadata is trusted.
        devices.append(torch.get_default_device().type)
        if devices[-1] != "meta" and max(config.dims) > 10_000:
            raise AssertionError("the model described by the metadata was allocated")
        return real_ppma(config, **kwargs)

    monkeypatch.setattr(ckpt_metadata, "PPMA", guarded)
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(path))}: .*{message}"):
        load_model(path)
    assert set(devices) <= {"meta"}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"config": None}, r"metadata lacks \['config'\]"),
        ({"num_classes": None}, r"metadata lacks \['num_classes'\]"),
        ({"format_version": "2"}, r"format_version '2' is not readable"),
        ({"config": '{"dims": [32, 64'}, r"metadata 'config' is not valid JSON"),
        ({"num_classes": "ten"}, r"metadata 'num_classes' is not valid JSON"),
        ({"num_classes": '"3"'}, r"invalid metadata value\(s\): num_classes='3'"),
        ({"num_classes": "-1"}, r"invalid metadata value\(s\): num_classes=-1"),
        ({"features_only": '"no"'}, r"invalid metadata value\(s\): features_only='no'"),
        ({"out_indices": '"0123"'}, r"invalid metadata value\(s\): out_indices='0123'"),
        ({"class_names": "[1, 2, 3]"}, r"invalid metadata value\(s\): class_names=\[1, 2, 3\]"),
        ({"class_names": '["a"]'}, r"1 class names for 3 classes"),
        ({"features_only": "true", "out_indices": "[0, 9]"}, r"describes no valid model"),
        ({"config": "[32, 64]"}, r"config is not usable: expected a JSON object"),
        ({"config": {"dims": ["a", "b", "c", "d"]}}, r"dims must be a list of integers"),
        ({"config": {"dims": None}}, r"missing field\(s\) \['dims'\]"),
        ({"config": {"width": 3}}, r"unknown field\(s\) \['width'\]"),
        ({"config": {"head_hidden": 1.5}}, r"head_hidden must be an integer"),
        ({"config": {"layer_scale": [0, 0, 0, 0]}}, r"layer_scale must be a list of booleans"),
        ({"config": {"drop_path_rate": float("nan")}}, r"drop_path_rate must be a number"),
        ({"config": {"heads": [3, 3, 3, 3]}}, r"heads\[0\]=3 must divide dims\[0\]=32"),
        ({"config": {"depths": [1000] * 4}}, r"outside the limits \(at most 512 blocks"),
        ({"config": {"dims": []}}, r"outside the limits \(1 to 8 stages"),
        ({"config": {"mlp_ratios": [-3, 3, 3, 3]}}, r"outside the limits \(0 < mlp_ratios <= 64"),
        ({"config": {"stem_stride": 3}}, r"outside the limits \(stem_stride in \(2, 4\)"),
    ],
)
def test_bad_metadata_is_one_error_naming_the_file(tmp_path, good_file, change, message):
    good, _ = good_file
    change = {
        k: _config(good, **v) if isinstance(v, dict) else v for k, v in change.items()
    }  # {"config": {...}} changes fields of the good config
    path = rewrite_safetensors(good, tmp_path / "bad.safetensors", **change)
    with pytest.raises(CheckpointError, match=message) as caught:
        load_model(path)
    assert str(path) in str(caught.value)


def test_config_checks_cover_every_config_field():
    assert set(ckpt_metadata._CONFIG_FIELDS) == {f.name for f in dataclasses.fields(PPMAConfig)}


def test_authors_file_with_foreign_rotary_angles_is_refused_by_load_model(tmp_path):
    path = tmp_path / "angles.pth"
    state = {"layers.0.Relpos.angle": torch.zeros(16), "patch_embed.proj.0.weight": torch.ones(1)}
    args = argparse.Namespace(model="PPMAViT_T")
    torch.save({"model": state, "model_ema": state, "args": args}, path)
    with pytest.raises(
        CheckpointError, match=rf"{re.escape(str(path))} does not fit ppma_tiny: .*rotary"
    ):
        load_model(path)
