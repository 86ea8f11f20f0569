"""ONNX export: the file runs in onnxruntime at other sizes than it was traced at and agrees
with the model run in PyTorch (native ops) to 1e-4; only standard ONNX operators appear."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("onnxscript")
onnx = pytest.importorskip("onnx")
onnxruntime = pytest.importorskip("onnxruntime")

import ppma_ops  # noqa: E402
from ppma_models import create_model  # noqa: E402
from ppma_models.export import (  # noqa: E402
    AdaptiveAvgPoolByMatrices,
    OnnxExportError,
    check_onnx,
    export_onnx,
)
from ppma_models.segmentation import create_segmentation_model  # noqa: E402

# ppma_nano with one block per stage: every kind of layer, a short trace.
SMALL = {"depths": (1, 1, 1, 1), "head_hidden": 32}


def _run(path, x: torch.Tensor) -> list[np.ndarray]:
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})


def _dims(value) -> list[object]:
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


def _randomise_norms(model: torch.nn.Module, seed: int) -> None:
    """Trained-looking BatchNorm statistics and a head with O(1) logits, so that 1e-4 is a
    tight tolerance rather than a vacuous one."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
            m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
    head = getattr(model, "head", None)
    if head is not None:
        torch.nn.init.normal_(head.fc.weight, std=1.0, generator=g)


def test_classifier_agrees_with_pytorch_at_two_sizes(tmp_path):
    torch.manual_seed(0)
    model = create_model("ppma_nano", num_classes=7, **SMALL)
    _randomise_norms(model, 0)
    model.train()  # export must trace eval mode and hand the model back in training mode
    path = export_onnx(model, tmp_path / "nano.onnx", input_size=64)
    assert model.training
    assert ppma_ops.get_backend() == "native"

    graph = onnx.load(path).graph
    assert {node.domain for node in graph.node} <= {"", "ai.onnx"}  # no custom operators
    assert _dims(graph.input[0]) == ["batch", 3, "height", "width"]
    assert _dims(graph.output[0]) == ["batch", 7]

    model.eval()
    g = torch.Generator().manual_seed(1)
    for shape in [(3, 3, 64, 64), (1, 3, 72, 40)]:  # batch, height and width all change
        x = torch.randn(shape, generator=g)
        with torch.no_grad():
            expected = model(x)
        (got,) = _run(path, x)
        assert got.shape == (shape[0], 7)
        assert expected.abs().max() > 0.5
        np.testing.assert_allclose(got, expected.numpy(), rtol=0, atol=1e-4)
    errors = check_onnx(path, model, [(64, 64), (48, 80)])
    assert set(errors) == {(64, 64), (48, 80)}
    assert max(errors.values()) < 1e-4


def test_features_only_backbone_outputs_named_per_stage(tmp_path):
    torch.manual_seed(0)
    model = create_model("ppma_nano", features_only=True, out_indices=(1, 3), **SMALL).eval()
    _randomise_norms(model, 1)
    path = export_onnx(model, tmp_path / "backbone.onnx", input_size=(80, 64))
    graph = onnx.load(path).graph
    assert [o.name for o in graph.output] == ["stage1", "stage3"]
    x = torch.randn(2, 3, 96, 50, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = model(x)
    got = _run(path, x)
    for g, e in zip(got, expected, strict=True):
        assert g.shape == tuple(e.shape)
        np.testing.assert_allclose(g, e.numpy(), rtol=0, atol=1e-4)


def test_segmentation_model_agrees_at_two_sizes(tmp_path):
    torch.manual_seed(0)
    model = create_segmentation_model(
        "ppma_nano", num_classes=4, channels=16, aux_channels=None, **SMALL
    ).eval()
    _randomise_norms(model, 2)
    path = export_onnx(model, tmp_path / "seg.onnx", input_size=64)
    pools = [m for m in model.modules() if isinstance(m, torch.nn.AdaptiveAvgPool2d)]
    assert len(pools) == 4  # the pyramid pooling's, put back after tracing
    graph = onnx.load(path).graph
    assert _dims(graph.output[0]) == ["batch", 4, "height", "width"]
    g = torch.Generator().manual_seed(3)
    for shape in [(2, 3, 64, 64), (1, 3, 70, 90)]:
        x = torch.randn(shape, generator=g)
        with torch.no_grad():
            expected = model(x)
        (got,) = _run(path, x)
        assert got.shape == tuple(expected.shape) == (shape[0], 4, *shape[2:])
        np.testing.assert_allclose(got, expected.numpy(), rtol=0, atol=1e-4)


@pytest.mark.parametrize("out", [1, 2, 3, 6, (2, 5)])
@pytest.mark.parametrize("size", [(1, 1), (2, 3), (5, 7), (6, 6), (13, 4)])
def test_pooling_by_matrices_equals_adaptive_pooling(out, size):
    x = torch.randn(2, 3, *size, dtype=torch.float64)
    expected = torch.nn.AdaptiveAvgPool2d(out)(x)
    torch.testing.assert_close(AdaptiveAvgPoolByMatrices(out)(x), expected, rtol=0, atol=1e-12)


def test_static_export_fixes_the_input_shape(tmp_path):
    model = create_model("ppma_nano", num_classes=3, **SMALL).eval()
    path = export_onnx(model, tmp_path / "static.onnx", input_size=(40, 48), dynamic=False)
    graph = onnx.load(path).graph
    assert _dims(graph.input[0]) == [1, 3, 40, 48]
    x = torch.randn(1, 3, 40, 48)
    with torch.no_grad():
        expected = model(x)
    np.testing.assert_allclose(_run(path, x)[0], expected.numpy(), rtol=0, atol=1e-4)


class WidthBranch(torch.nn.Module):
    """Takes a Python branch on the input width: a trace keeps only the branch it took."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return 2 * y if x.shape[-1] % 2 else y


def test_verification_catches_a_trace_that_does_not_generalise(tmp_path):
    with pytest.raises(OnnxExportError, match="input size"):
        export_onnx(WidthBranch(), tmp_path / "branch.onnx", input_size=(65, 66))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"input_size": 0}, ValueError, "input_size"),
        ({"input_size": (32, 32, 3)}, ValueError, "input_size"),
        ({"batch_size": 0}, ValueError, "batch_size"),
        ({"opset": 13}, ValueError, "opset"),
    ],
)
def test_bad_arguments_are_named(tmp_path, kwargs, error, match):
    model = create_model("ppma_nano", num_classes=3, **SMALL)
    with pytest.raises(error, match=match):
        export_onnx(model, tmp_path / "m.onnx", **kwargs)


def test_refuses_what_is_not_a_module(tmp_path):
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        export_onnx(lambda x: x, tmp_path / "m.onnx")
    with pytest.raises(ValueError, match="is a directory"):
        export_onnx(create_model("ppma_nano", num_classes=3, **SMALL), tmp_path)
