"""Running means of logged scalars, kept on the device so the hot loop never waits for the host."""

from __future__ import annotations

import math

import torch
from torch import Tensor


class Meters:
    def __init__(self) -> None:
        self._sums: dict[str, Tensor | float] = {}
        self._counts: dict[str, int] = {}

    def update(self, values: dict[str, Tensor | float], prefix: str = "") -> None:
        for key, value in values.items():
            name = prefix + key
            if torch.is_tensor(value):
                value = value.detach().float().mean()
            self._sums[name] = self._sums.get(name, 0.0) + value
            self._counts[name] = self._counts.get(name, 0) + 1

    def means(self) -> dict[str, float]:
        """One host sync for all meters."""
        if not self._sums:
            return {}
        keys = list(self._sums)
        sums = [self._sums[k] for k in keys]
        tensors = [s for s in sums if torch.is_tensor(s)]
        host = torch.stack(tensors).tolist() if tensors else []
        it = iter(host)
        return {k: (next(it) if torch.is_tensor(s) else float(s)) / self._counts[k] for k, s in zip(keys, sums)}


def first_non_finite(values: dict[str, float]) -> str | None:
    for key, value in values.items():
        if not math.isfinite(value):
            return key
    return None


def format_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")
