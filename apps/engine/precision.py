"""Whether bf16 autocast (``--amp``) pays off on the training device.

On a CPU, bf16 autocast is faster than float32 only where the processor multiplies bf16 in
hardware (x86 AVX-512 BF16 or AMX, Arm's BF16 extension); elsewhere oneDNN emulates it and
the step gets slower, so ``--amp`` falls back to float32 there and says so. On a 2-core AMD EPYC
with AVX-512 BF16, PPMA-T at batch 16, 224², trained 1.42× faster under bf16 autocast and ran
inference 1.15× faster (docs/apps.md, "Mixed precision").
"""

from __future__ import annotations

from pathlib import Path

import torch

# /proc/cpuinfo flags of hardware bf16 arithmetic: x86 (AVX-512 BF16, AMX) and Arm (FEAT_BF16).
BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})


def cpu_bf16_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    """The hardware-bf16 flags this CPU reports (empty where /proc/cpuinfo is missing)."""
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        return set()
    found: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            found |= BF16_CPU_FLAGS.intersection(value.split())
    return found


def resolve_amp(
    requested: bool, device: torch.device, flags: set[str] | None = None
) -> tuple[bool, str]:
    """(use bf16 autocast, a line saying what was chosen and why) for ``--amp`` on ``device``."""
    if not requested:
        return False, "amp: off (float32)"
    if device.type != "cpu":
        return True, f"amp: bf16 autocast on {device.type}"
    flags = cpu_bf16_flags() if flags is None else flags
    if flags:
        return (
            True,
            f"amp: bf16 autocast (hardware bf16 on this CPU: {', '.join(sorted(flags))})",
        )
    return False, (
        "amp: --amp asked for bf16 autocast, but this CPU has no hardware bf16 arithmetic "
        "(AVX-512 BF16, AMX or Arm BF16), where it is slower than float32: training in float32"
    )
