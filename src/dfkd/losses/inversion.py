"""Terms that pull synthetic images toward what the teacher saw in training (model inversion priors)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dfkd.hooks import ForwardCapture
from dfkd.losses.precision import upcast


def bn_stat_loss(x: Tensor, running_mean: Tensor, running_var: Tensor) -> Tensor:
    """DeepInversion's feature-statistics term for one BatchNorm layer (Yin et al., CVPR 2020).

    ``x`` is the layer's input [B, C, H, W]; its per-channel batch mean and biased variance are compared with the
    layer's running statistics: ||var - running_var||_2 + ||mean - running_mean||_2 (plain, not squared, norms).
    The norms are float32 even under autocast; a half-precision ``x`` is reduced as it is (fp32 accumulation, the
    statistics rounded once), since an fp32 copy of it would be kept for the backward pass: twice the memory of
    every BN input of the teacher in the generator step.
    """
    dims = [0, *range(2, x.dim())]
    if x.dtype in (torch.float16, torch.bfloat16):
        var, mean = (upcast(s) for s in torch.var_mean(x, dim=dims, correction=0))
    else:
        mean = x.mean(dim=dims)
        var = x.var(dim=dims, unbiased=False)
    return torch.linalg.vector_norm(var - upcast(running_var)) + torch.linalg.vector_norm(mean - upcast(running_mean))


class BNStatsHooks(ForwardCapture):
    """Forward hooks on every BatchNorm2d of a model that compute :func:`bn_stat_loss` while capturing.

    The hooks only do work inside ``with hooks.capture():``, so teacher forwards on student batches stay cheap.

    Example:
        >>> hooks = BNStatsHooks(teacher)
        >>> with hooks.capture():
        ...     logits = teacher(x)
        >>> loss_bn = hooks.loss()
    """

    def __init__(self, model: nn.Module):
        self.layers = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
        if not self.layers:
            raise ValueError(f"{type(model).__name__} has no BatchNorm2d layer to match statistics with")
        super().__init__(self.layers, lambda m, inputs, _out: bn_stat_loss(inputs[0], m.running_mean, m.running_var))

    def loss(self) -> Tensor:
        """Sum over the layers that ran in the last captured forward (unweighted, as in the reference)."""
        return torch.stack(self.pop(partial=True)).sum()


def onehot_ce(t: Tensor, targets: Tensor | None = None) -> Tensor:
    """Cross-entropy of the teacher's logits against ``targets`` (default: its own argmax), as in DAFL and DFQ."""
    if targets is None:
        targets = t.argmax(dim=1)
    return F.cross_entropy(upcast(t), targets)


def batch_entropy(t: Tensor, T: float = 1.0) -> Tensor:
    """Entropy H(p_bar) of the batch-mean prediction p_bar = mean_i softmax(t_i / T) (CuDFKD's balance term)."""
    p_bar = F.softmax(upcast(t) / T, dim=1).mean(dim=0)
    # a class whose probability underflows to 0 contributes 0 (not 0 * log 0 = NaN), with a finite gradient
    return -(p_bar * p_bar.clamp_min(torch.finfo(p_bar.dtype).tiny).log()).sum()


def class_entropy(t: Tensor) -> Tensor:
    """Entropy of the histogram of the teacher's predicted classes ``argmax t`` over a batch, divided by ln(classes):
    1 = every class equally often, 0 = one class only. A diagnostic (no gradient): a generator that has collapsed
    onto a few classes shows here long before the student's accuracy can tell it from a short budget."""
    classes = t.shape[1]
    if classes < 2:
        return t.new_zeros((), dtype=torch.float32)
    predicted = t.argmax(dim=1, keepdim=True)
    counts = (predicted == torch.arange(classes, device=t.device)).sum(dim=0).to(torch.float32)
    p = counts / counts.sum()
    return -torch.special.xlogy(p, p).sum() / math.log(classes)


def class_balance(t: Tensor) -> Tensor:
    """sum_c p_bar_c log p_bar_c at T=1 (DAFL's information-entropy loss; minimising it balances the classes)."""
    return -batch_entropy(t, 1.0)


def activation_loss(features: Tensor) -> Tensor:
    """-mean |f|: DAFL's activation loss on the teacher's penultimate features (Chen et al., ICCV 2019)."""
    return -upcast(features).abs().mean()


def _diffs(x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return (
        x[:, :, :, :-1] - x[:, :, :, 1:],
        x[:, :, :-1, :] - x[:, :, 1:, :],
        x[:, :, 1:, :-1] - x[:, :, :-1, 1:],
        x[:, :, :-1, :-1] - x[:, :, 1:, 1:],
    )


def tv_l1(x: Tensor) -> Tensor:
    """Total-variation prior as the CMI benchmark's DeepInversion uses it: sum over 4 directions of mean |dx|."""
    return sum(d.abs().mean() for d in _diffs(x))  # type: ignore[return-value]


def tv_l2(x: Tensor) -> Tensor:
    """The official DeepInversion TV prior: sum over 4 directions of the L2 norm of the differences."""
    return sum(torch.linalg.vector_norm(d) for d in _diffs(x))  # type: ignore[return-value]
