"""AdaDFKD's InfoNCE terms: the R2M ring loss against a queue of past student features, the hardness schedule that
slides the ring from easy to hard negatives, the student's in-batch InfoNCE, and the queue itself (Li et al.,
"AdaDFKD: Exploring Adaptive Inter-Sample Relationship in Data-Free Knowledge Distillation", Neural Networks 2024;
reference ``ljrprocc/DFKD@cd281c4`` ``datafree/utils/_utils.py`` ``MoCo``, ``difficulty_mining``).

Every similarity here is a cosine between L2-normalised features, computed in float32 even under autocast (at a
temperature of 0.07, a bfloat16 cosine's rounding error of ~0.004 is a logit error of ~0.06).
"""

from __future__ import annotations

import math
from contextlib import AbstractContextManager, nullcontext

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dfkd.losses.precision import upcast


def hardness(epoch: int, epochs: int, begin: float, end: float, length: float) -> float:
    """The ring's start h in force during 0-based ``epoch`` (reference ``datafree_kd.py`` main loop).

    h = min(max(0, (1 - length) (epoch - floor(E begin)) / floor(E (end - begin))), 1 - length): 0 until
    floor(E begin), then linear up to 1 - length, reached floor(E (end - begin)) epochs later. A ramp shorter than one
    epoch (E (end - begin) < 1, a division by zero in the reference) jumps in one epoch.
    """
    span = max(1, math.floor(epochs * (end - begin)))
    return min(max(0.0, (1.0 - length) * (epoch - math.floor(epochs * begin)) / span), 1.0 - length)


def ring_bounds(h: float, length: float, k: int) -> tuple[int, int]:
    """Ranks [floor(h K), floor((h + length) K)) of the K negatives, sorted by ascending similarity, that R2M keeps."""
    return min(int(h * k), k), min(int((h + length) * k), k)


def _fp32(device: torch.device) -> AbstractContextManager:
    """Autocast off on ``device`` (matmuls inside run in the inputs' float32)."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device.type, enabled=False)
    return nullcontext()


def r2m_loss(f_t: Tensor, f_s: Tensor, queue: Tensor, h: float, length: float, tau: float) -> Tensor:
    """R2M's InfoNCE with a ring of negatives: the teacher's feature of each sample must pick the student's feature of
    the same sample out of a band of past student features, the band sliding from the least to the most similar.

    With q_i = f_t,i / |f_t,i| (gradient flows) and k_i = f_s,i / |f_s,i| (no gradient), the negatives of row i are
    q_i . Q_j for the K queue columns, sorted ascending; only ranks :func:`ring_bounds` (h, length, K) are kept:
    L = mean_i -log( e^(q_i.k_i / tau) / (e^(q_i.k_i / tau) + sum_{j in ring_i} e^(q_i.Q_j / tau)) ).

    Args:
        f_t: teacher features ``[B, d]`` (the queries; carry the gradient).
        f_s: student features ``[B, d]`` (the keys; detached here), already projected to the teacher's width.
        queue: unit-norm negatives ``[d, K]``.
        h: hardness (the ring's start as a fraction of K), see :func:`hardness`.
        length: the ring's width as a fraction of K.
        tau: temperature.

    Returns:
        The scalar loss.
    """
    with _fp32(f_t.device):
        q = F.normalize(upcast(f_t), dim=1)
        k = F.normalize(upcast(f_s.detach()), dim=1)
        positive = (q * k).sum(dim=1, keepdim=True)
        negatives = q @ upcast(queue.detach())
        lo, hi = ring_bounds(h, length, negatives.shape[1])
        ring = negatives.sort(dim=1).values[:, lo:hi]
        logits = torch.cat([positive, ring], dim=1) / tau
        labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
        return F.cross_entropy(logits, labels)


def batch_infonce(f_t: Tensor, f_s: Tensor, tau: float, reduction: str = "mean") -> Tensor:
    """In-batch InfoNCE of the student against the teacher (reference ``difficulty_mining``'s ``loss_infonce``).

    With d_ij = cos(f_t,i, f_s,j): L = mean_i -log( e^(d_ii / tau) / sum_j e^(d_ij / tau) ). The teacher's features
    are detached; the gradient reaches the student. ``reduction='none'`` returns one value per row.
    """
    with _fp32(f_s.device):
        t = F.normalize(upcast(f_t.detach()), dim=1)
        s = F.normalize(upcast(f_s), dim=1)
        logits = t @ s.T / tau
        labels = torch.arange(logits.shape[0], device=logits.device)
        return F.cross_entropy(logits, labels, reduction=reduction)


class FeatureQueue(nn.Module):
    """A ring buffer of ``size`` unit-norm feature columns ``[dim, size]``, filled with random unit vectors at the start
    (as MoCo's queue). :meth:`push` overwrites the oldest columns with any number of new ones, wrapping around the
    end (the reference asserts ``size % batch == 0``). The queue and its pointer are persistent buffers, so a
    checkpoint resumes it exactly. Pushing reads the pointer on the device (no host synchronisation).

    Example:
        >>> queue = FeatureQueue(2, 5)
        >>> queue.push(torch.eye(2).repeat(2, 1))  # 4 columns: positions 0..3
        >>> queue.push(torch.eye(2))  # 2 columns: positions 4 and 0
        >>> int(queue.ptr), queue.queue[:, 0].tolist()
        (1, [0.0, 1.0])
    """

    queue: Tensor
    ptr: Tensor

    def __init__(self, dim: int, size: int, device: torch.device | str | None = None):
        super().__init__()
        if size < 1:
            raise ValueError(f"n_neg={size}: the queue needs at least one column (give n_neg >= 1)")
        self.register_buffer("queue", F.normalize(torch.randn(dim, size, device=device), dim=0))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long, device=device))

    @property
    def size(self) -> int:
        return self.queue.shape[1]

    @torch.no_grad()
    def push(self, keys: Tensor) -> None:
        """Write the rows of ``keys`` ``[N, dim]`` as columns at the pointer, in order; advance it by N (mod size).

        More than ``size`` rows leave only the last ``size`` of them, where a column-by-column write would.
        """
        n, size = keys.shape[0], self.size
        skipped = max(0, n - size)
        keys = keys[skipped:]
        where = (self.ptr + skipped + torch.arange(keys.shape[0], device=self.queue.device)) % size
        self.queue.index_copy_(1, where, keys.T.to(self.queue.dtype))
        self.ptr.copy_((self.ptr + n) % size)
