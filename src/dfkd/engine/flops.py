"""Arithmetic of the training loop: the FLOPs of its parts, the rate it achieves, and this machine's peak to compare.

FLOPs are what :class:`torch.utils.flop_counter.FlopCounterMode` counts: the matrix products and convolutions
(forward and backward), two per multiply-add; element-wise work (activations, norms, the optimiser's update) counts
zero. The peak is measured, not looked up: the best rate of a large matrix product and of a 3x3 convolution, timed
in this process on its threads under the run's precision and memory format.
"""

from __future__ import annotations

import copy
import math
import random
import time
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext
from typing import TypeVar

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from dfkd.engine.seed import rng_state, set_rng_state

T = TypeVar("T")
Op = tuple[Callable[[], torch.Tensor], int]  # an operation to time, and its FLOPs

# the parts of the loop, as the summary's timers split it: the method's synthesis round (its generator steps), the
# student batches it generates, the student's forward (with the teacher's), backward and optimiser step
PARTS = ("generator_round", "student_batch", "student_step")

MATMUL_MAX = 2048  # the matrix product's largest side (M = N = K)
CONV_SHAPE = (64, 64, 32, 32)  # the convolution's largest batch, channels in = out, height, width (3x3, padding 1)
ENOUGH_SECONDS = 0.2  # an operation is grown (doubled) until one call takes this long, or reaches its largest size


def flops_of(fn: Callable[[], T]) -> tuple[T, int]:
    """``(fn(), the FLOPs it ran)`` counted by FlopCounterMode; slow: never inside a timed region."""
    with FlopCounterMode(display=False) as counter:
        result = fn()
    return result, int(counter.get_total_flops())


def matmul_flops(m: int, n: int, k: int) -> int:
    """An (m x k) @ (k x n) product: one multiply-add per output element and inner index."""
    return 2 * m * n * k


def conv2d_flops(batch: int, c_in: int, c_out: int, kernel: int, h_out: int, w_out: int) -> int:
    """A dense (ungrouped) 2-d convolution's forward, square kernel."""
    return 2 * c_in * c_out * kernel * kernel * h_out * w_out * batch


def snapshot(modules: Iterable[nn.Module], optimizers: Iterable[torch.optim.Optimizer], device: torch.device):
    """Record the modules' parameters and buffers (BN running statistics), train/eval flags and gradients, the
    optimisers' states and learning rates and the random generators (torch's on ``device`` and Python's); return a
    function that puts them all back, so that work done in between leaves no trace on the training trajectory."""
    modules, optimizers = list(modules), list(optimizers)
    states = [copy.deepcopy(m.state_dict()) for m in modules]
    flags = [[sub.training for sub in m.modules()] for m in modules]
    grads = [[None if p.grad is None else p.grad.detach().clone() for p in m.parameters()] for m in modules]
    opt_states = [copy.deepcopy(o.state_dict()) for o in optimizers]
    rng, py_rng = rng_state(device), random.getstate()

    def restore() -> None:
        for m, state, flag, grad in zip(modules, states, flags, grads):
            m.load_state_dict(state)
            for sub, training in zip(m.modules(), flag):
                sub.training = training
            for p, g in zip(m.parameters(), grad):
                p.grad = g
        for o, state in zip(optimizers, opt_states):
            o.load_state_dict(state)
        set_rng_state(rng, device)
        random.setstate(py_rng)

    return restore


def _best_seconds(fn: Callable[[], object], repeats: int, sync: Callable[[], None]) -> float:
    best = math.inf
    for _ in range(repeats):
        tick = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - tick)
    return best


def _grown(make: Callable[[int], Op], largest: int, smallest: int, sync) -> tuple[int, Op]:
    """The size (doubling from ``smallest``) at which one call of ``make(size)`` takes :data:`ENOUGH_SECONDS`, or
    ``largest``, with its operation; a slow precision (bf16 without hardware support) stops small instead of taking
    minutes."""
    size = min(smallest, largest)
    while True:
        op = make(size)
        op[0]()  # warm-up: allocation, kernel choice
        sync()
        if size >= largest or _best_seconds(op[0], 1, sync) >= ENOUGH_SECONDS:
            return size, op
        size = min(2 * size, largest)


def matmul_op(device: torch.device, size: int = MATMUL_MAX) -> Op:
    """A square fp32 matrix product of side ``size`` and its FLOPs, computed from its shape."""
    gen = torch.Generator().manual_seed(0)
    a, b = (torch.randn(size, size, generator=gen).to(device) for _ in range(2))
    return (lambda: a @ b), matmul_flops(size, size, size)


def conv_op(device: torch.device, channels_last: bool = False, batch: int = CONV_SHAPE[0]) -> Op:
    """The 3x3 convolution of :data:`CONV_SHAPE` at ``batch`` images (channels_last when asked) and its FLOPs."""
    gen = torch.Generator().manual_seed(0)
    _, channels, height, width = CONV_SHAPE
    conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False).to(device).requires_grad_(False)
    x = torch.randn(batch, channels, height, width, generator=gen).to(device)
    if channels_last:
        conv, x = conv.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    return (lambda: conv(x)), conv2d_flops(batch, channels, channels, 3, height, width)


def peak_ops(
    device: torch.device, channels_last: bool = False, matmul_size: int = MATMUL_MAX, conv_batch: int = CONV_SHAPE[0]
) -> dict[str, Op]:
    """The two operations the peak is measured on, each with its FLOPs: ``{"matmul": (fn, flops), "conv": (fn,
    flops)}``; the convolution in channels_last when ``channels_last``."""
    return {"matmul": matmul_op(device, matmul_size), "conv": conv_op(device, channels_last, conv_batch)}


def measure_peak(
    device: torch.device,
    autocast: Callable[[], AbstractContextManager] = nullcontext,
    channels_last: bool = False,
    repeats: int = 3,
    matmul_max: int = MATMUL_MAX,
    conv_max: int = CONV_SHAPE[0],
) -> dict:
    """This process's best rate, in GFLOP/s, on a square fp32 matrix product (sides up to ``matmul_max``) and a 3x3
    64->64 convolution on 32x32 images (batch up to ``conv_max``), each under ``autocast`` (the run's precision) and
    the convolution in the run's memory format; best of ``repeats`` calls after a warm-up. Each grows from a small
    size until one call takes :data:`ENOUGH_SECONDS` (what it ran at is recorded: ``matmul_size``, ``conv_batch``)."""
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    result: dict = {"threads": torch.get_num_threads()}
    with torch.no_grad(), autocast():
        size, matmul = _grown(lambda s: matmul_op(device, s), matmul_max, 128, sync)
        batch, conv = _grown(lambda n: conv_op(device, channels_last, n), conv_max, 2, sync)
        for name, (fn, flops) in (("matmul", matmul), ("conv", conv)):
            result[f"{name}_gflops_per_second"] = flops / _best_seconds(fn, repeats, sync) / 1e9
    result.update(matmul_size=size, conv_batch=batch)
    return result


def arithmetic(flops: dict[str, int], counts: dict[str, int], seconds: dict[str, float], peak: dict | None) -> dict:
    """Per part of :data:`PARTS` and for the whole loop: GFLOP of one item, the rate achieved (FLOPs of one item x
    how many the run did / the part's seconds), and that rate as a fraction of the measured matmul and conv peaks.
    ``flops``: of one item; ``counts``: how many the timed run did; ``seconds``: the part's timed total."""
    out: dict = {}
    total_flops, total_seconds = 0, 0.0
    for part in PARTS:
        work = flops[part] * counts[part]
        total_flops += work
        total_seconds += seconds[part]
        out[part] = _rates(flops[part] / 1e9, work, seconds[part], peak)
    out["loop"] = _rates(None, total_flops, total_seconds, peak)
    return out


def _rates(gflop: float | None, work: int, seconds: float, peak: dict | None) -> dict:
    rate = work / seconds / 1e9 if seconds > 0 else None
    row = {"gflop": gflop, "total_gflop": work / 1e9, "seconds": seconds, "gflops_per_second": rate}
    for op in ("matmul", "conv"):
        best = (peak or {}).get(f"{op}_gflops_per_second")
        row[f"of_{op}_peak"] = rate / best if rate is not None and best else None
    return row
