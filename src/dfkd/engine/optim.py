"""Optimiser and per-epoch learning-rate schedule from an OptimConfig."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from dfkd.config import OptimConfig


def build_optimizer(params: Iterable[nn.Parameter], cfg: OptimConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, epochs: int):
    """Cosine annealing over ``epochs`` (the CMI benchmark's choice), multi-step, or constant; stepped per epoch."""
    if cfg.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, epochs), eta_min=cfg.eta_min)
    milestones = cfg.milestones if cfg.scheduler == "multistep" else []
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=cfg.gamma)


def warmup_factor(step: int, warmup_steps: int) -> float:
    """The learning-rate factor of 0-based student step ``step``: (step + 1) / warmup_steps, then 1."""
    return 1.0 if step >= warmup_steps else (step + 1) / warmup_steps
