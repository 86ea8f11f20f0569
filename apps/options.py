"""Command-line checks shared by the apps.

Imports nothing heavy, so ``--help`` and argument errors stay quick (no torch import).
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["out_problem"]


def out_problem(out: str | None) -> str | None:
    """Why ``--out`` cannot be a directory (a file is there or above it), or None."""
    if out is None:
        return None
    path = Path(out)
    for candidate in (path, *path.parents):
        if candidate.exists():
            if candidate.is_dir():
                return None
            what = "is" if candidate == path else f"is below {candidate}, which is"
            return f"--out {out} {what} a file, not a directory"
    return None
