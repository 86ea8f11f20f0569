"""The precision-recall figure of an evaluation (matplotlib, Agg, written atomically)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from apps.detect.metrics import DetectionScores
from apps.engine.checkpoint import atomic_write

__all__ = ["plot_precision_recall"]


def plot_precision_recall(scores: DetectionScores, path: str | Path) -> Path:
    """Two panels (boxes, masks): precision against recall, averaged over classes, at IoU 0.50,
    at 0.75 and averaged over 0.50:0.95 (its area under the curve is the AP)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    recall = np.linspace(0.0, 1.0, 101)
    fig, axes = plt.subplots(1, 2, figsize=(9.0, 3.8), squeeze=False)
    for ax, kind in zip(axes[0], ("box", "mask"), strict=True):
        iou_scores = getattr(scores, kind)
        for iou, label in ((0.5, "IoU 0.50"), (0.75, "IoU 0.75"), (None, "IoU 0.50:0.95")):
            ax.plot(recall, iou_scores.pr_curve(iou), label=label)
        ax.set_title(f"{kind}: AP {100 * iou_scores.stats['ap']:.1f}")
        ax.set_xlabel("recall")
        ax.set_ylabel("precision")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower left")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return atomic_write(path, lambda f: f.write(buffer.getvalue()))
