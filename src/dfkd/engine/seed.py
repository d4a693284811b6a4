"""Seeding and RNG state capture, so runs repeat on CPU and resume exactly."""

from __future__ import annotations

import random

import torch


def seed_everything(seed: int, rank: int = 0) -> None:
    """Seed Python and torch (all devices); each rank gets ``seed + rank`` so ranks synthesise different images."""
    seed = seed + rank
    random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Tensor-only RNG state (loadable with ``torch.load(weights_only=True)``)."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
