"""Running means of logged scalars, kept on the device so the hot loop never waits for the host."""

from __future__ import annotations

import math
import time
from collections import defaultdict

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


class Stopwatch:
    """Wall time booked to categories without host syncs in the hot loop: CUDA events on a GPU, the CPU clock else.

    ``lap(category)`` books the time since the previous lap (or :meth:`start`) to ``category``; :meth:`totals` waits
    for the device once and returns the seconds booked so far.
    """

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device
        self._totals: dict[str, float] = defaultdict(float)
        self._pending: list[tuple[str, object, object]] = []
        self._last: object = None

    def _mark(self) -> object:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record(torch.cuda.current_stream(self.device))
            return event
        return time.perf_counter()

    def start(self) -> None:
        self._last = self._mark()

    def lap(self, category: str) -> None:
        now = self._mark()
        if self.cuda:
            self._pending.append((category, self._last, now))
        else:
            self._totals[category] += now - self._last  # type: ignore[operator]
        self._last = now

    def totals(self) -> dict[str, float]:
        if self._pending:
            self._pending[-1][2].synchronize()  # type: ignore[union-attr]
            for category, begin, end in self._pending:
                self._totals[category] += begin.elapsed_time(end) / 1000.0  # type: ignore[union-attr]
            self._pending = []
        return dict(self._totals)
