"""Progress bars and console messages on stderr, from the main process only.

Bars are tqdm, written to stderr, and shown only when stderr is a terminal (or when forced);
in logs and CI a one-line summary per epoch is printed instead, via :func:`console`.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import TypeVar

from tqdm import tqdm

__all__ = ["console", "progress_bar", "progress_enabled"]

T = TypeVar("T")


def progress_enabled(requested: bool | None, is_main: bool = True) -> bool:
    """``requested`` None means auto: on when stderr is a terminal. Never on other ranks."""
    if not is_main:
        return False
    if requested is None:
        return sys.stderr.isatty()
    return requested


def progress_bar(
    iterable: Iterable[T], *, total: int | None = None, desc: str = "", enabled: bool = True
) -> tqdm:
    """A tqdm bar on stderr (a silent pass-through iterator when ``enabled`` is False)."""
    return tqdm(
        iterable,
        total=total,
        desc=desc,
        disable=not enabled,
        file=sys.stderr,
        dynamic_ncols=True,
        leave=False,
        unit="batch",
    )


def console(message: str, *, is_main: bool = True) -> None:
    """Print a status line to stderr without breaking an active progress bar."""
    if is_main:
        tqdm.write(message, file=sys.stderr)
