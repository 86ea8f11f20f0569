"""``predict``: top-k labels for image files or folders, as a table or JSON."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from apps.classify.checkpoint_args import load_from_args
from apps.classify.datasets import IMAGE_EXTENSIONS, DataError, read_image
from apps.classify.transforms import Preprocess
from apps.engine import progress_bar, progress_enabled
from apps.engine.distributed import resolve_device

__all__ = ["collect_images", "format_table", "run_predict"]


def collect_images(inputs: list[str]) -> list[Path]:
    """Files as given; folders searched recursively for image files (sorted)."""
    paths: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
            if not found:
                raise DataError(f"{path}: no image files in this folder")
            paths.extend(found)
        elif path.is_file():
            paths.append(path)
        else:
            raise DataError(f"{path}: no such file or folder")
    return paths


@torch.no_grad()
def run_predict(args: argparse.Namespace) -> int:
    loaded = load_from_args(args)
    device = resolve_device(args.device)
    model = loaded.model.to(device).eval()
    preprocess = Preprocess(loaded.input_size, loaded.mean, loaded.std, channels=loaded.in_chans)
    paths = collect_images(args.inputs)
    k = min(args.top_k, len(loaded.class_names))
    results, failed = [], 0
    starts = range(0, len(paths), args.batch_size)
    show = progress_enabled(args.progress, True)
    for start in progress_bar(starts, total=len(starts), desc="predict", enabled=show):
        chunk, images = [], []
        for path in paths[start : start + args.batch_size]:
            try:
                images.append(preprocess(read_image(path, loaded.in_chans)))
                chunk.append(path)
            except Exception as exc:  # PIL raises many exception types for bad files
                failed += 1
                print(f"warning: skipping {path}: {type(exc).__name__}: {exc}", file=sys.stderr)
        if not images:
            continue
        probs = model(torch.stack(images).to(device)).float().softmax(1).cpu()
        top = probs.topk(k, dim=1)
        for path, values, indices in zip(chunk, top.values, top.indices, strict=True):
            results.append(
                {
                    "path": str(path),
                    "top_k": [
                        {"label": loaded.class_names[i], "index": int(i), "probability": float(p)}
                        for p, i in zip(values.tolist(), indices.tolist(), strict=True)
                    ],
                }
            )
    if not results:
        raise DataError(f"none of the {len(paths)} input image(s) could be read")
    if args.json:
        json.dump(results, sys.stdout, indent=2)
        print()
    else:
        print(format_table(results, k))
    return 1 if failed else 0


def format_table(results: list[dict], k: int) -> str:
    """One row per image: its path, then "label (probability)" per rank, every column as
    wide as its widest cell or header, so the columns line up under their headers."""
    header = ["image", *(f"top-{i + 1}" for i in range(k))]
    rows = [
        [r["path"], *(f"{t['label']} ({t['probability']:.3f})" for t in r["top_k"])]
        for r in results
    ]
    widths = [max(len(row[c]) for row in [header, *rows]) for c in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in
             [header, *rows]]  # fmt: skip
    return "\n".join(line.rstrip() for line in lines)
