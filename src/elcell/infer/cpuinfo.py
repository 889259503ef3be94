"""What this CPU can do for int8 inference. Torch-free.

ONNX Runtime's u8s8 kernels without VNNI (AVX2 and AVX-512 before VNNI)
multiply pairs of uint8 x int8 into int16 with saturation (vpmaddubsw): with
full 8-bit weights two large products overflow, and a model quantised that
way loses accuracy on those CPUs only. Weights kept to 7 bits (reduce_range)
cannot saturate, so elcell quantises so everywhere.
"""

from __future__ import annotations

import functools
from pathlib import Path

VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


@functools.cache
def cpu_flags() -> frozenset[str] | None:
    """The CPU's feature flags (Linux), or None where they cannot be read."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return None


@functools.cache
def cpu_model() -> str | None:
    """The CPU's model name (Linux), for quoting with a figure; None where it cannot be read."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    return next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), None)


def has_vnni() -> bool | None:
    """Whether int8 dot products run without saturating (None: unknown)."""
    flags = cpu_flags()
    return None if flags is None else any(flag in flags for flag in VNNI_FLAGS)
