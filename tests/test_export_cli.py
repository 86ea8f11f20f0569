"""The apps' ``export --onnx`` commands: files that onnxruntime runs like the models."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import numpy as np
import ppma_models
import pytest
import torch

onnx = pytest.importorskip("onnx")
onnxruntime = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from apps.classify.export import add_export_parser as add_classify_export  # noqa: E402
from apps.classify.weights import load_classifier  # noqa: E402
from apps.engine import options as shared  # noqa: E402
from apps.engine.command import COMMAND_MODULES, run_command  # noqa: E402
from apps.engine.export_command import parse_size  # noqa: E402
from apps.engine.runspec import RunSpec  # noqa: E402
from apps.engine.weights import weights_exporter  # noqa: E402
from apps.segment.export import add_export_parser as add_segment_export  # noqa: E402
from apps.segment.model import ModelSpec, build_model, load_trained  # noqa: E402


def _main(package: str, add_parser, argv: list[str], monkeypatch) -> int:
    """The app's command line with ``export`` registered, run as its ``main`` runs commands."""
    monkeypatch.setitem(COMMAND_MODULES, "export", "export")
    parser, sub = shared.app_parser(f"python -m {package}", "")
    add_parser(sub)
    return run_command(parser, argv, check=shared.check_runtime_options, package=package)


def _session(path):
    return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _metadata(path) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load(path).metadata_props}


def test_classify_export_runs_in_onnxruntime(tmp_path, capsys, monkeypatch):
    torch.manual_seed(0)
    model = ppma_models.create_model("ppma_nano", num_classes=3, depths=(1, 1, 1, 1), in_chans=1)
    names = ["ant", "bee", "cat"]
    description = {"class_names": names, "input_size": [28, 28], "mean": [0.3], "std": [0.35]}
    checkpoint = tmp_path / "best.safetensors"
    meta = RunSpec("classify", description, {}).to_meta()
    weights_exporter("classify", names)(model, checkpoint, meta)
    path = tmp_path / "out" / "fm.onnx"
    argv = ["export", "--checkpoint", str(checkpoint), "--onnx", str(path)]
    assert _main("apps.classify", add_classify_export, argv, monkeypatch) == 0
    printed = capsys.readouterr().out
    assert f"wrote {path}" in printed and "onnxruntime vs PyTorch" in printed
    props = _metadata(path)
    assert json.loads(props["class_names"]) == names
    assert json.loads(props["input_size"]) == [28, 28]
    assert json.loads(props["mean"]) == [0.3] and json.loads(props["std"]) == [0.35]
    loaded = load_classifier(checkpoint).model
    session = _session(path)
    g = torch.Generator().manual_seed(1)
    for shape in [(4, 1, 28, 28), (1, 1, 36, 60)]:
        x = torch.randn(shape, generator=g)
        with torch.no_grad():
            expected = loaded(x).numpy()
        (got,) = session.run(None, {"image": x.numpy()})
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)


def test_segment_export_runs_in_onnxruntime(tmp_path, capsys, monkeypatch):
    torch.manual_seed(0)
    spec = ModelSpec(
        backbone="ppma_nano", num_classes=3, class_names=("sky", "road", "car"), channels=8,
        aux_channels=4, crop=64, backbone_args={"depths": (1, 1, 1, 1)},
    )  # fmt: skip
    checkpoint = tmp_path / "best.safetensors"
    meta = RunSpec("segment", spec.to_dict(), {}).to_meta()
    weights_exporter("segment", spec.class_names)(build_model(spec), checkpoint, meta)
    path = tmp_path / "seg.onnx"
    argv = ["export", str(checkpoint), "--onnx", str(path)]
    assert _main("apps.segment", add_segment_export, argv, monkeypatch) == 0
    assert "onnxruntime vs PyTorch" in capsys.readouterr().out
    assert json.loads(_metadata(path)["class_names"]) == ["sky", "road", "car"]
    model, _ = load_trained(checkpoint)
    session = _session(path)
    assert [o.name for o in session.get_outputs()] == ["logits"]  # no auxiliary head
    g = torch.Generator().manual_seed(2)
    for shape in [(2, 3, 64, 64), (1, 3, 90, 50)]:
        x = torch.randn(shape, generator=g)
        with torch.no_grad():
            expected = model(x).numpy()
        (got,) = session.run(None, {"image": x.numpy()})
        assert got.shape == (shape[0], 3, *shape[2:])
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)


def test_parsers_load_no_torch_and_default_to_the_library_s_opset():
    """The CLI builds these commands' parsers before it knows the command line is good."""
    code = (
        "import sys, apps.classify.explain, apps.classify.export, apps.segment.explain, "
        "apps.segment.export; print(sorted({'torch', 'numpy'} & set(sys.modules)))"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"
    from ppma_models.export import DEFAULT_OPSET

    from apps.engine.export_command import OPSET

    assert OPSET == DEFAULT_OPSET


@pytest.mark.parametrize(("text", "size"), [("32", (32, 32)), ("40,64", (40, 64))])
def test_input_size_option(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["0", "a,b", "1,2,3", "-4"])
def test_bad_input_size_is_refused(text):
    with pytest.raises(argparse.ArgumentTypeError):
        parse_size(text)
