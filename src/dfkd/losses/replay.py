"""Loss terms of the replay methods of Binici et al.: MB-DFKD (WACV 2022, arXiv 2108.05698) and PRE-DFKD (AAAI 2022,
arXiv 2201.03019). Reference: the official PRE-DFKD code ``kuluhan/PRE-DFKD@0b39f6a`` ``distillation.py`` and the
MB-DFKD re-implementation in ``gaurav104/LRA@5a5dd67`` ``src/agents/predfkd_memory.py``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from dfkd.losses import activation_loss, class_balance, js_div, onehot_ce
from dfkd.losses.precision import upcast


def balance_log10(t: Tensor) -> Tensor:
    """sum_c p_bar_c log10 p_bar_c of the batch-mean softmax: DAFL's information-entropy loss in base 10, as the
    replay methods write it (minimising it balances the classes)."""
    return class_balance(t) / math.log(10.0)


def js_competition(s: Tensor, t: Tensor, T: float = 3.0) -> Tensor:
    """1 - clip(JS_T(s, t), 0, 1) with the JS averaged over batch *and* classes (``nn.KLDivLoss()``'s default
    reduction in the reference), the teacher detached: the novel generator's disagreement term. Minimising it
    drives teacher and student apart on the generated batch."""
    return 1.0 - (js_div(s, t.detach(), T) / s.shape[1]).clamp(0.0, 1.0)


def novel_generator_loss(
    t: Tensor, s: Tensor | None, features: Tensor | None, oh: float, ie: float, act: float, adv: float, tau: float = 3.0
) -> dict[str, Tensor]:
    """The novel generator's loss shared by MB-DFKD and PRE-DFKD (reference ``train_novel_generator``).

    L_G = oh * CE(t, argmax t) + ie * sum p_bar log10 p_bar + act * (-mean |f|) + adv * (1 - clip(JS_tau(s, t))),
    with ``features`` the teacher's penultimate feature (None when ``act`` is 0) and ``s`` the student's logits (None
    when ``adv`` is 0).

    Returns:
        ``{"loss", "loss_oh", "loss_ie", "loss_act", "loss_adv"}``.
    """
    zero = t.new_zeros((), dtype=torch.float32)
    terms = {
        "loss_oh": onehot_ce(t),
        "loss_ie": balance_log10(t),
        "loss_act": activation_loss(features) if features is not None else zero,
        "loss_adv": js_competition(s, t, tau) if s is not None else zero,
    }
    loss = oh * terms["loss_oh"] + ie * terms["loss_ie"] + act * terms["loss_act"] + adv * terms["loss_adv"]
    return {"loss": loss, **terms}


def latent_prior_loss(z: Tensor) -> Tensor:
    """MSE(var_b(z), 1) + MSE(mean_b(z), 0): keeps tuned replay latents near N(0, I).

    The variance is per latent dimension and unbiased, as in the reference; a single latent has no spread, and its
    (population) variance 0 is used instead of NaN.
    """
    z = upcast(z)
    var, mean = z.var(dim=0, correction=1 if z.shape[0] > 1 else 0), z.mean(dim=0)
    return F.mse_loss(var, torch.ones_like(var)) + F.mse_loss(mean, torch.zeros_like(mean))


def vae_kld(mu: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mu, sigma^2) || N(0, I)) summed over latent dims, averaged over the batch."""
    mu, logvar = upcast(mu), upcast(logvar)
    return (-0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(dim=1)).mean()


def vae_loss(
    x_rec: Tensor, x: Tensor, t_rec: Tensor, t: Tensor, mu: Tensor, logvar: Tensor, kld_weight: float = 1e-5
) -> dict[str, Tensor]:
    """PRE-DFKD's memory-generator (VAE) loss: L1(x_rec, x) + L1(T(x_rec), T(x)) + kld_weight * KLD(mu, logvar).

    Targets ``x`` and ``t`` are detached. L1 terms are element means.

    Args:
        x_rec: decoded images. x: the images they encode (same space as ``x_rec``).
        t_rec: teacher logits of ``x_rec``. t: teacher logits of ``x``.
        mu, logvar: the encoder's posterior parameters ``[B, latent]``.
        kld_weight: 1e-5 in the reference.

    Returns:
        ``{"loss", "rec_image", "rec_logits", "kld"}``.
    """
    rec_image = F.l1_loss(upcast(x_rec), upcast(x).detach())
    rec_logits = F.l1_loss(upcast(t_rec), upcast(t).detach())
    kld = vae_kld(mu, logvar)
    return {"loss": rec_image + rec_logits + kld_weight * kld, "rec_image": rec_image, "rec_logits": rec_logits,
            "kld": kld}  # fmt: skip
