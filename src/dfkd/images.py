"""Pictures a run leaves behind: grids of synthetic samples and the accuracy curve (PNG)."""

from __future__ import annotations

import math
import struct
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor

from dfkd.errors import writing_to


def make_grid(images: Tensor, nrow: int | None = None, pad: int = 2) -> Tensor:
    """Tile a batch [B, C, H, W] of images in [0, 1] into one [C, H', W'] image (white 2px separators)."""
    images = images.detach().float().clamp(0, 1).cpu()
    b, c, h, w = images.shape
    nrow = nrow or max(1, math.ceil(math.sqrt(b)))
    ncol = math.ceil(b / nrow)
    grid = torch.ones(c, ncol * (h + pad) + pad, nrow * (w + pad) + pad)
    for i in range(b):
        r, q = divmod(i, nrow)
        top, left = pad + r * (h + pad), pad + q * (w + pad)
        grid[:, top : top + h, left : left + w] = images[i]
    return grid


def write_png(path: str | Path, image: Tensor) -> None:
    """Write a [C, H, W] image in [0, 1] (C = 1 or 3) as an 8-bit PNG, with no imaging library."""
    array = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()
    c, h, w = array.shape
    if c not in (1, 3):
        raise ValueError(f"PNG needs 1 or 3 channels, got {c}")
    rows = array.permute(1, 2, 0).reshape(h, w * c).numpy()
    raw = b"".join(b"\x00" + rows[y].tobytes() for y in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", w, h, 8, 0 if c == 1 else 2, 0, 0, 0)
    data = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b"")
    with writing_to(path):
        Path(path).write_bytes(data)


def save_grid(path: str | Path, images: Tensor, nrow: int | None = None) -> None:
    write_png(path, make_grid(images, nrow))


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (runs have no display), imported when a figure is drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


@contextmanager
def figure(path: str | Path, figsize: tuple[float, float]) -> Iterator:
    """One axes to draw on, laid out and saved to ``path`` (PNG) when the block ends; the figure is always closed."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=figsize, dpi=100)
    try:
        yield ax
        fig.tight_layout()
        with writing_to(path):
            fig.savefig(path)
    finally:
        plt.close(fig)


@contextmanager
def _epoch_axes(path: str | Path, title: str, ylabel: str, legend: bool) -> Iterator:
    """A figure with an epoch axis, saved to ``path`` (PNG) when the block ends."""
    with figure(path, (6.4, 4.0)) as ax:
        yield ax
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        if legend and ax.get_legend_handles_labels()[0]:  # e.g. seeds that all failed before their first epoch
            ax.legend(loc="lower right", fontsize=8)


def plot_curves(
    path: str | Path,
    curves: dict[str, Sequence[float | None]],
    title: str = "",
    references: dict[str, float] | None = None,
    ylabel: str = "test top-1 (%)",
) -> None:
    """Line plot of per-epoch curves, with horizontal reference lines (e.g. the teacher's accuracy)."""
    with _epoch_axes(path, title, ylabel, legend=bool(curves)) as ax:
        for label, values in curves.items():
            points = [(i + 1, v) for i, v in enumerate(values) if v is not None]
            if points:
                ax.plot(*zip(*points), marker="o" if len(points) < 30 else None, markersize=3, label=label)
        for label, value in (references or {}).items():
            ax.axhline(value, linestyle="--", linewidth=1, color="gray")
            ax.annotate(f"{label} {value:.2f}", xy=(1, value), fontsize=8, color="gray", va="bottom")


def plot_seed_curves(path: str | Path, curves: dict[str, Sequence[float]], title: str = "") -> None:
    """Every seed's accuracy curve as a thin line and their mean as a thick one (epochs where all seeds have one)."""
    with _epoch_axes(path, title, "top-1 (%)", legend=bool(curves)) as ax:
        for label, values in curves.items():
            if values:
                marker = "o" if len(values) < 30 else None
                ax.plot(range(1, len(values) + 1), values, linewidth=0.8, alpha=0.6, marker=marker, ms=3, label=label)
        common = min((len(v) for v in curves.values()), default=0)
        if common and len(curves) > 1:
            mean = [sum(v[i] for v in curves.values()) / len(curves) for i in range(common)]
            ax.plot(range(1, common + 1), mean, color="black", linewidth=2.2, label="mean")
