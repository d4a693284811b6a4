"""Numerics shared by the loss terms."""

from __future__ import annotations

import torch
from torch import Tensor


def upcast(x: Tensor) -> Tensor:
    """Half-precision tensors to float32 (losses are computed in at least fp32); float32/64 pass unchanged."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
