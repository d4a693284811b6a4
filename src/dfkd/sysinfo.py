"""What machine a number was measured on: the CPU model and the instruction sets that decide its speed."""

from __future__ import annotations

import platform
from functools import lru_cache
from pathlib import Path

RELEVANT_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


@lru_cache(maxsize=1)
def _cpuinfo() -> dict[str, str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            break  # the first processor describes them all
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    return fields


def cpu_flags() -> list[str]:
    """Those of :data:`RELEVANT_FLAGS` this CPU has (empty where /proc/cpuinfo is not readable)."""
    have = set(_cpuinfo().get("flags", "").split())
    return [flag for flag in RELEVANT_FLAGS if flag in have]


def cpu_model() -> str:
    """E.g. ``AMD EPYC (avx2, avx512f, avx512_bf16)``: the model name and its relevant instruction sets."""
    name = _cpuinfo().get("model name") or platform.processor() or platform.machine() or "unknown CPU"
    flags = cpu_flags()
    return f"{name} ({', '.join(flags)})" if flags else name
