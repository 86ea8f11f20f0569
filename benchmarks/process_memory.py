"""Resident memory of the current process, for benchmarks that run each measurement in its own
subprocess (Linux: read from /proc)."""

from __future__ import annotations

import os

__all__ = ["peak_rss_mib", "rss_mib"]


def rss_mib() -> float:
    """Resident size now, MiB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mib() -> float:
    """This process's own resident high-water mark (VmHWM), MiB.

    ``ru_maxrss`` is carried across fork + exec and could report the parent's peak instead.
    """
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    raise RuntimeError("VmHWM missing from /proc/self/status")
