"""Batched, per-sample image augmentation in pure torch, run on the images' own device.

This replaces the torchvision transforms (one PIL image at a time) and the kornia ops that the CMI-derived code
applies to synthetic images. Every op takes a batch ``x`` of shape ``[N, C, H, W]``, draws independent parameters
for each sample from ``generator`` (or the global RNG of ``x``'s device), never loops over images in Python, and is
differentiable with respect to ``x``, so it can sit inside a generator's or an inversion's loss.

A ``generator`` must live on the same device as ``x``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from dfkd.errors import ConfigError, closest

AUGMENTATIONS = ("none", "crop", "flip", "crop_flip", "resized_crop", "resized_crop_flip")


def _check_batch(x: Tensor, op: str) -> None:
    if x.dim() != 4:
        raise ValueError(f"{op} expects images [N, C, H, W], got shape {tuple(x.shape)}")


def random_crop(x: Tensor, padding: int, fill: float = 0.0, generator: torch.Generator | None = None) -> Tensor:
    """Pad by ``padding`` on every side, then crop back to ``H x W`` at a random offset per sample.

    The batched equivalent of ``torchvision.transforms.RandomCrop(H, padding=padding)`` (constant fill).

    Args:
        x: images ``[N, C, H, W]``, any dtype.
        padding: pixels added on each side; 0 returns ``x`` unchanged.
        fill: value of the padded pixels.
        generator: source of the offsets, on ``x``'s device.

    Returns:
        A tensor of the same shape, dtype and device.
    """
    _check_batch(x, "random_crop")
    if padding < 0:
        raise ValueError(f"random_crop padding must be >= 0, got {padding}")
    if padding == 0:
        return x
    n, c, h, w = x.shape
    padded = F.pad(x, (padding, padding, padding, padding), value=fill)
    top = torch.randint(0, 2 * padding + 1, (n,), device=x.device, generator=generator)
    left = torch.randint(0, 2 * padding + 1, (n,), device=x.device, generator=generator)
    rows = top[:, None] + torch.arange(h, device=x.device)
    cols = left[:, None] + torch.arange(w, device=x.device)
    # Two gathers select each sample's window: rows first, then columns.
    out = padded.gather(2, rows[:, None, :, None].expand(n, c, h, w + 2 * padding))
    return out.gather(3, cols[:, None, None, :].expand(n, c, h, w))


def random_hflip(x: Tensor, p: float = 0.5, generator: torch.Generator | None = None) -> Tensor:
    """Flip each sample left-right with probability ``p``.

    Args:
        x: images ``[N, C, H, W]``.
        p: flip probability.
        generator: source of the coin flips, on ``x``'s device.

    Returns:
        A tensor of the same shape, dtype and device.
    """
    _check_batch(x, "random_hflip")
    flip = torch.rand(x.shape[0], device=x.device, generator=generator) < p
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def random_resized_crop(
    x: Tensor,
    size: int | tuple[int, int],
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    generator: torch.Generator | None = None,
) -> Tensor:
    """Crop a random box per sample and resize it to ``size`` with bilinear sampling.

    Boxes follow ``torchvision.transforms.RandomResizedCrop``: up to 10 tries of an area fraction uniform in ``scale``
    and a log-uniform aspect ratio in ``ratio``, with integer width and height that must fit the image; samples with
    no fitting try fall back to the central crop with the ratio clamped into range. Resampling uses ``affine_grid`` +
    ``grid_sample`` (``align_corners=False``, border padding, no antialiasing, like kornia).

    Args:
        x: float images ``[N, C, H, W]``.
        size: output ``H' = W' = size``, or ``(H', W')``.
        scale: range of the box area as a fraction of the image area.
        ratio: range of the box aspect ratio (width / height).
        generator: source of the boxes, on ``x``'s device.

    Returns:
        Float images ``[N, C, H', W']`` on ``x``'s device.
    """
    _check_batch(x, "random_resized_crop")
    if not x.is_floating_point():
        raise ValueError(f"random_resized_crop needs floating-point images, got {x.dtype}")
    out_h, out_w = (size, size) if isinstance(size, int) else size
    n, c, h, w = x.shape
    tries = 10
    draws = torch.rand(n, tries, 2, device=x.device, generator=generator, dtype=torch.float32)
    area = h * w * (scale[0] + (scale[1] - scale[0]) * draws[..., 0])
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * draws[..., 1])
    box_w = torch.sqrt(area * aspect).round()
    box_h = torch.sqrt(area / aspect).round()
    fits = (box_w > 0) & (box_w <= w) & (box_h > 0) & (box_h <= h)
    first = fits.int().argmax(dim=1, keepdim=True)  # index of the first fitting try
    found = fits.any(dim=1)

    in_ratio = w / h
    if in_ratio < min(ratio):
        fallback_w, fallback_h = w, round(w / min(ratio))
    elif in_ratio > max(ratio):
        fallback_w, fallback_h = round(h * max(ratio)), h
    else:
        fallback_w, fallback_h = w, h
    box_w = torch.where(found, box_w.gather(1, first)[:, 0], float(fallback_w))
    box_h = torch.where(found, box_h.gather(1, first)[:, 0], float(fallback_h))

    offsets = torch.rand(n, 2, device=x.device, generator=generator, dtype=torch.float32)
    top = torch.where(found, (offsets[:, 0] * (h - box_h + 1)).floor().clamp(max=h - box_h), ((h - box_h) / 2).floor())
    left = torch.where(found, (offsets[:, 1] * (w - box_w + 1)).floor().clamp(max=w - box_w), ((w - box_w) / 2).floor())

    # Map the output's normalised coordinates [-1, 1] onto the box, in the input's normalised coordinates.
    theta = torch.zeros(n, 2, 3, device=x.device, dtype=torch.float32)
    theta[:, 0, 0] = box_w / w
    theta[:, 0, 2] = (2 * left + box_w) / w - 1
    theta[:, 1, 1] = box_h / h
    theta[:, 1, 2] = (2 * top + box_h) / h - 1
    grid = F.affine_grid(theta.to(x.dtype), [n, c, out_h, out_w], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def crop_flip(x: Tensor, padding: int = 4, generator: torch.Generator | None = None) -> Tensor:
    """The CIFAR training transform: :func:`random_crop` with ``padding``, then :func:`random_hflip`.

    Args:
        x: images ``[N, C, H, W]``.
        padding: pixels of zero padding on each side before cropping.
        generator: source of all random parameters, on ``x``'s device.

    Returns:
        A tensor of the same shape, dtype and device.
    """
    return random_hflip(random_crop(x, padding, generator=generator), generator=generator)


class Augment:
    """A named augmentation pipeline, callable as ``aug(x, generator=None) -> x``.

    Names: ``none``, ``crop``, ``flip``, ``crop_flip`` (the CIFAR train transform), ``resized_crop`` and
    ``resized_crop_flip`` (CMI's local view, usually with ``scale=(0.25, 1.0)``).

    Args:
        name: one of :data:`AUGMENTATIONS`.
        padding: crop padding for ``crop`` and ``crop_flip``.
        size: output size of the resized crops; None keeps the input's ``H x W``.
        scale: area range of the resized crops.
        ratio: aspect-ratio range of the resized crops.
        p: flip probability.

    Raises:
        ConfigError: an unknown name or an out-of-range parameter.
    """

    def __init__(
        self,
        name: str = "none",
        padding: int = 4,
        size: int | tuple[int, int] | None = None,
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        p: float = 0.5,
    ):
        if name not in AUGMENTATIONS:
            raise ConfigError(
                f"unknown augmentation '{name}'{closest(name, AUGMENTATIONS)}; choose from {', '.join(AUGMENTATIONS)}"
            )
        if not isinstance(padding, int) or padding < 0:
            raise ConfigError(f"augmentation padding must be an integer >= 0, got {padding!r}")
        scale, ratio = tuple(scale), tuple(ratio)
        if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
            raise ConfigError(f"augmentation scale must be (lo, hi) with 0 < lo <= hi <= 1, got {scale}")
        if len(ratio) != 2 or not 0 < ratio[0] <= ratio[1]:
            raise ConfigError(f"augmentation ratio must be (lo, hi) with 0 < lo <= hi, got {ratio}")
        if not 0 <= p <= 1:
            raise ConfigError(f"augmentation flip probability must be in [0, 1], got {p}")
        self.name, self.padding, self.size, self.scale, self.ratio, self.p = name, padding, size, scale, ratio, p

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        if self.name in ("crop", "crop_flip"):
            x = random_crop(x, self.padding, generator=generator)
        if self.name.startswith("resized_crop"):
            size = self.size if self.size is not None else (x.shape[-2], x.shape[-1])
            x = random_resized_crop(x, size, self.scale, self.ratio, generator=generator)
        if self.name.endswith("flip"):
            x = random_hflip(x, self.p, generator=generator)
        return x

    def __repr__(self) -> str:
        if self.name in ("crop", "crop_flip"):
            return f"Augment({self.name!r}, padding={self.padding})"
        if self.name.startswith("resized_crop"):
            return f"Augment({self.name!r}, size={self.size}, scale={self.scale}, ratio={self.ratio})"
        return f"Augment({self.name!r})"


def build_augment(spec: str, **kwargs) -> Augment:
    """Build an :class:`Augment` from a config string, e.g. ``build_augment("crop_flip", padding=4)``.

    Args:
        spec: one of :data:`AUGMENTATIONS`.
        **kwargs: ``padding``, ``size``, ``scale``, ``ratio`` or ``p``; the ones a pipeline does not use are ignored.

    Returns:
        The callable pipeline.

    Raises:
        ConfigError: unknown name, unknown keyword or out-of-range value.
    """
    allowed = ("padding", "size", "scale", "ratio", "p")
    for key in kwargs:
        if key not in allowed:
            raise ConfigError(f"unknown augmentation option '{key}'{closest(key, allowed)}; use {', '.join(allowed)}")
    return Augment(spec, **kwargs)
