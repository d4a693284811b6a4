"""An exponential moving average of the student's weights (``train.ema_decay``).

A data-free student follows a moving target: the generator keeps changing what it draws, so the student's test
accuracy moves by points from one epoch to the next even at a small learning rate. The average over the last few
thousand steps is a student of the whole recent distribution rather than of the latest batches.

The average is passive: it reads the student after every optimiser step and never feeds back into training, so a
run with it trains exactly the student a run without it trains. With the average on, evaluation, the best/last
checkpoints' weights and the summary are the averaged student's; the live student's accuracy is logged beside it
(``eval/top1_live``) and its weights are kept in checkpoints for resuming.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


def ema_new_weight(update: int, decay: float) -> float:
    """The weight of the live student in update number ``update`` (1-based): (1 - decay) / (1 - decay**update).

    This is the bias-corrected average (as in Adam's moment estimates): after k updates the average is
    sum_i decay**(k - i) * w_i over the k weights seen, normalised, so the random initialisation never enters it
    (the first update copies the student) and ``decay`` means the same horizon, about 1 / (1 - decay) steps, from
    the start of the run to its end.
    """
    return (1.0 - decay) / (1.0 - decay**update)


class StudentEMA:
    """The averaged copy of a student: float parameters and buffers averaged, integer buffers copied."""

    def __init__(self, student: nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.updates = 0
        self.module = copy.deepcopy(student)
        self.module.eval()
        self.module.requires_grad_(False)

    @torch.no_grad()
    def update(self, student: nn.Module) -> None:
        self.updates += 1
        weight = ema_new_weight(self.updates, self.decay)
        averaged, live = [], []
        for mine, theirs in zip(self._tensors(self.module), self._tensors(student)):
            if mine.is_floating_point():
                averaged.append(mine)
                live.append(theirs.detach())
            else:
                mine.copy_(theirs)
        if averaged:
            torch._foreach_lerp_(averaged, live, weight)

    @staticmethod
    def _tensors(module: nn.Module) -> list[torch.Tensor]:
        return [*module.parameters(), *module.buffers()]
