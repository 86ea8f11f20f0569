"""COCO detection and instance-segmentation metrics, computed by pycocotools' COCOeval.

AP is averaged over IoU thresholds 0.50:0.05:0.95 (AP50 and AP75 at one threshold each) and
over classes, with up to 100 detections per image; small / medium / large are objects of area
< 32², < 96², larger. Crowd annotations are ignore regions. Per-class AP is COCOeval's precision
table averaged over IoU thresholds and recall points for that class alone; a class without any
ground-truth instance has AP NaN and is left out of the means, as in COCOeval.
"""

from __future__ import annotations

import contextlib
import copy
import io
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from apps.detect.coco import encode_mask

__all__ = [
    "DetectionScores",
    "IouScores",
    "coco_scores",
    "ground_truth",
    "results_from_output",
]

#: COCOeval.stats entries, in its order.
STAT_NAMES = (
    "ap", "ap50", "ap75", "ap_small", "ap_medium", "ap_large",
    "ar1", "ar10", "ar100", "ar_small", "ar_medium", "ar_large",
)  # fmt: skip
IOU_TYPES = {"box": "bbox", "mask": "segm"}


@dataclass
class IouScores:
    """Scores of one kind (boxes or masks). ``precision``: COCOeval's (T=10 IoU thresholds,
    R=101 recall points, K classes) at all areas and 100 detections, -1 where undefined."""

    stats: dict[str, float]
    per_class_ap: list[float]
    precision: np.ndarray

    def pr_curve(self, iou: float | None = None) -> np.ndarray:
        """Precision at the 101 recall points, mean over classes with ground truth; at one IoU
        threshold (0.5, 0.55, ..., 0.95) or averaged over all of them (None)."""
        p = self.precision
        if iou is not None:
            p = p[[int(round((iou - 0.5) / 0.05))]]
        p = np.where(p > -1, p, np.nan)
        with np.errstate(invalid="ignore"), _quiet_nan_mean():
            return np.nanmean(np.nanmean(p, axis=2), axis=0)


@contextlib.contextmanager
def _quiet_nan_mean():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=RuntimeWarning)
        yield


@dataclass
class DetectionScores:
    box: IouScores
    mask: IouScores
    images: int
    detections: int

    def metrics(self) -> dict[str, float]:
        """AP, AP50 and AP75 of boxes and masks for the training log (as ``val_<key>``)."""
        out = {}
        for kind in ("box", "mask"):
            stats = getattr(self, kind).stats
            for name in ("ap", "ap50", "ap75"):
                out[f"{kind}_{name}"] = stats[name]
        return out

    def as_dict(self, class_names: Sequence[str]) -> dict[str, Any]:
        def clean(v: float) -> float | None:
            return None if math.isnan(v) else v

        report: dict[str, Any] = {"images": self.images, "detections": self.detections}
        for kind in ("box", "mask"):
            scores = getattr(self, kind)
            report[kind] = {k: clean(v) for k, v in scores.stats.items()}
            report[kind]["per_class_ap"] = {
                name: clean(ap) for name, ap in zip(class_names, scores.per_class_ap, strict=True)
            }
        return report


def ground_truth(images: Iterable[tuple[int, int, list[dict[str, Any]]]], num_classes: int) -> COCO:
    """An in-memory COCO from (width, height, annotations) per image; image i has id i,
    category ids are the labels 1..num_classes."""
    entries, anns = [], []
    for image_id, (width, height, objects) in enumerate(images):
        entries.append({"id": image_id, "width": width, "height": height})
        for obj in objects:
            anns.append({**obj, "id": len(anns) + 1, "image_id": image_id})
    categories = [{"id": k, "name": str(k)} for k in range(1, num_classes + 1)]
    coco = COCO()
    coco.dataset = {"images": entries, "annotations": anns, "categories": categories}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def results_from_output(
    image_id: int, output: dict[str, torch.Tensor], mask_threshold: float = 0.5
) -> list[dict[str, Any]]:
    """COCO results of one image from a detector's output (boxes xyxy, labels, scores,
    masks (n, 1, H, W) probabilities); ``category_id`` is the label."""
    boxes = output["boxes"].detach().float().cpu()
    labels = output["labels"].detach().cpu().tolist()
    scores = output["scores"].detach().float().cpu().tolist()
    masks = output.get("masks")
    binary = (masks[:, 0] > mask_threshold).cpu().numpy() if masks is not None else None
    results = []
    for k, (x1, y1, x2, y2) in enumerate(boxes.tolist()):
        entry = {
            "image_id": image_id,
            "category_id": int(labels[k]),
            "bbox": [x1, y1, x2 - x1, y2 - y1],
            "score": float(scores[k]),
        }
        if binary is not None:
            entry["segmentation"] = encode_mask(binary[k])
        results.append(entry)
    return results


def _nothing_detected(gt: COCO, num_classes: int) -> IouScores:
    """Scores without any detection (pycocotools cannot load an empty result list): 0 where
    there is ground truth to find, NaN where there is none (as COCOeval reports -1)."""
    areas = [a["area"] for a in gt.loadAnns(gt.getAnnIds(iscrowd=False))]
    ranges = {"": (0, math.inf), "_small": (0, 32**2), "_medium": (32**2, 96**2)}
    ranges["_large"] = (96**2, math.inf)
    present = {k: any(lo <= a < hi for a in areas) for k, (lo, hi) in ranges.items()}
    stats = {}
    for name in STAT_NAMES:
        suffix = next((k for k in ("_small", "_medium", "_large") if name.endswith(k)), "")
        stats[name] = 0.0 if present[suffix] else math.nan
    per_class = [
        0.0 if gt.getAnnIds(catIds=[k], iscrowd=False) else math.nan
        for k in range(1, num_classes + 1)
    ]
    return IouScores(stats, per_class, np.full((10, 101, num_classes), -1.0))


def _evaluate(gt: COCO, results: list[dict], iou_type: str, num_classes: int) -> IouScores:
    if iou_type == "segm":  # score masks by their own area, not their box's (as detectron2)
        results = [
            {k: v for k, v in r.items() if k != "bbox"} for r in results if "segmentation" in r
        ]
    else:
        results = [{k: v for k, v in r.items() if k != "segmentation"} for r in results]
    if not results:
        return _nothing_detected(gt, num_classes)
    with contextlib.redirect_stdout(io.StringIO()):
        detections = gt.loadRes(copy.deepcopy(results))
        evaluator = COCOeval(gt, detections, iou_type)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    stats = {
        name: (math.nan if value < 0 else float(value))
        for name, value in zip(STAT_NAMES, evaluator.stats, strict=True)
    }
    precision = evaluator.eval["precision"][:, :, :, 0, -1]  # all areas, 100 detections
    per_class = []
    for k in range(num_classes):
        values = precision[:, :, k]
        values = values[values > -1]
        per_class.append(float(values.mean()) if values.size else math.nan)
    return IouScores(stats, per_class, precision)


def coco_scores(gt: COCO, results: list[dict[str, Any]], num_classes: int) -> DetectionScores:
    """Box and mask scores of ``results`` (COCO results with ``category_id`` = label)."""
    box = _evaluate(gt, results, "bbox", num_classes)
    mask = _evaluate(gt, results, "segm", num_classes)
    return DetectionScores(box, mask, len(gt.getImgIds()), len(results))
