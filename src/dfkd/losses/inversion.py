"""Terms that pull synthetic images toward what the teacher saw in training (model inversion priors)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dfkd.hooks import ForwardCapture
from dfkd.losses.precision import upcast


def batch_channel_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance of a BatchNorm input [B, C, H, W], in float32 even under autocast.

    A half-precision ``x`` is reduced as it is (fp32 accumulation, the statistics rounded once), since an fp32 copy
    of it would be kept for the backward pass: twice the memory of every BN input of the teacher in a synthesis step.
    """
    dims = [0, *range(2, x.dim())]
    if x.dtype in (torch.float16, torch.bfloat16):
        var, mean = (upcast(s) for s in torch.var_mean(x, dim=dims, correction=0))
        return mean, var
    return x.mean(dim=dims), x.var(dim=dims, unbiased=False)


def bn_stat_loss(x: Tensor, running_mean: Tensor, running_var: Tensor) -> Tensor:
    """DeepInversion's feature-statistics term for one BatchNorm layer (Yin et al., CVPR 2020).

    ``x`` is the layer's input [B, C, H, W]; its per-channel batch mean and biased variance are compared with the
    layer's running statistics: ||var - running_var||_2 + ||mean - running_mean||_2 (plain, not squared, norms).
    """
    mean, var = batch_channel_stats(x)
    return torch.linalg.vector_norm(var - upcast(running_var)) + torch.linalg.vector_norm(mean - upcast(running_mean))


def bn_momentum_loss(
    mean: Tensor, var: Tensor, running_mean: Tensor, running_var: Tensor, ema_mean: Tensor, ema_var: Tensor, m: Tensor
) -> Tensor:
    """FastDFKD's BN-statistics term with momentum for one layer: the batch statistics blended with their moving
    average over earlier synthesis rounds are matched to the running ones,
    ||running_var - (1 - m) var - m ema_var||_2 + ||running_mean - (1 - m) mean - m ema_mean||_2;
    ``m`` = 0 is :func:`bn_stat_loss` (the reference's form before its first moving-average update)."""
    blended_var = (1 - m) * var + m * ema_var
    blended_mean = (1 - m) * mean + m * ema_mean
    return torch.linalg.vector_norm(upcast(running_var) - blended_var) + torch.linalg.vector_norm(
        upcast(running_mean) - blended_mean
    )


class MomentumBNStats(nn.Module):
    """BN-statistics loss with a moving average of the synthetic batches' statistics (FastDFKD, NAYER).

    Hooks every BatchNorm2d of ``model``; inside ``with stats.capture():`` each forward computes
    :func:`bn_momentum_loss` against the moving average of earlier rounds (plain DeepInversion until the first
    :meth:`update`). :meth:`update` folds the statistics of the last captured forward into the average:
    ema <- momentum * ema + (1 - momentum) * stats (the first update copies them). The averages are buffers, so the
    method's checkpoints hold them and a resumed run continues them exactly.
    """

    def __init__(self, model: nn.Module, momentum: float):
        super().__init__()
        layers = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
        if not layers:
            raise ValueError(f"{type(model).__name__} has no BatchNorm2d layer to match statistics with")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"bn_momentum={momentum}: give a momentum in [0, 1)")
        self.momentum = momentum
        device = layers[0].running_mean.device
        for i, layer in enumerate(layers):
            self.register_buffer(f"mean_{i}", torch.zeros(layer.num_features, device=device))
            self.register_buffer(f"var_{i}", torch.zeros(layer.num_features, device=device))
        self.register_buffer("initialised", torch.zeros((), dtype=torch.bool, device=device))
        self._index = {id(layer): i for i, layer in enumerate(layers)}
        self._capture = ForwardCapture(layers, self._record)
        self._last: list = []

    def _record(self, layer: nn.Module, inputs: tuple[Tensor, ...], _out: Tensor) -> tuple[Tensor, int, Tensor, Tensor]:
        i = self._index[id(layer)]
        mean, var = batch_channel_stats(inputs[0])
        # a tensor weight (0 before the first update) instead of a branch: no host sync inside the forward
        m = self.initialised.to(mean.dtype) * self.momentum
        loss = bn_momentum_loss(
            mean, var, layer.running_mean, layer.running_var, getattr(self, f"mean_{i}"), getattr(self, f"var_{i}"), m
        )
        return loss, i, mean.detach(), var.detach()

    def capture(self):
        return self._capture.capture()

    def loss(self) -> Tensor:
        """Sum over the layers of the last captured forward (unweighted); their statistics stay for :meth:`update`."""
        self._last = self._capture.pop(partial=True)
        return torch.stack([loss for loss, *_ in self._last]).sum()

    @torch.no_grad()
    def update(self) -> None:
        """Fold the statistics of the last forward whose :meth:`loss` was taken into the moving averages."""
        if not self._last:
            raise RuntimeError("MomentumBNStats.update() needs a captured forward whose loss() was taken")
        first = ~self.initialised
        for _, i, mean, var in self._last:
            for name, value in ((f"mean_{i}", mean), (f"var_{i}", var)):
                ema = getattr(self, name)
                ema.copy_(torch.where(first, value, self.momentum * ema + (1 - self.momentum) * value))
        self.initialised.fill_(True)

    def remove(self) -> None:
        self._capture.remove()


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
    return histogram_entropy(counts) / math.log(classes)


def histogram_entropy(counts: Tensor) -> Tensor:
    """Entropy (nats) of a histogram of float ``counts``: ln(bins) when every bin is equal, 0 when one bin has all."""
    p = counts / counts.sum()
    return -torch.special.xlogy(p, p).sum()


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
