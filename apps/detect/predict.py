"""``python -m apps.detect predict``: boxes, labels and masks drawn on images, and COCO results.

For each input image ``NAME.ext`` it writes ``NAME_detections.png`` (masks, boxes and
"label score" captions drawn with torchvision's drawing utilities) and adds its detections to
``results.json`` (COCO results format: ``image_id`` numbers the inputs in order, listed with
their files in ``images.json``; ``category_id`` is the dataset's id of the class). Unreadable
images are reported and skipped; the command fails only if none could be read.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

from apps.data.images import decode_image
from apps.detect.metrics import results_from_output
from apps.detect.model import load_trained
from apps.detect.transforms import to_image
from apps.engine.distributed import resolve_device
from apps.engine.options import OptionError
from apps.engine.progress import console
from apps.segment.folder import IMAGE_SUFFIXES
from apps.segment.palette import palette

__all__ = ["collect_inputs", "draw_detections", "run_predict"]


def collect_inputs(inputs: list[str]) -> list[Path]:
    """Image files from files and directories (a directory's images, sorted, not recursive)."""
    paths: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            paths += sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        elif p.is_file():
            paths.append(p)
        else:
            raise OptionError(f"input {item} does not exist")
    if not paths:
        raise OptionError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found in {inputs}")
    return paths


def draw_detections(
    image: np.ndarray,
    output: dict[str, torch.Tensor],
    class_names: tuple[str, ...],
    mask_threshold: float = 0.5,
    alpha: float = 0.5,
) -> np.ndarray:
    """RGB uint8 (H, W, 3) with each detection's mask, box and "name score" drawn on it."""
    rgb = torch.from_numpy(np.ascontiguousarray(image))
    rgb = rgb[None].expand(3, -1, -1) if rgb.ndim == 2 else rgb.permute(2, 0, 1)
    labels = output["labels"].tolist()
    if not labels:
        return rgb.permute(1, 2, 0).numpy().copy()
    colours = palette(len(class_names) + 1)
    colour_of = [tuple(int(c) for c in colours[label]) for label in labels]
    masks = output["masks"][:, 0] > mask_threshold
    drawn = draw_segmentation_masks(rgb.contiguous(), masks, alpha=alpha, colors=colour_of)
    captions = [
        f"{class_names[label - 1]} {score:.2f}"
        for label, score in zip(labels, output["scores"].tolist(), strict=True)
    ]
    boxes = output["boxes"].float()
    drawn = draw_bounding_boxes(drawn, boxes, labels=captions, colors=colour_of, width=1)
    return drawn.permute(1, 2, 0).numpy().copy()


@torch.no_grad()
def run_predict(args: argparse.Namespace) -> list[Path]:
    """Detect in every input image; returns the written pictures."""
    device = resolve_device(args.device)
    model, spec = load_trained(args.checkpoint)
    model.to(device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    written, failed, results, listed = [], [], [], []
    for path in collect_inputs(args.inputs):
        try:
            image = decode_image(path, 3)
        except (OSError, UnidentifiedImageError, ValueError) as exc:
            failed.append(f"{path}: {exc}")
            console(f"skipped unreadable image {path}: {exc}")
            continue
        (output,) = model([to_image(image).as_subclass(torch.Tensor).to(device)])
        keep = output["scores"] >= args.score_thresh
        output = {k: v[keep].cpu() for k, v in output.items()}
        image_id = len(listed)
        listed.append({"id": image_id, "file_name": str(path), "height": image.shape[0],
                       "width": image.shape[1]})  # fmt: skip
        for r in results_from_output(image_id, output, args.mask_thresh):
            results.append({**r, "category_id": spec.category_ids[r["category_id"] - 1]})
        picture = draw_detections(image, output, spec.class_names, args.mask_thresh)
        target = out / f"{path.stem}_detections.png"
        Image.fromarray(picture).save(target)
        found = [spec.class_names[label - 1] for label in output["labels"].tolist()]
        print(f"{path.name}: {len(found)} detection(s) {', '.join(found[:8])}")
        written.append(target)
    (out / "results.json").write_text(json.dumps(results) + "\n")
    (out / "images.json").write_text(json.dumps(listed, indent=2) + "\n")
    if not written:
        raise OptionError("no input image could be read:\n  " + "\n  ".join(failed))
    console(f"wrote {len(written)} picture(s) and results.json to {out}")
    return written
