"""CMI's contrastive machinery: instance features from forward hooks, the projection head, the feature memory bank and
the instance-discrimination loss (Fang et al., "Contrastive Model Inversion for Data-Free Knowledge Distillation",
IJCAI 2021, arXiv 2105.08584; reference ``zju-vipa/CMI@9e79fa9`` ``datafree/synthesis/contrastive.py``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dfkd.data.pool import RingStore
from dfkd.hooks import ForwardCapture
from dfkd.losses.precision import upcast

log = logging.getLogger(__name__)

# A bank larger than this stays in host memory (the reference keeps every bank there; 40,960 rows of a WRN-40-2
# teacher's 2 x 2,704 features are 0.9 GB, which fits any accelerator this library targets).
BANK_DEVICE_LIMIT_BYTES = 4 * 1024**3


class InstanceMeanHooks(ForwardCapture):
    """Per-sample spatial means of the *inputs* of ``modules``, concatenated: CMI's instance feature.

    Hooks only record inside ``with hooks.capture():`` so the teacher's other forwards (student batches) stay cheap.

    Example:
        >>> hooks = InstanceMeanHooks([m for m in teacher.modules() if isinstance(m, nn.BatchNorm2d)])
        >>> with hooks.capture():
        ...     teacher(x)
        >>> f = hooks.features()  # [B, sum of the hooked modules' input channels]
    """

    def __init__(self, modules: Sequence[nn.Module]):
        super().__init__(modules, lambda _m, inputs, _out: upcast(inputs[0]).mean(dim=(2, 3)))

    def features(self) -> Tensor:
        """The features of the last captured forward, ``[B, D]``."""
        return torch.cat(self.pop(), dim=1)


class ContrastHead(nn.Module):
    """The projection head h(u) = l2normalise(W2 ReLU(W1 u)), W1: D -> D, W2: D -> ``head_dim``."""

    def __init__(self, dim: int, head_dim: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, head_dim))

    def forward(self, u: Tensor) -> Tensor:
        return F.normalize(self.mlp(u), p=2, dim=1)


def contrastive_loss(q: Tensor, k: Tensor, T: float, n_current: int | None = None) -> Tensor:
    """CMI's instance-discrimination loss: row i of the local-view queries must pick row i of the global-view keys.

    logits = q k^T / T, cross-entropy against the diagonal. The keys carry no gradient (stop-gradient, as in the
    reference). With ``n_current`` (the number of rows from the current batch, the rest coming from the memory bank)
    the reference's split mean is used: mean over the current rows + mean over the cached rows, which weighs the
    current batch as much as all the cached rows together; without it, one mean over every row.

    Args:
        q: projected, normalised local-view features ``[N, d]``.
        k: projected, normalised global-view features ``[N, d]``, same rows.
        T: temperature (``cr_T``).
        n_current: rows of the current batch, first in ``q`` and ``k``; None = a single mean.

    Returns:
        The scalar loss.
    """
    logits = upcast(q) @ upcast(k).detach().T / T
    ce = F.cross_entropy(logits, torch.arange(logits.shape[0], device=logits.device), reduction="none")
    if n_current is None or n_current >= ce.shape[0]:
        return ce.mean()
    return ce[:n_current].mean() + ce[n_current:].mean()


class MemoryBank(RingStore):
    """CMI's feature memory: a ring of ``capacity`` rows ``[f_local, f_global]``, one per image of past best batches.

    Unlike the reference's bank it accepts any batch size (no ``capacity % batch == 0`` assertion), samples from
    every filled row across the wrap-around (so it is never empty once anything was added), and lives on the device
    unless it would exceed :data:`BANK_DEVICE_LIMIT_BYTES`. Rows are allocated as they arrive.

    Args:
        dim: row width (2 x the instance-feature width).
        capacity: rows kept (the reference: 40,960).
        device: the training device.
    """

    def __init__(self, dim: int, capacity: int = 40960, device: torch.device | str | None = None):
        device = torch.device(device) if device is not None else torch.device("cpu")
        on_device = device.type == "cpu" or capacity * dim * 4 <= BANK_DEVICE_LIMIT_BYTES
        if not on_device:
            log.info("CMI memory bank of %d x %d floats kept in host memory", capacity, dim)
        super().__init__((dim,), torch.float32, capacity, device if on_device else "cpu", movable=on_device)
        self.device = device

    def add(self, rows: Tensor) -> None:
        self.append(rows)

    def sample(self, n: int) -> Tensor:
        """Up to ``n`` distinct rows drawn uniformly from the filled rows, on the training device (none if empty)."""
        if len(self) == 0:
            return torch.zeros(0, *self.row_shape, device=self.device)
        return self.storage.index_select(0, self.random_index(n)).to(self.device, non_blocking=True)
