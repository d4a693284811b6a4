"""Distillation divergences between student and teacher logits."""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor

from dfkd.losses.precision import upcast


def kd_kl(s: Tensor, t: Tensor, T: float = 1.0, reduction: str = "batchmean") -> Tensor:
    """KL(p_t || p_s) at temperature T, scaled by T^2 (Hinton et al., "Distilling the Knowledge in a Neural Network").

    This is the CMI benchmark's ``kldiv``. ``reduction='batchmean'`` sums over classes and averages over the batch;
    ``'none'`` returns the per-element terms (also scaled by T^2); ``'sample'`` returns one value per row.
    """
    log_q = F.log_softmax(upcast(s) / T, dim=1)
    log_p = F.log_softmax(upcast(t) / T, dim=1)
    terms = log_p.exp() * (log_p - log_q) * (T * T)
    if reduction == "none":
        return terms
    if reduction == "sample":
        return terms.sum(dim=1)
    if reduction == "batchmean":
        return terms.sum() / s.shape[0]
    if reduction == "mean":  # element mean: the original ZSKT code's F.kl_div default
        return terms.mean()
    raise ValueError(f"unknown reduction {reduction!r}")


def kd_l1(s: Tensor, t: Tensor, reduction: str = "mean") -> Tensor:
    """Mean absolute difference of logits (DFAD, Fang et al. 2019); ``'sample'`` averages each row over classes."""
    diff = (upcast(s) - upcast(t)).abs()
    if reduction == "sample":
        return diff.mean(dim=1)
    if reduction == "none":
        return diff
    return diff.mean()


def kd_mse(s: Tensor, t: Tensor, reduction: str = "mean") -> Tensor:
    """Squared difference of logits; ``'sample'`` averages each row over classes."""
    sq = (upcast(s) - upcast(t)).pow(2)
    if reduction == "sample":
        return sq.mean(dim=1)
    if reduction == "none":
        return sq
    return sq.mean()


def js_div(s: Tensor, t: Tensor, T: float = 1.0) -> Tensor:
    """Jensen-Shannon divergence as the CMI benchmark computes it (used by ADI/DeepInversion's competition term).

    P, Q are the tempered softmaxes and M their mean; all three are clamped to [0.01, 0.99] *after* M is formed,
    then JS = (KL(M||P) + KL(M||Q)) / 2, each KL batch-mean reduced.
    """
    p = F.softmax(upcast(s) / T, dim=1)
    q = F.softmax(upcast(t) / T, dim=1)
    m = 0.5 * (p + q)
    p, q, m = p.clamp(0.01, 0.99), q.clamp(0.01, 0.99), m.clamp(0.01, 0.99)
    batch = s.shape[0]
    kl_mp = (m * (m.log() - p.log())).sum() / batch
    kl_mq = (m * (m.log() - q.log())).sum() / batch
    return 0.5 * kl_mp + 0.5 * kl_mq


def attention_map(a: Tensor, size: tuple[int, int] | None = None) -> Tensor:
    """Spatial attention of a feature map, as ZSKT uses it (Zagoruyko & Komodakis, ICLR 2017): [B, C, H, W] -> [B, H*W].

    The channel mean of a^2, flattened per sample and L2-normalised. With ``size``, the [H, W] map is average-pooled
    to ``size`` before flattening (to compare feature maps of different resolutions).
    """
    q = upcast(a).pow(2).mean(dim=1, keepdim=True)
    if size is not None and tuple(q.shape[-2:]) != tuple(size):
        q = F.adaptive_avg_pool2d(q, size)
    return F.normalize(q.flatten(1), dim=1)


def attention_transfer(s_feats: Sequence[Tensor], t_feats: Sequence[Tensor]) -> Tensor:
    """ZSKT's attention-transfer term (Micaelli & Storkey, NeurIPS 2019): sum_j mean((a(S_j) - a(T_j))^2).

    ``a`` is :func:`attention_map`; the mean runs over batch and positions; the weight (ZSKT: beta = 250) is applied
    by the caller. A pair of maps of different resolution is compared at the smaller one (ZSKT's WRN groups always
    match).
    """
    if len(s_feats) != len(t_feats) or not s_feats:
        raise ValueError(f"attention transfer needs matching, non-empty lists, got {len(s_feats)} and {len(t_feats)}")
    total = None
    for fs, ft in zip(s_feats, t_feats):
        size = (min(fs.shape[-2], ft.shape[-2]), min(fs.shape[-1], ft.shape[-1]))
        term = (attention_map(fs, size) - attention_map(ft, size)).pow(2).mean()
        total = term if total is None else total + term
    return total
