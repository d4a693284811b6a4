"""The held-out synthetic evaluation set of a ``data.name=none`` run.

Without a test set, the student is judged by how often it agrees with the teacher, on images neither the method nor
the student ever trains on. They are drawn once at the start of the run, the same way for every method: noise from
their own generator (``data.heldout_seed``, never the run's random stream) optimised for ``data.heldout_steps``
Adam steps against the frozen teacher toward balanced target classes (cross-entropy), the teacher's BatchNorm
statistics (when it has BatchNorm2d layers) and a small total-variation prior, then quantised to uint8. The set is a
pure function of the seed, the settings and the teacher, so a resumed run rebuilds the same one.
"""

from __future__ import annotations

import hashlib
import logging

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dfkd.data import DatasetInfo, to_uint8
from dfkd.losses import BNStatsHooks, tv_l1

log = logging.getLogger("dfkd")

HELDOUT_SPLIT = "synthetic-heldout"
LEARNING_RATE = 0.1
BN_WEIGHT = 1.0
TV_WEIGHT = 1e-3
CHUNK = 256  # images optimised together (bounds the memory of a large set)


def synthesize_heldout(
    teacher: nn.Module, info: DatasetInfo, size: int, seed: int, steps: int, device: torch.device | str
) -> Tensor:
    """``size`` synthetic images for evaluation, uint8 ``[size, C, H, W]`` on ``device``.

    Args:
        teacher: the frozen teacher, taking [0, 1] images (:class:`~dfkd.models.Normalized`).
        info: the run's image shape and class count.
        size: number of images; image ``i`` is optimised toward class ``i mod num_classes``.
        seed: seed of the set's own generator.
        steps: optimisation steps (0 = uniform noise).
        device: where the images live.
    """
    generator = torch.Generator().manual_seed(seed)
    # drawn on the CPU, so the starting noise is the same on every device
    noise = torch.rand(size, *info.image_shape, generator=generator)
    targets = torch.arange(size) % info.num_classes
    try:
        bn_hooks: BNStatsHooks | None = BNStatsHooks(teacher)
    except ValueError:
        bn_hooks = None  # a teacher without BatchNorm2d: class and smoothness terms only
    was_training = teacher.training
    teacher.eval()
    chunks = []
    try:
        for start in range(0, size, CHUNK):
            x = noise[start : start + CHUNK].to(device)
            y = targets[start : start + CHUNK].to(device)
            chunks.append(to_uint8(_optimised(teacher, x, y, steps, bn_hooks)))
    finally:
        if bn_hooks is not None:
            bn_hooks.remove()
        teacher.train(was_training)
    return torch.cat(chunks)


def _optimised(teacher: nn.Module, x: Tensor, targets: Tensor, steps: int, bn_hooks: BNStatsHooks | None) -> Tensor:
    x = x.clone().requires_grad_(steps > 0)
    optimizer = torch.optim.Adam([x], lr=LEARNING_RATE)
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        if bn_hooks is not None:
            with bn_hooks.capture():
                logits = teacher(x)
            loss = F.cross_entropy(logits.float(), targets) + BN_WEIGHT * bn_hooks.loss()
        else:
            loss = F.cross_entropy(teacher(x).float(), targets)
        (loss + TV_WEIGHT * tv_l1(x)).backward()
        optimizer.step()
        with torch.no_grad():
            x.clamp_(0.0, 1.0)
    return x.detach()


def digest(images: Tensor) -> str:
    """A short fingerprint of the set (to notice on resume that a device rebuilt it differently)."""
    return hashlib.sha256(images.cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


__all__ = ["HELDOUT_SPLIT", "digest", "synthesize_heldout"]
