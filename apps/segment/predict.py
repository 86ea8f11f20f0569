"""``python -m apps.segment predict``: colour-coded masks and overlays for image files.

For each input image ``NAME.ext`` it writes ``NAME_mask.png`` (a palette PNG whose pixel values
are the predicted class ids) and ``NAME_overlay.png`` (the mask blended over the image), plus a
``legend.json`` mapping class ids to names and colours. Unreadable images are reported and
skipped; the command fails only if none could be read.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from apps.engine.distributed import resolve_device
from apps.engine.options import OptionError
from apps.engine.progress import console
from apps.segment.evaluate import predict_logits
from apps.segment.folder import IMAGE_SUFFIXES, read_image
from apps.segment.model import load_trained
from apps.segment.palette import overlay, palette, save_index_png
from apps.segment.transforms import to_tensors

__all__ = ["collect_inputs", "run_predict"]


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


@torch.no_grad()
def run_predict(args) -> list[Path]:
    """Predict every input image; returns the written mask paths."""
    device = resolve_device(args.device)
    model, spec = load_trained(args.checkpoint)
    model.to(device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    window = args.window or spec.crop
    stride = args.stride or max(1, (2 * window) // 3)
    written, failed = [], []
    for path in collect_inputs(args.inputs):
        try:
            image = read_image(path)
        except (OSError, UnidentifiedImageError, ValueError) as exc:
            failed.append(f"{path}: {exc}")
            console(f"skipped unreadable image {path}: {exc}")
            continue
        x = to_tensors(image)[None].to(device)
        logits = predict_logits(model, x, spec.num_classes, args.mode, window, stride, args.flip)
        mask = logits.argmax(1)[0].cpu().numpy().astype(np.int64)
        mask_path = out / f"{path.stem}_mask.png"
        save_index_png(mask, mask_path, spec.num_classes)
        Image.fromarray(overlay(image, mask, spec.num_classes, args.alpha)).save(
            out / f"{path.stem}_overlay.png"
        )
        present = np.bincount(mask.ravel(), minlength=spec.num_classes) / mask.size
        top = [
            f"{spec.class_names[c]} {100 * present[c]:.0f}%"
            for c in np.argsort(-present)[:4]
            if present[c] > 0
        ]
        print(f"{path.name}: {', '.join(top)}")
        written.append(mask_path)
    colours = palette(spec.num_classes).tolist()
    legend = [{"id": i, "name": n, "rgb": colours[i]} for i, n in enumerate(spec.class_names)]
    (out / "legend.json").write_text(json.dumps(legend, indent=2) + "\n")
    if not written:
        raise OptionError("no input image could be read:\n  " + "\n  ".join(failed))
    console(f"wrote {len(written)} mask(s) and overlay(s) to {out}")
    return written
