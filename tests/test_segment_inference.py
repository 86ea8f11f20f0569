"""Sliding-window inference against independently stitched windows and whole-image inference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from apps.segment.inference import sliding_window_logits, window_starts


class ContextModel(nn.Module):
    """Output depends on the whole window (a 3×3 conv plus the window's mean): windowed and
    whole-image results differ, so only exact stitching reproduces the oracle."""

    def __init__(self, classes: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, classes, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        return y + y.mean(dim=(2, 3), keepdim=True)


def test_window_starts_cover_and_end_flush():
    assert window_starts(10, 4, 3) == [0, 3, 6]
    assert window_starts(11, 4, 3) == [0, 3, 6, 7]
    assert window_starts(4, 4, 2) == [0]
    assert window_starts(3, 8, 4) == [0]
    with pytest.raises(ValueError, match="uncovered"):
        window_starts(10, 4, 5)


def test_non_overlapping_windows_equal_manually_stitched_predictions():
    torch.manual_seed(0)
    model = ContextModel().eval()
    x = torch.randn(2, 3, 48, 64)
    with torch.no_grad():
        got = sliding_window_logits(model, x, 4, window=(16, 32), stride=(16, 32))
        expected = torch.empty(2, 4, 48, 64)
        for top in range(0, 48, 16):
            for left in range(0, 64, 32):
                tile = x[:, :, top : top + 16, left : left + 32]
                expected[:, :, top : top + 16, left : left + 32] = model(tile)
        whole = model(x)
    torch.testing.assert_close(got, expected)
    assert not torch.allclose(got, whole, atol=1e-3)  # the windows really were separate


def test_overlapping_windows_are_averaged():
    torch.manual_seed(0)
    model = ContextModel().eval()
    x = torch.randn(1, 3, 20, 20)
    with torch.no_grad():
        got = sliding_window_logits(model, x, 4, window=12, stride=8)
        total = torch.zeros(1, 4, 20, 20)
        count = torch.zeros(20, 20)
        for top in (0, 8):
            for left in (0, 8):
                total[..., top : top + 12, left : left + 12] += model(
                    x[..., top : top + 12, left : left + 12]
                )
                count[top : top + 12, left : left + 12] += 1
    torch.testing.assert_close(got, total / count)


def test_pointwise_model_gives_whole_image_result_for_any_windows():
    torch.manual_seed(0)
    model = nn.Conv2d(3, 5, 1).eval()  # no spatial context: windows must not change anything
    x = torch.randn(2, 3, 37, 29)
    with torch.no_grad():
        whole = model(x)
        for window, stride in [(16, 16), (16, 5), (37, 10), (64, 64)]:
            torch.testing.assert_close(
                sliding_window_logits(model, x, 5, window, stride), whole, rtol=1e-6, atol=1e-6
            )


def test_wrong_model_output_is_reported():
    with pytest.raises(ValueError, match="expected .* logits at the window's resolution"):
        sliding_window_logits(lambda t: t[:, :2, ::2, ::2], torch.randn(1, 3, 8, 8), 2, 4, 4)


@pytest.mark.parametrize("mode", ["whole", "slide"])
def test_flip_and_scales_average_the_probabilities_of_each_view(mode):
    from apps.segment.evaluate import predict_logits

    torch.manual_seed(0)
    model = ContextModel().eval()
    x = torch.randn(2, 3, 10, 13)
    kw = {"window": 6, "stride": 4}
    with torch.no_grad():
        plain = predict_logits(model, x, 4, mode, **kw)
        mirrored = predict_logits(model, x.flip(-1), 4, mode, **kw).flip(-1)
        flipped = predict_logits(model, x, 4, mode, **kw, flip=True)
        big = F.interpolate(x, size=(15, 20), mode="bilinear", align_corners=False)
        scaled = F.interpolate(
            predict_logits(model, big, 4, mode, **kw), size=(10, 13), mode="bilinear",
            align_corners=False,
        )  # fmt: skip
        multi = predict_logits(model, x, 4, mode, **kw, scales=(1.0, 1.5))
    assert not torch.allclose(plain, mirrored)  # the model is not mirror-symmetric
    expected = ((plain.softmax(1) + mirrored.softmax(1)) / 2).log()
    torch.testing.assert_close(flipped, expected)
    expected = ((plain.softmax(1) + scaled.softmax(1)) / 2).log()
    torch.testing.assert_close(multi, expected)
    with pytest.raises(ValueError, match="scales"):
        predict_logits(model, x, 4, mode, **kw, scales=(0.0,))
