"""``eval``: top-1/top-5 accuracy, per-class accuracy, confusion matrix (PNG + JSON report).

The report's keys are ``top1`` and ``top<k>`` (k = 5, or the number of classes when fewer);
printed, they read "top-1" and "top-5".
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from apps.classify.checkpoint_args import load_from_args
from apps.classify.datasets import (
    DataError,
    collate_skipping_failed,
    default_eval_split,
    load_split,
)
from apps.classify.transforms import Preprocess
from apps.classify.weights import LoadedClassifier
from apps.engine import (
    DistributedContext,
    ShardSampler,
    atomic_write,
    init_distributed,
    plot_confusion_matrix,
    progress_bar,
    progress_enabled,
)

__all__ = ["evaluate_classifier", "run_eval"]


@torch.no_grad()
def evaluate_classifier(
    loaded: LoadedClassifier,
    loader: DataLoader,
    ctx: DistributedContext,
    *,
    show_progress: bool = False,
    flip: bool = False,
) -> dict:
    """Counts summed over ranks: confusion matrix, top-1/top-5 hits, cross-entropy.

    ``flip``: also run each mirrored image and score the mean of the two softmax
    probabilities (flip test-time augmentation); the loss is that mean's cross-entropy.
    """
    n = len(loaded.class_names)
    model = loaded.model.to(ctx.device).eval()
    confusion = torch.zeros(n, n, dtype=torch.float64, device=ctx.device)
    sums = torch.zeros(3, dtype=torch.float64, device=ctx.device)  # top5 hits, loss, count
    k = min(5, n)
    for batch in progress_bar(loader, total=len(loader), desc="eval", enabled=show_progress):
        if batch is None:
            continue
        x, y = (t.to(ctx.device) for t in batch)
        logits = model(x).float()
        if flip:  # log of the mean probability: argmax, top-k and loss of the average
            mirrored = model(x.flip(-1)).float()
            both = torch.logaddexp(logits.log_softmax(1), mirrored.log_softmax(1))
            logits = both - math.log(2.0)
        pred = logits.argmax(1)
        confusion.index_put_((y, pred), torch.ones_like(y, dtype=torch.float64), accumulate=True)
        topk = logits.topk(k, dim=1).indices
        sums[0] += (topk == y[:, None]).any(1).sum()
        sums[1] += torch.nn.functional.cross_entropy(logits, y, reduction="sum")
        sums[2] += len(y)
    ctx.all_reduce_sum(confusion)
    ctx.all_reduce_sum(sums)
    matrix = confusion.cpu().numpy().astype(np.int64)
    count = int(sums[2])
    if count == 0:
        raise DataError("no image could be evaluated")
    per_class_count = matrix.sum(1)
    per_class = {
        name: {
            "accuracy": float(matrix[i, i] / per_class_count[i]) if per_class_count[i] else None,
            "count": int(per_class_count[i]),
        }
        for i, name in enumerate(loaded.class_names)
    }
    return {
        "num_images": count,
        "top1": float(np.trace(matrix) / count),
        f"top{k}": float(sums[0] / count),
        "loss": float(sums[1] / count),
        "per_class": per_class,
        "confusion_matrix": matrix.tolist(),
    }


def run_eval(args: argparse.Namespace) -> int:
    if args.split is None:
        args.split = default_eval_split(args.data)
    ctx = init_distributed(args.device)
    try:
        loaded = load_from_args(args)
        dataset, spec = load_split(
            args.data,
            args.split,
            data_dir=args.data_dir,
            input_size=loaded.input_size[0],
            channels=loaded.in_chans,
            class_names=None if loaded.source.startswith("authors") else loaded.class_names,
        )
        if len(spec.class_names) != len(loaded.class_names):
            raise DataError(
                f"the model predicts {len(loaded.class_names)} classes but --data {args.data} "
                f"has {len(spec.class_names)}"
            )
        dataset.transform = Preprocess(
            loaded.input_size, loaded.mean, loaded.std, channels=loaded.in_chans
        )
        sampler = ShardSampler(len(dataset), ctx.rank, ctx.world_size)
        loader = DataLoader(
            dataset,
            batch_size=args.batch_size,
            sampler=sampler,
            num_workers=args.workers,
            collate_fn=collate_skipping_failed,
        )
        show = progress_enabled(args.progress, ctx.is_main)
        report = evaluate_classifier(loaded, loader, ctx, show_progress=show, flip=args.flip)
        if not ctx.is_main:
            return 0
        report = {
            "checkpoint": str(args.checkpoint),
            "weights": loaded.source,
            "data": args.data,
            "split": args.split,
            "flip": args.flip,
            **report,
        }
        out = Path(args.out) if args.out else _default_out(args)
        atomic_write(
            out / "report.json", lambda f: f.write(json.dumps(report, indent=2).encode() + b"\n")
        )
        plot_confusion_matrix(
            np.asarray(report["confusion_matrix"]),
            loaded.class_names,
            out / "confusion.png",
            title=f"{args.data} {args.split}: top-1 {report['top1']:.2%}",
        )
        if args.json:
            json.dump(report, sys.stdout, indent=2)
            print()
        else:
            _print_summary(report, loaded.class_names, out)
        return 0
    finally:
        ctx.shutdown()


def _default_out(args: argparse.Namespace) -> Path:
    checkpoint = Path(args.checkpoint)
    base = checkpoint if checkpoint.is_dir() else checkpoint.parent
    tag = Path(args.data).name if args.data not in ("fashion-mnist", "digits") else args.data
    return base / f"eval-{tag}-{args.split}"


def _print_summary(report: dict, names: list[str], out: Path) -> None:
    width = max(len(n) for n in names)
    print(f"{'class':<{width}}  accuracy  images")
    for name in names:
        entry = report["per_class"][name]
        acc = "-" if entry["accuracy"] is None else f"{entry['accuracy']:.4f}"
        print(f"{name:<{width}}  {acc:>8}  {entry['count']:>6}")
    top_k = next(k for k in report if k.startswith("top") and k != "top1")
    print(
        f"{report['data']} {report['split']}: {report['num_images']} images, "
        f"top-1 accuracy {report['top1']:.4f}, top-{top_k[3:]} accuracy {report[top_k]:.4f}, "
        f"loss {report['loss']:.4f} ({report['weights']})"
    )
    print(f"report: {out / 'report.json'}  confusion matrix: {out / 'confusion.png'}")
