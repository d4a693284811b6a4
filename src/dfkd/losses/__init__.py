"""Loss terms shared by the methods: small pure functions, each citing where it comes from.

Every tensor argument named ``s`` / ``t`` is a batch of student / teacher logits ``[B, C]``.
"""

from dfkd.losses.adversarial import adv_js, adv_l1, adv_masked_kl, adv_unmasked_kl, agreement_mask
from dfkd.losses.inversion import (
    BNStatsHooks,
    MomentumBNStats,
    activation_loss,
    batch_entropy,
    bn_momentum_loss,
    bn_stat_loss,
    class_balance,
    class_entropy,
    histogram_entropy,
    onehot_ce,
    tv_l1,
    tv_l2,
)
from dfkd.losses.kd import attention_map, attention_transfer, js_div, kd_kl, kd_l1, kd_mse

__all__ = [
    "BNStatsHooks",
    "MomentumBNStats",
    "activation_loss",
    "adv_js",
    "adv_l1",
    "adv_masked_kl",
    "adv_unmasked_kl",
    "agreement_mask",
    "attention_map",
    "attention_transfer",
    "batch_entropy",
    "bn_momentum_loss",
    "bn_stat_loss",
    "class_balance",
    "class_entropy",
    "histogram_entropy",
    "js_div",
    "kd_kl",
    "kd_l1",
    "kd_mse",
    "onehot_ce",
    "tv_l1",
    "tv_l2",
]
