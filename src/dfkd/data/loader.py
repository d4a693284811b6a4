"""Mini-batches straight from in-memory tensors: no DataLoader, no worker processes, no PIL.

The engine moves the uint8 images to the training device once; each batch is then an ``index_select`` plus a
conversion to float, which is far cheaper than a ``DataLoader`` for datasets of this size.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import Tensor


def to_float(u8: Tensor) -> Tensor:
    """uint8 images in 0..255 -> float32 in [0, 1], on the same device."""
    if u8.dtype != torch.uint8:
        raise ValueError(f"to_float expects uint8 images, got {u8.dtype}")
    return u8.float().div_(255)


def to_uint8(x01: Tensor) -> Tensor:
    """Float images in [0, 1] -> uint8, clamped and rounded half up (the levels ``torchvision``'s ``save_image`` keeps).

    CMI's PNG pool truncates instead (``(x * 255).astype('uint8')``), which darkens every image by half a level on
    average; rounding keeps the quantisation error centred.

    Args:
        x01: float images, any shape; gradients are not tracked through this.

    Returns:
        uint8 tensor of the same shape and device.
    """
    return x01.detach().clamp(0, 1).mul(255).add_(0.5).floor_().to(torch.uint8)


class TensorLoader:
    """Iterate ``(x, y)`` batches over uint8 images held in memory.

    ``x`` is float32 in [0, 1] on the images' device, passed through ``augment`` when given; ``y`` is the matching
    labels on the labels' device. With ``shuffle``, each pass draws a new permutation on the CPU from ``generator``,
    so a CPU and a GPU run with the same seed see the same order.

    With ``world_size > 1`` each rank takes every ``world_size``-th index of the (shared) order, starting at
    ``rank``; give every rank a generator seeded the same way so the orders agree. Without ``drop_last`` the ranks
    together visit every sample exactly once (the right thing for evaluation), and a rank may get one batch more than
    another. With ``drop_last`` the order is first cut to a multiple of ``world_size``, so every rank runs the same
    number of full batches (the right thing for DDP training, where a rank with an extra step would hang).

    Args:
        images_u8: uint8 images ``[N, C, H, W]``.
        labels: ``[N]`` labels.
        batch_size: samples per batch on this rank.
        shuffle: draw a new order on every pass.
        drop_last: skip the last incomplete batch.
        augment: applied to each float batch, e.g. an :class:`~dfkd.data.augment.Augment`.
        rank: this process's rank.
        world_size: number of processes sharing the data.
        generator: a CPU generator for the permutations; None uses torch's global RNG.
    """

    def __init__(
        self,
        images_u8: Tensor,
        labels: Tensor,
        batch_size: int,
        shuffle: bool,
        drop_last: bool = False,
        augment: Callable[[Tensor], Tensor] | None = None,
        rank: int = 0,
        world_size: int = 1,
        generator: torch.Generator | None = None,
    ):
        if images_u8.dtype != torch.uint8 or images_u8.dim() != 4:
            raise ValueError(f"images must be uint8 [N, C, H, W], got {images_u8.dtype} {tuple(images_u8.shape)}")
        if labels.shape != (images_u8.shape[0],):
            raise ValueError(f"labels must have shape ({images_u8.shape[0]},), got {tuple(labels.shape)}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank {rank}, world_size {world_size}")
        if generator is not None and generator.device.type != "cpu":
            raise ValueError("the shuffling generator must be a CPU generator")
        self.images, self.labels = images_u8, labels
        self.batch_size, self.shuffle, self.drop_last = batch_size, shuffle, drop_last
        self.augment, self.rank, self.world_size, self.generator = augment, rank, world_size, generator

    def _rank_count(self) -> int:
        n = self.images.shape[0]
        if self.drop_last:
            return n // self.world_size
        return max(0, (n - self.rank + self.world_size - 1) // self.world_size)

    def __len__(self) -> int:
        count = self._rank_count()
        return count // self.batch_size if self.drop_last else -(-count // self.batch_size)

    @property
    def num_samples(self) -> int:
        """Samples this rank yields per pass."""
        return len(self) * self.batch_size if self.drop_last else self._rank_count()

    def _indices(self) -> Tensor:
        n = self.images.shape[0]
        order = torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)
        if self.drop_last:
            order = order[: n - n % self.world_size]
        return order[self.rank :: self.world_size][: self.num_samples]

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        order = self._indices()
        image_idx = order.to(self.images.device, non_blocking=True)
        label_idx = order.to(self.labels.device, non_blocking=True)
        for start in range(0, len(order), self.batch_size):
            x = to_float(self.images.index_select(0, image_idx[start : start + self.batch_size]))
            if self.augment is not None:
                x = self.augment(x)
            yield x, self.labels.index_select(0, label_idx[start : start + self.batch_size])
