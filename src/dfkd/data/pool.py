"""The synthetic-image pool of the inversion methods, held in memory on the device, and the ring store under it.

The CMI-benchmark inversion methods (DeepInversion, CMI) keep every batch they synthesise and train the student on
random batches of everything kept so far. The reference writes one PNG per image into ``--save_dir``
(``ImagePool.add``, ``zju-vipa/CMI@9e79fa9:datafree/utils/_utils.py:236-238``) and rebuilds a ``DataLoader`` every
round over every image found under that directory (``get_dataset`` L240-241 and ``_collect_all_images`` L179-188;
``datafree/synthesis/deepinversion.py`` L110-119), and never clears it, so a second run in the same directory also
trains on the first run's images. Here the images stay on the device as uint8, which keeps the quantisation of the
PNG round trip; a new pool starts empty, so nothing from an earlier run can mix in; a student batch is one
``index_select``; and the pool's content is saved and restored with the method's checkpoint.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from dfkd.data.loader import to_float, to_uint8


class RingStore(nn.Module):
    """Rows of a fixed shape, appended in order; once ``capacity`` rows are held, new rows replace the oldest.

    Storage grows geometrically as rows arrive, so a store sized for a whole run costs memory only for what it holds.
    The filled rows (and nothing else) are saved with the owning module's ``state_dict`` as extra state, and loading
    restores rows, order and ring position exactly.

    Args:
        row_shape: shape of one row, e.g. ``(C, H, W)`` for images or ``(D,)`` for features.
        dtype: element type of the rows.
        capacity: most rows kept; None keeps every row (no bound).
        device: where the rows live.
        movable: keep the rows in a registered buffer, so that ``module.to(device)`` moves them; False pins them to
            ``device`` (used for a memory too large for the accelerator).

    Example:
        >>> store = RingStore((2,), torch.float32, capacity=3)
        >>> store.append(torch.arange(8.0).view(4, 2))
        >>> len(store), store.last(1).tolist()
        (3, [[6.0, 7.0]])
    """

    def __init__(
        self,
        row_shape: tuple[int, ...],
        dtype: torch.dtype,
        capacity: int | None = None,
        device: torch.device | str | None = None,
        movable: bool = True,
    ):
        super().__init__()
        if capacity is not None and capacity < 1:
            raise ValueError(f"a store's capacity must be >= 1 or None, got {capacity}")
        self.row_shape, self.capacity = tuple(row_shape), capacity
        self.n_added = 0  # rows ever appended; the ring position is n_added % capacity once full
        storage = torch.empty((0, *self.row_shape), dtype=dtype, device=device)
        if movable:
            self.register_buffer("storage", storage, persistent=False)
        else:
            self.storage = storage

    def __len__(self) -> int:
        return self.n_added if self.capacity is None else min(self.n_added, self.capacity)

    @property
    def full(self) -> bool:
        return self.capacity is not None and self.n_added >= self.capacity

    def _reserve(self, rows: int) -> None:
        allocated = self.storage.shape[0]
        if allocated >= rows:
            return
        grown = max(rows, 2 * allocated)
        if self.capacity is not None:
            grown = min(grown, self.capacity)
        bigger = torch.empty((grown, *self.row_shape), dtype=self.storage.dtype, device=self.storage.device)
        bigger[: len(self)] = self.storage[: len(self)]
        self.storage = bigger

    def append(self, rows: Tensor) -> None:
        """Append ``rows`` (shape ``[N, *row_shape]``, any N); the oldest rows make room once the store is full."""
        if tuple(rows.shape[1:]) != self.row_shape:
            raise ValueError(f"rows of shape {tuple(rows.shape[1:])} do not fit a store of {self.row_shape} rows")
        rows = rows.detach().to(device=self.storage.device, dtype=self.storage.dtype)
        start = self.n_added
        if self.capacity is not None and rows.shape[0] > self.capacity:
            start += rows.shape[0] - self.capacity  # rows that would be overwritten within this very call
            rows = rows[-self.capacity :]
        n = rows.shape[0]
        if n == 0:
            return
        if self.capacity is None:
            self._reserve(start + n)
            self.storage[start : start + n] = rows
        else:
            self._reserve(min(start + n, self.capacity))
            where = (start + torch.arange(n, device=self.storage.device)) % self.capacity
            self.storage.index_copy_(0, where, rows)
        self.n_added = start + n

    def rows(self) -> Tensor:
        """The filled rows (a view, in storage order)."""
        return self.storage[: len(self)]

    def random_index(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``min(n, len)`` distinct row indices drawn uniformly, on the storage's device."""
        filled = len(self)
        if filled == 0:
            raise RuntimeError("cannot sample from an empty store: add rows first")
        return torch.randperm(filled, device=self.storage.device, generator=generator)[: min(n, filled)]

    def last(self, n: int) -> Tensor:
        """The ``min(n, len)`` most recently appended rows, oldest first."""
        n = min(n, len(self))
        first = self.n_added - n
        where = torch.arange(first, first + n, device=self.storage.device)
        if self.capacity is not None:
            where = where % self.capacity
        return self.storage.index_select(0, where)

    # -- saved with the owner's state_dict --------------------------------------------------------------------------
    def get_extra_state(self) -> dict[str, Any]:
        filled = self.rows()
        return {"rows": filled if filled.shape[0] == self.storage.shape[0] else filled.clone(), "n_added": self.n_added}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        rows, n_added = state["rows"], int(state["n_added"])
        if tuple(rows.shape[1:]) != self.row_shape:
            raise ValueError(f"saved rows of shape {tuple(rows.shape[1:])} do not fit a store of {self.row_shape} rows")
        expected = n_added if self.capacity is None else min(n_added, self.capacity)
        if rows.shape[0] != expected:
            raise ValueError(
                f"saved store holds {rows.shape[0]} rows but {n_added} were added (capacity {self.capacity}); "
                "was it saved with a different capacity?"
            )
        self.storage = rows.to(device=self.storage.device, dtype=self.storage.dtype).clone()
        self.n_added = n_added

    def extra_repr(self) -> str:
        return f"rows={len(self)}, row_shape={self.row_shape}, capacity={self.capacity}, dtype={self.storage.dtype}"


class SyntheticPool(RingStore):
    """Synthetic images kept as uint8 on the device: ``add`` quantises, ``sample`` returns float images in [0, 1].

    The reference saves each image as an 8-bit PNG and reads it back, so the student only ever sees 8-bit images;
    :func:`~dfkd.data.loader.to_uint8` keeps those levels (rounding instead of the reference's truncation).

    Args:
        image_shape: ``(C, H, W)``.
        capacity: most images kept, the oldest replaced first; None (the reference: it never prunes) keeps every
            image of the run, which at CIFAR size is 3 KB per image (about 600 MB for DeepInversion R34->R18).
        device: where the images live.

    Example:
        >>> pool = SyntheticPool((3, 8, 8), capacity=100)
        >>> pool.add(torch.rand(16, 3, 8, 8))
        >>> pool.sample(4).shape, len(pool)
        (torch.Size([4, 3, 8, 8]), 16)
    """

    def __init__(
        self, image_shape: tuple[int, int, int], capacity: int | None = None, device: torch.device | str | None = None
    ):
        super().__init__(tuple(image_shape), torch.uint8, capacity, device)

    def add(self, x01: Tensor) -> None:
        """Quantise images in [0, 1] to uint8 and append them (no gradient is kept)."""
        self.append(to_uint8(x01))

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``min(n, len)`` distinct images drawn uniformly, float32 in [0, 1] on the pool's device.

        Like the reference's loader over a pool smaller than a batch, a pool of fewer than ``n`` images gives them
        all. Each call draws anew (independent batches, not passes over the pool).
        """
        return to_float(self.storage.index_select(0, self.random_index(n, generator)))

    def latest(self, n: int) -> Tensor:
        """The ``min(n, len)`` images added last, float32 in [0, 1] (for sample grids)."""
        return to_float(self.last(n))
