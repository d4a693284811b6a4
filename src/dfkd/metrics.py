"""Evaluation metrics: top-1, teacher agreement, probability loyalty and the accuracy-curve statistics.

CuDFKD (Li et al., arXiv 2208.13648) reports robustness as the mean and variance of the test-accuracy curve and
fidelity as agreement and probability loyalty with the teacher. Robustness: the authors' notebook
``ljrprocc/DFKD@b5ddd19:notebooks/Convergence Visualization.ipynb`` takes ``np.mean`` and ``np.var`` of the per-epoch
top-1 from epoch 80 on (``[80:]``). Fidelity: ``prediction_agreement_evaluator``
(``ljrprocc/DataFree@bf3096b:datafree/evaluators.py:142``) and ``ProbLoyalty``, 1 - sqrt of scipy's Jensen-Shannon
distance over softmax + 1e-8 (``datafree/metrics/kl_metric.py`` L9-26).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor


def top1_percent(logits: Tensor, labels: Tensor) -> float:
    return float((logits.argmax(dim=1) == labels).double().mean() * 100.0)


def agreement_percent(s: Tensor, t: Tensor) -> float:
    """Agreement@1: the percentage of inputs where student and teacher predict the same class."""
    return float((s.argmax(dim=1) == t.argmax(dim=1)).double().mean() * 100.0)


def js_distance(s: Tensor, t: Tensor, eps: float = 1e-8) -> Tensor:
    """Per-row Jensen-Shannon *distance* (the square root of the divergence, natural log) between the softmaxes.

    Matches ``scipy.spatial.distance.jensenshannon(softmax(s) + eps, softmax(t) + eps)``, which renormalises its
    inputs; computed in float64.
    """
    p = torch.softmax(s.double(), dim=1) + eps
    q = torch.softmax(t.double(), dim=1) + eps
    p = p / p.sum(dim=1, keepdim=True)
    q = q / q.sum(dim=1, keepdim=True)
    m = 0.5 * (p + q)
    div = 0.5 * ((p * (p / m).log()).sum(dim=1) + (q * (q / m).log()).sum(dim=1))
    return div.clamp_min(0.0).sqrt()


def prob_loyalty(s: Tensor, t: Tensor) -> float:
    """Probability loyalty, corrected form: mean over inputs of 1 - D_JS(p_t, p_s)^(1/2)."""
    return _nanmean(1.0 - js_distance(s, t))


def prob_loyalty_reference(s: Tensor, t: Tensor) -> float:
    """Probability loyalty as the CuDFKD code computes it: 1 - sqrt(JS distance) = 1 - D_JS^(1/4).

    The reference takes the square root of scipy's JS *distance*, which is already a square root; keep this form
    to compare with the published numbers (e.g. 0.8909), and prefer :func:`prob_loyalty` otherwise.
    """
    return _nanmean(1.0 - js_distance(s, t).sqrt())


def _nanmean(values: Tensor) -> float:
    finite = values[~values.isnan()]
    return float(finite.mean()) if finite.numel() else float("nan")


def accuracy_curve_stats(acc: Sequence[float], start: int = 80, end: int | None = None) -> dict[str, float | None]:
    """Best, mean and population variance of a per-epoch accuracy curve over the window ``acc[start:end]``.

    CuDFKD's robustness numbers use the window 80..end (``np.var``, i.e. population variance). The window is empty
    when the run is shorter than ``start``; then mu and var are None.
    """
    window = list(acc[start:end])
    best = max(acc) if acc else None
    if not window:
        return {"best": best, "mu": None, "var": None, "window": [start, end], "window_epochs": 0}
    mu = math.fsum(window) / len(window)
    var = math.fsum((a - mu) ** 2 for a in window) / len(window)
    return {"best": best, "mu": mu, "var": var, "window": [start, end], "window_epochs": len(window)}


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (n - 1; 0 for a single value) of the non-None values."""
    xs = [v for v in values if v is not None]
    if not xs:
        return None, None
    mean = math.fsum(xs) / len(xs)
    std = math.sqrt(math.fsum((x - mean) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return mean, std
