"""Batch mixing: each image blended with another image of the same batch (mixup, CutMix), in pure torch.

Used on student batches (``method.mix``): the teacher then labels the mixed image, which is the "function matching"
of Beyer et al., "Knowledge distillation: A good teacher is patient and consistent", CVPR 2022 (arXiv 2106.05237).
mixup: Zhang et al., "mixup: Beyond Empirical Risk Minimization", ICLR 2018 (arXiv 1710.09412). CutMix: Yun et al.,
"CutMix: Regularization Strategy to Train Strong Classifiers with Localizable Features", ICCV 2019 (arXiv 1905.04899).

One lambda and one partner permutation per batch, as in both papers' code. The pure functions (:func:`mixup`,
:func:`box_mask`, :func:`cutmix`) take their random draws as arguments; :func:`mix_batch` draws them from torch's
global RNG on the images' device (no host synchronisation).
"""

from __future__ import annotations

import torch
from torch import Tensor

MIXES = ("none", "mixup", "cutmix")


def mixup(x: Tensor, lam: Tensor | float, perm: Tensor) -> Tensor:
    """``lam * x + (1 - lam) * x[perm]``: a convex combination, so images in [0, 1] stay in [0, 1]."""
    return lam * x + (1 - lam) * x[perm]


def box_mask(h: int, w: int, lam: Tensor, cy: Tensor, cx: Tensor) -> Tensor:
    """CutMix's box as a boolean ``[h, w]`` mask: sides ``floor(h * sqrt(1 - lam))`` x ``floor(w * sqrt(1 - lam))``
    centred at (``cy``, ``cx``), clipped to the image (so near an edge the box is smaller). Tensors, no host sync."""
    cut = torch.sqrt(1 - lam)
    cut_h, cut_w = torch.floor(h * cut).long(), torch.floor(w * cut).long()
    y1, y2 = (cy - cut_h // 2).clamp(0, h), (cy + cut_h // 2).clamp(0, h)
    x1, x2 = (cx - cut_w // 2).clamp(0, w), (cx + cut_w // 2).clamp(0, w)
    rows = torch.arange(h, device=cy.device)
    cols = torch.arange(w, device=cx.device)
    return ((rows >= y1) & (rows < y2))[:, None] & ((cols >= x1) & (cols < x2))[None, :]


def cutmix(x: Tensor, mask: Tensor, perm: Tensor) -> Tensor:
    """``x`` with the pixels under ``mask`` (``[H, W]``, every channel) taken from ``x[perm]``."""
    return torch.where(mask, x[perm], x)


def mix_batch(x: Tensor, kind: str, alpha: float) -> Tensor:
    """Mix the batch ``x`` (``[N, C, H, W]``) with a shuffled copy of itself: ``kind`` is none, mixup or cutmix, and
    lambda ~ Beta(``alpha``, ``alpha``). Draws (in this order: lambda, the permutation, the box centre) come from
    torch's global RNG on ``x``'s device."""
    if kind == "none":
        return x
    if kind not in MIXES:
        raise ValueError(f"unknown mix {kind!r}; choose from {', '.join(MIXES)}")
    concentration = torch.tensor(float(alpha), device=x.device)
    lam = torch.distributions.Beta(concentration, concentration).sample()
    perm = torch.randperm(x.shape[0], device=x.device)
    if kind == "mixup":
        return mixup(x, lam.to(x.dtype), perm)
    h, w = x.shape[-2:]
    cy = torch.randint(0, h, (), device=x.device)
    cx = torch.randint(0, w, (), device=x.device)
    return cutmix(x, box_mask(h, w, lam, cy, cx), perm)
