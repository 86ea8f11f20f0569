"""Command-line mistakes and damaged run files end in one line naming the culprit, exit 2."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from ppma_models.checkpoint import save_safetensors
from ppma_models.registry import create_model, get_config

from apps.classify.cli import main as classify_main
from apps.classify.train import build_classifier
from apps.classify.weights import load_classifier
from apps.engine.checkpoint import CheckpointError, save_training_state, save_weights
from apps.engine.model_args import model_overrides
from apps.segment.cli import main as segment_main
from apps.segment.model import ModelSpec, build_model, load_trained

FAST = ["--no-progress", "--threads", "1", "--attention", "reference"]
# Two stages, ~10k parameters (as in the classify app tests).
TINY_ARGS = [
    "dims=8,16", "depths=1,1", "heads=2,2", "mlp_ratios=2,2", "attention_kinds=X,V",
    "layer_scale=false,false", "head_hidden=16",
]  # fmt: skip
TINY = [arg for item in TINY_ARGS for arg in ("--model-arg", item)]


def _one_line_error(capsys, *needles: str) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error")]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], err
    return lines[0]


# ------------------------------------------------------------------------- command lines
@pytest.mark.parametrize("below", [False, True])
def test_classify_out_that_is_a_file(tmp_path, capsys, below):
    existing = tmp_path / "notes.txt"
    existing.write_text("keep me")
    out = existing / "run" if below else existing
    argv = ["train", "--data", "digits", "--out", str(out), "--epochs", "1", *FAST]
    assert classify_main(argv) == 2
    _one_line_error(capsys, "--out", str(out), "not a directory")
    assert existing.read_text() == "keep me"


@pytest.mark.parametrize(
    ("item", "needle"),
    [
        ("dims=abc", "dims must be a list of integers"),
        ("head_hidden=0", "head_hidden must be >= 1"),
        ("dims=0,16", "dims must be >= 1"),
        ("head_hidden=1e9", "head_hidden must be an integer"),
        ("dims=8,1048576", "outside the limits"),
    ],
)
def test_classify_model_arg_values_are_checked(capsys, item, needle):
    argv = ["train", "--data", "digits", "--out", "unused", "--model-arg", item, *FAST]
    assert classify_main(argv) == 2
    _one_line_error(capsys, "--model-arg", needle)


def test_model_overrides_keep_working_configs():
    overrides = model_overrides("ppma_nano", TINY_ARGS)
    assert overrides["dims"] == (8, 16) and overrides["head_hidden"] == 16


def _rgb_pretrained(path: Path) -> torch.nn.Module:
    torch.manual_seed(0)
    overrides = model_overrides("ppma_nano", TINY_ARGS)
    model = create_model("ppma_nano", num_classes=10, **overrides)
    save_safetensors(model, path)
    return model.eval()


def test_pretrained_rgb_stem_is_folded_for_grey_data(tmp_path):
    rgb = _rgb_pretrained(tmp_path / "rgb.safetensors")
    args = argparse.Namespace(
        model="ppma_nano", drop_path=None,
        pretrained=str(tmp_path / "rgb.safetensors"),
    )  # fmt: skip
    grey = build_classifier(args, 10, 1, model_overrides("ppma_nano", TINY_ARGS)).eval()
    assert grey.in_chans == 1 and grey.config.in_chans == 1
    x = torch.rand(2, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(grey(x), rgb(x.expand(-1, 3, -1, -1)), atol=1e-5, rtol=1e-4)


def test_pretrained_rgb_into_digits_trains_a_grey_model(tmp_path, capsys):
    _rgb_pretrained(tmp_path / "rgb.safetensors")
    out = tmp_path / "run"
    argv = ["train", "--data", "digits", "--out", str(out), "--epochs", "1", "--subset", "64"]
    argv += ["--batch-size", "32", "--pretrained", str(tmp_path / "rgb.safetensors")]
    assert classify_main([*argv, *TINY, *FAST]) == 0
    loaded = load_classifier(out / "best.safetensors")
    assert loaded.in_chans == 1 and len(loaded.mean) == 1


def test_pretrained_stem_with_other_channels_is_refused(tmp_path, capsys):
    overrides = model_overrides("ppma_nano", [*TINY_ARGS, "in_chans=2"])
    model = create_model("ppma_nano", num_classes=10, **overrides)
    save_safetensors(model, tmp_path / "two.safetensors")
    argv = ["train", "--data", "digits", "--out", str(tmp_path / "run"), "--epochs", "1"]
    argv += ["--pretrained", str(tmp_path / "two.safetensors")]
    assert classify_main([*argv, *TINY, *FAST]) == 2
    _one_line_error(capsys, "--pretrained", "2 channels")


def _segment(argv: list[str]) -> int:
    """The segment CLI's exit status (option checks stop it with SystemExit)."""
    try:
        return segment_main(argv)
    except SystemExit as exc:
        return exc.code


def _segment_folder(root: Path, ids: list[int]) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    for i, top in enumerate(ids):
        image = rng.integers(0, 256, size=(16, 16, 3), dtype=np.uint8)
        mask = rng.integers(0, 2, size=(16, 16), dtype=np.uint8)
        mask[0, 0] = top
        Image.fromarray(image).save(root / "images" / f"{i}.png")
        Image.fromarray(mask).save(root / "masks" / f"{i}.png")
    return root


@pytest.mark.parametrize("command", ["train", "eval", "predict"])
def test_segment_out_that_is_a_file(tmp_path, capsys, command):
    existing = tmp_path / "notes.txt"
    existing.write_text("keep me")
    argv = {
        "train": ["train", "--data", str(tmp_path), "--out", str(existing)],
        "eval": ["eval", str(tmp_path), "--out", str(existing)],
        "predict": ["predict", str(tmp_path), str(tmp_path), "--out", str(existing)],
    }[command]
    assert _segment(argv) == 2
    _one_line_error(capsys, "--out", "not a directory")


@pytest.mark.parametrize(
    ("item", "needle"),
    [("dims=abc", "dims must be a list of integers"), ("dims=0,16", "dims must be >= 1")],
)
def test_segment_model_arg_values_are_checked(tmp_path, capsys, item, needle):
    data = _segment_folder(tmp_path / "data", [1] * 6)
    argv = ["train", "--data", str(data), "--out", str(tmp_path / "run"), "--model-arg", item]
    assert _segment([*argv, "--no-progress", "--attention", "reference"]) == 2
    _one_line_error(capsys, "--model-arg", needle)


# ------------------------------------------------------------------- damaged classifiers
def _tiny_meta() -> dict:
    config = get_config("ppma_nano").replace(**model_overrides("ppma_nano", TINY_ARGS))
    return {
        "task": "classification", "model": "ppma_nano",
        "model_config": config.replace(in_chans=1).to_dict(), "num_classes": 10,
        "class_names": [str(i) for i in range(10)], "in_chans": 1, "input_size": [8, 8],
        "mean": [0.3], "std": [0.38],
    }  # fmt: skip


def _training_state(path: Path, meta: dict, weights: dict | None = None) -> Path:
    if weights is None:
        config = dict(_tiny_meta()["model_config"])
        model = create_model("ppma_nano", num_classes=10, **config)
        weights = model.state_dict()
    save_training_state({"format": "ppma-training-state/1", "model": weights, "meta": meta}, path)
    return path


def test_intact_training_state_loads(tmp_path):
    loaded = load_classifier(_training_state(tmp_path / "last.pt", _tiny_meta()))
    assert loaded.in_chans == 1 and loaded.class_names[3] == "3"


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"num_classes": None}, "num_classes"),
        ({"model_config": "dims"}, "model_config"),
        ({"model_config": {"dims": ["a"]}}, "model_config"),
        ({"class_names": ["a"]}, "class_names"),
        ({"input_size": [8, "8"]}, "input_size"),
        ({"mean": [0.1, 0.2]}, "mean"),
        ({"std": [0.0]}, "std"),
    ],
)
def test_damaged_training_state_meta(tmp_path, change, needle):
    meta = {**_tiny_meta(), **change}
    if change == {"num_classes": None}:
        del meta["num_classes"]
    path = _training_state(tmp_path / "last.pt", meta, _tiny_weights())
    with pytest.raises(CheckpointError, match=needle) as exc:
        load_classifier(path)
    assert str(path) in str(exc.value)


def _tiny_weights() -> dict:
    config = dict(_tiny_meta()["model_config"])
    return create_model("ppma_nano", num_classes=10, **config).state_dict()


def test_huge_recorded_model_is_refused_before_allocation(tmp_path):
    meta = _tiny_meta()
    # Within the library's limits, but ~2^16 x 2^16 per layer: tens of GB if it were built.
    meta["model_config"] = {**meta["model_config"], "dims": [65536, 65536], "heads": [2, 2]}
    path = _training_state(tmp_path / "last.pt", meta, _tiny_weights())
    with pytest.raises(CheckpointError, match="do not fit") as exc:
        load_classifier(path)
    assert str(path) in str(exc.value)


def test_integer_weights_are_refused(tmp_path):
    weights = _tiny_weights()
    weights["stem.conv1.weight"] = torch.zeros_like(weights["stem.conv1.weight"], dtype=torch.int64)
    path = _training_state(tmp_path / "last.pt", _tiny_meta(), weights)
    with pytest.raises(CheckpointError, match="another kind") as exc:
        load_classifier(path)
    assert str(path) in str(exc.value)


def test_damaged_classifier_meta_in_safetensors(tmp_path, capsys):
    model = create_model("ppma_nano", num_classes=10, **_tiny_config())
    bad = tmp_path / "bad.safetensors"
    save_safetensors(model, bad, metadata={"classify": '{"class_names": ['})  # cut short
    with pytest.raises(CheckpointError, match="not valid JSON") as exc:
        load_classifier(bad)
    assert str(bad) in str(exc.value)
    argv = ["eval", "--checkpoint", str(bad), "--data", "digits", *FAST]
    assert classify_main(argv) == 2
    _one_line_error(capsys, str(bad))


def _tiny_config() -> dict:
    return dict(_tiny_meta()["model_config"])


def test_cli_shows_damaged_training_state_as_one_line(tmp_path, capsys):
    weights = _tiny_weights()
    weights["head.fc.bias"] = torch.zeros(10, dtype=torch.int32)
    path = _training_state(tmp_path / "last.pt", _tiny_meta(), weights)
    assert classify_main(["eval", "--checkpoint", str(path), "--data", "digits", *FAST]) == 2
    _one_line_error(capsys, str(path), "another kind")


# ----------------------------------------------------------------- damaged segment runs
SEG_ARGS = {"dims": [8, 16], "depths": [1, 1], "heads": [2, 2], "mlp_ratios": [2, 2],
            "attention_kinds": ["X", "V"], "layer_scale": [False, False]}  # fmt: skip


def _seg_spec(**change) -> dict:
    spec = ModelSpec("ppma_nano", 3, ("a", "b", "c"), channels=8, aux_channels=4,
                     backbone_args={k: tuple(v) for k, v in SEG_ARGS.items()})  # fmt: skip
    return {**spec.to_dict(), **change}


def _seg_weights(path: Path, spec: dict, weights: dict | None = None) -> Path:
    if weights is None:
        weights = build_model(ModelSpec.from_dict(_seg_spec())).state_dict()
    save_weights(weights, path, {"model": spec})
    return path


def test_intact_segment_weights_load(tmp_path):
    model, spec = load_trained(_seg_weights(tmp_path / "best.safetensors", _seg_spec()))
    assert spec.num_classes == 3 and not model.training


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"num_classes": "3"}, "num_classes"),
        ({"channels": 10**9}, "channels"),
        ({"class_names": ["a"]}, "class names"),
        ({"drop_path": "x"}, "drop_path"),
        ({"backbone": "nope"}, "unknown model"),
        ({"backbone_args": {"dims": "abc"}}, "dims must be a list"),
        ({"backbone_args": {**SEG_ARGS, "dims": [65536, 65536]}}, "do not fit"),
        ({"channels": 4096}, "do not fit"),
    ],
)
def test_damaged_segment_spec(tmp_path, change, needle):
    path = _seg_weights(tmp_path / "best.safetensors", _seg_spec(**change))
    with pytest.raises(CheckpointError, match=needle) as exc:
        load_trained(path)
    assert str(path) in str(exc.value)


def test_segment_integer_weights_are_refused(tmp_path, capsys):
    weights = build_model(ModelSpec.from_dict(_seg_spec())).state_dict()
    key = next(k for k, v in weights.items() if v.is_floating_point())
    weights[key] = weights[key].to(torch.int64)
    path = _seg_weights(tmp_path / "best.safetensors", _seg_spec(), weights)
    with pytest.raises(CheckpointError, match="another kind"):
        load_trained(path)
    data = _segment_folder(tmp_path / "data", [1])
    argv = ["predict", str(path), str(data / "images")]
    assert _segment([*argv, "--out", str(tmp_path / "pred"), "--attention", "reference"]) == 2
    _one_line_error(capsys, str(path), "another kind")


def test_resume_with_damaged_recipe(tmp_path, capsys):
    meta = {**_tiny_meta(), "recipe": {"out": "/elsewhere", "epochs": 3}}
    path = _training_state(tmp_path / "last.pt", meta, _tiny_weights())
    assert classify_main(["train", "--resume", str(path), *FAST]) == 2
    _one_line_error(capsys, "--resume", str(path), "recipe is damaged")


def test_segment_eval_with_damaged_data_description(tmp_path, capsys):
    weights = build_model(ModelSpec.from_dict(_seg_spec())).state_dict()
    path = tmp_path / "best.safetensors"
    damaged = {"kind": "folder", "train": "t", "val": 3}  # val should describe a folder
    save_weights(weights, path, {"model": _seg_spec(), "data": damaged})
    assert _segment(["eval", str(path), "--attention", "reference", "--no-progress"]) == 2
    _one_line_error(capsys, str(path), "data description")
