"""Confusion-matrix metrics against a hand-computed example."""

from __future__ import annotations

import math

import pytest
import torch

from apps.segment.metrics import (
    ConfusionMatrix,
    confusion_matrix,
    correct_pixels,
    predicted_classes,
    scores_from_confusion,
)

# 3 classes, 255 = ignore. Truth and prediction of 10 pixels:
TRUTH = torch.tensor([[0, 0, 0, 1, 1], [1, 2, 2, 255, 255]])
PRED = torch.tensor([[0, 0, 1, 1, 2], [1, 2, 0, 2, 1]])


def test_hand_computed_example():
    counts = confusion_matrix(PRED, TRUTH, 3, ignore_index=255)
    # rows = truth, columns = prediction. Pixel by pixel:
    # truth 0: pred 0,0,1  | truth 1: pred 1,2,1 | truth 2: pred 2,0 | ignored: 2 pixels
    assert counts.tolist() == [[2, 1, 0], [0, 2, 1], [1, 0, 1]]
    s = scores_from_confusion(counts)
    # IoU_0 = 2 / (3 + 3 - 2) = 2/4; IoU_1 = 2 / (3 + 3 - 2) = 2/4; IoU_2 = 1 / (2 + 2 - 1) = 1/3
    assert s.per_class_iou == pytest.approx((0.5, 0.5, 1 / 3))
    assert s.miou == pytest.approx((0.5 + 0.5 + 1 / 3) / 3)
    assert s.pixel_accuracy == pytest.approx(5 / 8)


def test_absent_class_is_nan_and_left_out_of_the_mean():
    counts = confusion_matrix(torch.tensor([0, 1, 1]), torch.tensor([0, 1, 0]), 4)
    s = scores_from_confusion(counts)
    assert math.isnan(s.per_class_iou[2]) and math.isnan(s.per_class_iou[3])
    assert s.miou == pytest.approx((0.5 + 0.5) / 2)
    assert s.as_dict(("a", "b", "c", "d"))["per_class_iou"]["c"] is None


def test_accumulating_batches_equals_one_pass_and_reduction_sums():
    torch.manual_seed(0)
    logits = torch.randn(4, 5, 6, 7)
    target = torch.randint(0, 5, (4, 6, 7))
    target[0, 0, :3] = 255
    whole = ConfusionMatrix(5)
    whole.update(logits, target)
    parts = [ConfusionMatrix(5), ConfusionMatrix(5)]
    parts[0].update(logits[:2], target[:2])
    parts[1].update(logits[2:].argmax(1), target[2:])
    # A stand-in for all_reduce: every "rank" contributes its counts.
    parts[0].reduce(lambda t: t + parts[1].counts)
    assert torch.equal(parts[0].counts, whole.counts)
    assert int(whole.counts.sum()) == 4 * 6 * 7 - 3


def test_bad_targets_are_errors():
    with pytest.raises(ValueError, match="target has class ids outside 0..2"):
        confusion_matrix(torch.tensor([0, 1]), torch.tensor([0, 7]), 3)
    with pytest.raises(ValueError, match="pred shape"):
        confusion_matrix(torch.tensor([0, 1]), torch.tensor([0]), 3)


def test_predicted_classes_is_the_argmax_over_the_class_axis():
    torch.manual_seed(0)
    logits = torch.randn(3, 11, 7, 5, requires_grad=True)
    logits.data[0, 4, 2, 3] = 1e9  # one sure pixel
    pred = predicted_classes(logits)
    assert pred.shape == (3, 7, 5) and not pred.requires_grad
    assert torch.equal(pred, logits.detach().argmax(1))
    assert pred[0, 2, 3] == 4


def test_correct_pixels_counts_labelled_pixels_where_the_argmax_is_the_truth():
    torch.manual_seed(0)
    logits = torch.randn(2, 11, 9, 6, requires_grad=True)
    target = torch.randint(0, 11, (2, 9, 6))
    target[0, :3] = 255  # ignored pixels never count, whatever their logits
    logits.data[0, 0, :3] = 1e9
    expected = ((logits.detach().argmax(1) == target) & (target != 255)).sum()
    got = correct_pixels(logits, target, ignore_index=255)
    assert got.dtype == torch.int64 and got.dim() == 0 and not got.requires_grad
    assert int(got) == int(expected) > 0
    # Making the truth the top logit everywhere counts every labelled pixel.
    sure = logits.detach().scatter(1, target.clamp(max=10).unsqueeze(1), 1e9)
    assert int(correct_pixels(sure, target, ignore_index=255)) == 2 * 9 * 6 - 3 * 6
