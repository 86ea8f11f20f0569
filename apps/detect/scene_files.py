"""Writing the built-in scenes to disk as a COCO dataset, so any COCO tool can read them.

    OUT/images/train_000000.png ...   grey PNGs
    OUT/images/val_000000.png ...
    OUT/instances_train.json          masks as compressed RLE, crowd items as iscrowd=1
    OUT/instances_val.json

The folder is what ``--data OUT`` of the detect app reads, and trains the same model as
``--data scenes`` with the same scene options (the images are the same pixels).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image

from apps.detect.coco import write_coco
from apps.detect.data import SceneSource, scene_source
from apps.detect.scenes import INSTANCE_CLASSES
from apps.engine.progress import console
from apps.segment.scenes import SceneConfig

__all__ = ["run_scenes", "write_scene_split"]


def write_scene_split(source: SceneSource, out: Path, split: str) -> Path:
    """Write every scene of ``source`` as ``images/{split}_NNNNNN.png`` and their annotations
    as ``instances_{split}.json``; returns the JSON path."""
    images_dir = out / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    entries, instances = [], []
    for index in range(len(source)):
        image, objects = source.load(index)
        name = f"{split}_{index:06d}.png"
        Image.fromarray(image).save(images_dir / name)
        entries.append((name, image.shape[1], image.shape[0]))
        instances.append([(o.label, o.mask, o.crowd) for o in objects])
    return write_coco(out / f"instances_{split}.json", entries, instances, INSTANCE_CLASSES)


def run_scenes(args: argparse.Namespace) -> list[Path]:
    """``python -m apps.detect scenes``: the training and held-out scenes as COCO files."""
    config = SceneConfig(
        canvas=args.canvas,
        min_items=args.min_items,
        max_items=args.max_items,
        min_size=args.min_size,
        max_size=args.max_size,
    )
    out = Path(args.out)
    written = []
    for split, items, seed, count in (
        ("train", "train", args.scene_seed, args.train_scenes),
        ("val", "test", args.scene_seed + 1, args.val_scenes),
    ):
        source = scene_source(items, config, seed, count, args.fmnist_dir)
        written.append(write_scene_split(source, out, split))
    console(f"wrote {args.train_scenes} + {args.val_scenes} scenes to {out}")
    return written
