"""Adversarial (teacher-student discrepancy) terms for the generator: minimising them *maximises* disagreement."""

from __future__ import annotations

from torch import Tensor

from dfkd.losses.kd import js_div, kd_kl, kd_l1


def agreement_mask(s: Tensor, t: Tensor) -> Tensor:
    """1.0 where the student's top-1 class equals the teacher's, else 0.0 (float, no gradient)."""
    return (s.argmax(dim=1) == t.argmax(dim=1)).float()


def adv_masked_kl(s: Tensor, t: Tensor, T: float = 1.0) -> Tensor:
    """Decision-masked adversarial KL of CMI (Fang et al. 2021) and CuDFKD (T=3 there).

    -1/B * sum_i m_i * T^2 * KL(p_t,i || p_s,i), with m_i = [argmax s_i == argmax t_i]: the generator is pushed
    only on samples the student already classifies like the teacher. The mean runs over all B samples (masked ones
    count as zero), and the gradient flows through both s and t.
    """
    return -(agreement_mask(s, t) * kd_kl(s, t, T, reduction="sample")).mean()


def adv_unmasked_kl(s: Tensor, t: Tensor, T: float = 1.0, reduction: str = "batchmean") -> Tensor:
    """-KD_T(s, t): the plain adversarial KL of ZSKT and DFQ (batch mean in the CMI benchmark).

    ``reduction='mean'`` (element mean over B*C) is the original ZSKT code's ``F.kl_div`` default.
    """
    return -kd_kl(s, t, T, reduction=reduction)


def adv_l1(s: Tensor, t: Tensor) -> Tensor:
    """-mean|s - t|: DFAD's adversarial loss (Fang et al. 2019)."""
    return -kd_l1(s, t)


def adv_js(s: Tensor, t: Tensor, T: float = 3.0) -> Tensor:
    """1 - clip(JS_T(s, t), 0, 1): the ADI competition term (Yin et al. 2020) as used by CuDFKD's ``adv_type js``."""
    return 1.0 - js_div(s, t, T).clamp(0.0, 1.0)
