"""Append-only JSON-lines metrics log (one record per line, flushed immediately)."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

from apps.engine.checkpoint import atomic_write

__all__ = ["MetricsLog"]


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):  # tensors / numpy scalars
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN/inf
    return value


class MetricsLog:
    """``metrics.jsonl`` next to the checkpoints. Records are dicts of JSON-able scalars.

    A resumed run appends to the same file; :meth:`read` returns the latest record per
    ``epoch`` so a re-run epoch (after a crash between log and checkpoint) is not counted twice,
    and :meth:`roll_back` cuts the log back to the epoch a run resumes from.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    def append(self, record: dict[str, Any]) -> dict[str, Any]:
        record = {k: _plain(v) for k, v in record.items()}
        record.setdefault("time", time.time())
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
            f.flush()
        return record

    def read(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        by_epoch: dict[Any, dict[str, Any]] = {}
        others: list[dict[str, Any]] = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line torn by a crash mid-write
            if "epoch" in record:
                by_epoch[record["epoch"]] = record
            else:
                others.append(record)
        return [by_epoch[k] for k in sorted(by_epoch)] + others

    def roll_back(self, last_epoch: int, record: dict[str, Any] | None = None) -> None:
        """Atomically rewrite the log as a run that stopped after ``last_epoch`` left it.

        Records of later epochs (written before a kill cut their checkpoint short) go, as do
        duplicates and torn lines, since the resumed run writes those epochs again. ``record``
        (the checkpoint's copy of epoch ``last_epoch``'s record) fills in that epoch if the
        log lacks it.
        """
        kept = [r for r in self.read() if "epoch" not in r or r["epoch"] <= last_epoch]
        if record is not None and not any(r.get("epoch") == last_epoch for r in kept):
            kept.append({k: _plain(v) for k, v in record.items()})
        kept.sort(key=lambda r: (r.get("epoch") is None, r.get("epoch") or 0))
        if not kept and not self.path.exists():
            return
        text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept)
        atomic_write(self.path, lambda f: f.write(text.encode("utf-8")))
