"""The apps' ``explain`` commands: pictures and arrays for our checkpoints and the authors'."""

from __future__ import annotations

import argparse

import numpy as np
import ppma_models
import pytest
import torch
from PIL import Image
from ppma_mask import polyline_mask

from apps.classify.datasets import DataError
from apps.classify.explain import add_explain_parser as add_classify_explain
from apps.classify.transforms import Preprocess
from apps.engine import options as shared
from apps.engine.command import COMMAND_MODULES, run_command
from apps.engine.runspec import RunSpec
from apps.engine.weights import weights_exporter
from apps.segment.explain import add_explain_parser as add_segment_explain
from apps.segment.explain import window_around
from apps.segment.model import ModelSpec, build_model
from apps.segment.transforms import to_tensors

MEAN, STD = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]


def _main(package: str, add_parser, argv: list[str], monkeypatch) -> int:
    """The app's command line with ``explain`` registered, run as its ``main`` runs commands."""
    monkeypatch.setitem(COMMAND_MODULES, "explain", "explain")
    parser, sub = shared.app_parser(f"python -m {package}", "")
    add_parser(sub)
    check = shared.check_runtime_options
    return run_command(parser, argv, check=check, package=package, errors=(DataError,))


def _classify(argv, monkeypatch) -> int:
    return _main("apps.classify", add_classify_explain, argv, monkeypatch)


def _segment(argv, monkeypatch) -> int:
    return _main("apps.segment", add_segment_explain, argv, monkeypatch)


def _photo(path, height: int, width: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    pixels = (rng.random((height, width, 3)) * 255).astype(np.uint8)
    Image.fromarray(pixels).save(path)
    return pixels


@pytest.fixture(scope="module")
def classifier_file(tmp_path_factory):
    torch.manual_seed(0)
    model = ppma_models.create_model("ppma_nano", num_classes=3, depths=(1, 1, 1, 1))
    path = tmp_path_factory.mktemp("run") / "best.safetensors"
    names = ["ant", "bee", "cat"]
    description = {"class_names": names, "input_size": [32, 32], "mean": MEAN, "std": STD}
    weights_exporter("classify", names)(model, path, RunSpec("classify", description, {}).to_meta())
    return path, model.eval()


def test_classify_explain_writes_picture_and_arrays(classifier_file, tmp_path, capsys, monkeypatch):
    path, model = classifier_file
    pixels = _photo(tmp_path / "photo.png", 40, 40)
    out = tmp_path / "maps"
    argv = ["explain", str(tmp_path / "photo.png"), "--checkpoint", str(path), "--out", str(out)]
    assert _classify([*argv, "--pixel", "5,20", "--heads", "0"], monkeypatch) == 0
    printed = capsys.readouterr().out
    assert (out / "explain.png").read_bytes()[:4] == b"\x89PNG"
    x = Preprocess((32, 32), MEAN, STD, channels=3)(torch.from_numpy(pixels).permute(2, 0, 1))
    with torch.no_grad():
        logits = model(x[None])[0]
    label = ["ant", "bee", "cat"][int(logits.argmax())]
    assert printed.startswith(f"{tmp_path / 'photo.png'}: {label} (")
    with np.load(out / "explain.npz") as z:
        np.testing.assert_array_equal(z["pixel"], [5, 20])
        np.testing.assert_allclose(z["output"], logits.numpy(), rtol=0, atol=1e-5)
        assert z["image"].shape == (32, 32, 3)
        stages = sorted({k.split("/")[0] for k in z.files if "/" in k})
        assert stages == ["stage0", "stage1", "stage2", "stage3"]
        a, b = z["stage1/block0/log_alpha"][1], z["stage1/block0/log_beta"][1]
        i, j = z["stage1/block0/query"]
        assert (i, j) == (5 * 4 // 32, 20 * 4 // 32)  # stage 1: a 4x4 grid over 32x32 pixels
        expected = polyline_mask(a, b, "sum")[i * 4 + j].reshape(4, 4) / 2
        np.testing.assert_allclose(z["stage1/block0/mask_mean"][1], expected, atol=1e-12)


def test_classify_explain_reads_the_authors_checkpoint(tmp_path, capsys, monkeypatch):
    from ppma_models.convert import convert_to_upstream

    torch.manual_seed(1)
    raw = ppma_models.create_model("ppma_nano", num_classes=4)
    ema = ppma_models.create_model("ppma_nano", num_classes=4)
    path = tmp_path / "authors.pth"
    torch.save(
        {
            "model": convert_to_upstream(raw.state_dict()),
            "model_ema": convert_to_upstream(ema.state_dict()),
            "args": argparse.Namespace(model="upstream_name"),
        },
        path,
    )
    _photo(tmp_path / "photo.jpg", 300, 260, seed=2)
    argv = ["explain", str(tmp_path / "photo.jpg"), "--checkpoint", str(path), "--model"]
    out = tmp_path / "authors-maps"
    assert _classify([*argv, "ppma_nano", "--out", str(out)], monkeypatch) == 0
    assert "class_" in capsys.readouterr().out  # the authors' files name no classes
    with np.load(out / "explain.npz") as z:
        np.testing.assert_array_equal(z["pixel"], [112, 112])  # centre of the 224x224 input
        assert z["stage0/block0/attention"].shape == (2, 56, 56)


def test_classify_explain_refuses_bad_options(classifier_file, tmp_path, capsys, monkeypatch):
    path, _ = classifier_file
    _photo(tmp_path / "photo.png", 40, 40)
    argv = ["explain", str(tmp_path / "photo.png"), "--checkpoint", str(path)]
    out = ["--out", str(tmp_path / "o")]
    assert _classify([*argv, "--pixel", "32,0", *out], monkeypatch) == 2
    assert "error: --pixel (32, 0) lies outside the 32x32 model input" in capsys.readouterr().err
    assert _classify([*argv, "--heads", "9", *out], monkeypatch) == 2
    assert "error: --heads [9]: no layer has these heads" in capsys.readouterr().err
    (tmp_path / "broken.png").write_bytes(b"not an image")
    broken = ["explain", str(tmp_path / "broken.png"), "--checkpoint", str(path), *out]
    assert _classify(broken, monkeypatch) == 2
    assert "cannot read the image" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _classify([*argv, "--pixel", "3"], monkeypatch)  # argparse: ROW,COL


@pytest.mark.parametrize(
    ("pixel", "length", "window", "start"),
    [(0, 100, 64, 0), (50, 100, 64, 18), (99, 100, 64, 36), (10, 40, 40, 0)],
)
def test_window_is_centred_on_the_pixel_within_the_image(pixel, length, window, start):
    assert window_around(pixel, length, window) == start


def test_segment_explain_for_a_pixel(tmp_path, capsys, monkeypatch):
    torch.manual_seed(0)
    spec = ModelSpec(
        backbone="ppma_nano", num_classes=3, class_names=("sky", "road", "car"), channels=8,
        aux_channels=0, crop=64, backbone_args={"depths": (1, 1, 1, 1)},
    )  # fmt: skip
    model = build_model(spec).eval()
    checkpoint = tmp_path / "best.safetensors"
    meta = RunSpec("segment", spec.to_dict(), {}).to_meta()
    weights_exporter("segment", spec.class_names)(model, checkpoint, meta)
    pixels = _photo(tmp_path / "street.png", 100, 80, seed=3)
    out = tmp_path / "seg-maps"
    argv = ["explain", str(checkpoint), str(tmp_path / "street.png"), "--pixel", "90,10"]
    assert _segment([*argv, "--out", str(out), "--layers", "all"], monkeypatch) == 0
    crop = pixels[36:100, 0:64]  # the 64-pixel window around (90, 10), inside the image
    with torch.no_grad():
        logits = model(to_tensors(crop)[None])[0]
    label = spec.class_names[int(logits[:, 54, 10].argmax())]
    assert capsys.readouterr().out.startswith(f"{tmp_path / 'street.png'} pixel (90, 10): {label};")
    with np.load(out / "explain.npz") as z:
        np.testing.assert_array_equal(z["window"], [36, 0, 64, 64])
        np.testing.assert_array_equal(z["pixel"], [54, 10])
        np.testing.assert_array_equal(z["image"], crop / 255.0)
        np.testing.assert_allclose(z["output"], logits.numpy(), rtol=0, atol=1e-5)
        assert z["stage3/block0/query"].tolist() == [54 * 2 // 64, 10 * 2 // 64]
    assert _segment([*argv[:-1], "100,0", "--out", str(out)], monkeypatch) == 2
    assert "error: --pixel 100,0 lies outside the 100x80 image" in capsys.readouterr().err
