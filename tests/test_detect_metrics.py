"""COCO metrics of the detect app against closed-form cases and pycocotools run by hand."""

from __future__ import annotations

import contextlib
import io
import json
import math

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from apps.detect.coco import encode_mask
from apps.detect.metrics import coco_scores, ground_truth, results_from_output


def _rect(h, w, x1, y1, x2, y2) -> np.ndarray:
    mask = np.zeros((h, w), np.uint8)
    mask[y1:y2, x1:x2] = 1
    return mask


def _gt_object(label, mask, crowd=False):
    ys, xs = np.nonzero(mask)
    x1, y1 = int(xs.min()), int(ys.min())
    box = [x1, y1, int(xs.max()) + 1 - x1, int(ys.max()) + 1 - y1]
    return {"category_id": label, "bbox": box, "area": int(mask.sum()),
            "segmentation": encode_mask(mask), "iscrowd": int(crowd)}  # fmt: skip


def _output(boxes, labels, scores, masks):
    return {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "labels": torch.tensor(labels),
        "scores": torch.tensor(scores),
        "masks": torch.from_numpy(np.stack(masks)[:, None].astype(np.float32)),
    }


def test_perfect_predictions_score_one():
    objects = [
        [_gt_object(1, _rect(60, 60, 5, 5, 25, 30)), _gt_object(3, _rect(60, 60, 30, 10, 58, 50))],
        [_gt_object(1, _rect(60, 60, 0, 0, 60, 12))],
    ]
    gt = ground_truth([(60, 60, objs) for objs in objects], num_classes=4)
    results = []
    for image_id, objs in enumerate(objects):
        for obj in objs:
            x, y, w, h = obj["bbox"]
            mask = _rect(60, 60, x, y, x + w, y + h)
            out = _output([[x, y, x + w, y + h]], [obj["category_id"]], [0.9], [mask])
            results += results_from_output(image_id, out)
    scores = coco_scores(gt, results, num_classes=4)
    for kind in (scores.box, scores.mask):
        assert kind.stats["ap"] == pytest.approx(1.0)
        assert kind.stats["ap50"] == pytest.approx(1.0) and kind.stats["ap75"] == pytest.approx(1.0)
        assert kind.per_class_ap[0] == pytest.approx(1.0)
        assert kind.per_class_ap[2] == pytest.approx(1.0)
        assert math.isnan(kind.per_class_ap[1]) and math.isnan(kind.per_class_ap[3])
    assert scores.images == 2 and scores.detections == 3


def _pycocotools_by_hand(tmp_path, gt_doc, results, iou_type):
    (tmp_path / "gt.json").write_text(json.dumps(gt_doc))
    (tmp_path / "dt.json").write_text(json.dumps(results))
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(tmp_path / "gt.json"))
        evaluator = COCOeval(gt, gt.loadRes(str(tmp_path / "dt.json")), iou_type)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator.stats


def test_shifted_box_scores_what_pycocotools_gives(tmp_path):
    """A 20x20 object found 4 px to the right: IoU 16/24 = 0.667, a hit at thresholds 0.50 to
    0.65 and a miss above, so AP = 4/10, AP50 = 1, AP75 = 0 -- for its box and its mask."""
    mask = _rect(64, 64, 10, 10, 30, 30)
    gt = ground_truth([(64, 64, [_gt_object(2, mask)])], num_classes=2)
    shifted = _rect(64, 64, 14, 10, 34, 30)
    results = results_from_output(0, _output([[14, 10, 34, 30]], [2], [0.8], [shifted]))
    scores = coco_scores(gt, results, num_classes=2)
    for kind in (scores.box, scores.mask):
        assert kind.stats["ap"] == pytest.approx(0.4)
        assert (kind.stats["ap50"], kind.stats["ap75"]) == (pytest.approx(1.0), 0.0)
        assert kind.per_class_ap[1] == pytest.approx(0.4)
    doc = {
        "images": [{"id": 0, "width": 64, "height": 64}],
        "annotations": [{**_gt_object(2, mask), "id": 1, "image_id": 0}],
        "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
    }
    box_results = [{k: v for k, v in r.items() if k != "segmentation"} for r in results]
    mask_results = [{k: v for k, v in r.items() if k != "bbox"} for r in results]
    by_hand_box = _pycocotools_by_hand(tmp_path, doc, box_results, "bbox")
    by_hand_mask = _pycocotools_by_hand(tmp_path, doc, mask_results, "segm")
    assert by_hand_box[0] == pytest.approx(scores.box.stats["ap"])
    assert by_hand_mask[0] == pytest.approx(scores.mask.stats["ap"])


def test_random_case_matches_pycocotools_on_files(tmp_path):
    rng = np.random.default_rng(0)
    images, results, anns = [], [], []
    for image_id in range(6):
        objects = []
        for _ in range(rng.integers(1, 4)):
            x, y = rng.integers(0, 40, 2)
            w, h = rng.integers(6, 24, 2)
            objects.append(_gt_object(int(rng.integers(1, 4)), _rect(64, 64, x, y, x + w, y + h)))
        images.append((64, 64, objects))
        anns += [
            {**o, "id": len(anns) + k + 1, "image_id": image_id} for k, o in enumerate(objects)
        ]
        for o in objects:
            x, y, w, h = (v + int(rng.integers(-3, 4)) for v in o["bbox"])
            x, y = max(x, 0), max(y, 0)
            label = o["category_id"] if rng.random() < 0.8 else int(rng.integers(1, 4))
            out = _output([[x, y, x + w, y + h]], [label], [float(rng.random())],
                          [_rect(64, 64, x, y, x + max(w, 1), y + max(h, 1))])  # fmt: skip
            results += results_from_output(image_id, out)
    scores = coco_scores(ground_truth(images, 3), results, 3)
    doc = {
        "images": [{"id": i, "width": 64, "height": 64} for i in range(6)],
        "annotations": anns,
        "categories": [{"id": k, "name": str(k)} for k in (1, 2, 3)],
    }
    box = _pycocotools_by_hand(
        tmp_path,
        doc,
        [{k: v for k, v in r.items() if k != "segmentation"} for r in results],
        "bbox",
    )
    mask = _pycocotools_by_hand(
        tmp_path, doc, [{k: v for k, v in r.items() if k != "bbox"} for r in results], "segm"
    )
    names = ("ap", "ap50", "ap75", "ap_small", "ap_medium", "ap_large")
    for i, name in enumerate(names):
        for ours, theirs in ((scores.box.stats[name], box[i]), (scores.mask.stats[name], mask[i])):
            assert (math.isnan(ours) and theirs == -1) or ours == pytest.approx(theirs), name
    assert 0.0 < scores.box.stats["ap"] < 1.0


def test_no_detections_score_zero_where_there_is_something_to_find():
    gt = ground_truth([(64, 64, [_gt_object(1, _rect(64, 64, 0, 0, 10, 10))])], num_classes=2)
    scores = coco_scores(gt, [], 2)
    assert scores.box.stats["ap"] == 0.0 and scores.mask.stats["ap_small"] == 0.0
    assert math.isnan(scores.box.stats["ap_large"])
    assert scores.box.per_class_ap[0] == 0.0 and math.isnan(scores.box.per_class_ap[1])


def test_results_are_coco_format():
    mask = np.zeros((8, 8), np.float32)
    mask[2:4, 1:6] = 0.9
    out = _output([[1.0, 2.0, 6.0, 4.0]], [3], [0.7], [mask])
    (result,) = results_from_output(5, out)
    assert result["image_id"] == 5 and result["category_id"] == 3
    assert result["bbox"] == pytest.approx([1.0, 2.0, 5.0, 2.0])
    assert result["score"] == pytest.approx(0.7)
    assert json.loads(json.dumps(result)) == result
