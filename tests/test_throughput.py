"""The loop's arithmetic: FLOPs counted per part in an untimed pass that leaves the run as it was, the rates they
give, and the machine peak they are compared with (engine.count_flops, `dfkd bench throughput`)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import TINY_DISTILL
from torch import nn

import dfkd
from dfkd import load_config
from dfkd.commands.bench import tiny_distill_overrides
from dfkd.commands.throughput import run_throughput
from dfkd.engine.flops import PARTS, arithmetic, conv2d_flops, flops_of, matmul_flops, measure_peak, peak_ops

RECIPE = "fashion-mnist/{}-lenet5_bn-lenet5_half"


def test_golden_flops_of_a_linear_and_a_conv():
    x = torch.randn(4, 16)
    linear = nn.Linear(16, 8)
    assert flops_of(lambda: linear(x))[1] == 2 * 4 * 16 * 8 == matmul_flops(4, 8, 16) == 1024
    # backward: the gradients of the input and of the weight, one product each as large as the forward's
    assert flops_of(lambda: linear(x.requires_grad_()).sum().backward())[1] == 3 * 1024
    conv = nn.Conv2d(3, 5, 3, padding=1)
    images = torch.randn(2, 3, 8, 8)
    assert flops_of(lambda: conv(images))[1] == 2 * 3 * 5 * 9 * 8 * 8 * 2 == conv2d_flops(2, 3, 5, 3, 8, 8) == 34560
    assert flops_of(lambda: torch.relu(images))[1] == 0  # element-wise work counts nothing


@pytest.mark.parametrize("channels_last", [False, True])
def test_the_peak_operations_flops_are_what_the_counter_counts(channels_last):
    for name, (fn, flops) in peak_ops(torch.device("cpu"), channels_last, matmul_size=64, conv_batch=2).items():
        assert flops_of(fn)[1] == flops, name
    assert peak_ops(torch.device("cpu"), matmul_size=64)["matmul"][1] == 2 * 64**3


@pytest.mark.parametrize("bf16", [False, True])
def test_measure_peak_gives_positive_finite_rates(bf16):
    def autocast():
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)

    peak = measure_peak(torch.device("cpu"), autocast, channels_last=bf16, repeats=1, matmul_max=128, conv_max=2)
    for key in ("matmul_gflops_per_second", "conv_gflops_per_second"):
        assert math.isfinite(peak[key]) and peak[key] > 0, (key, peak)
    assert peak["threads"] == torch.get_num_threads()
    assert peak["matmul_size"] == 128 and peak["conv_batch"] == 2


def test_arithmetic_divides_the_work_by_the_time():
    flops = {"generator_round": 4_000_000_000, "student_batch": 1_000_000_000, "student_step": 2_000_000_000}
    counts = {"generator_round": 2, "student_batch": 6, "student_step": 6}
    seconds = {"generator_round": 4.0, "student_batch": 2.0, "student_step": 6.0}
    out = arithmetic(flops, counts, seconds, {"matmul_gflops_per_second": 10.0, "conv_gflops_per_second": 4.0})
    assert out["generator_round"]["gflop"] == 4.0 and out["generator_round"]["gflops_per_second"] == 2.0
    assert out["student_batch"]["gflops_per_second"] == 3.0 and out["student_step"]["gflops_per_second"] == 2.0
    assert out["loop"]["total_gflop"] == 8 + 6 + 12 and out["loop"]["gflops_per_second"] == 26 / 12
    assert out["student_batch"]["of_matmul_peak"] == 0.3 and out["student_batch"]["of_conv_peak"] == 0.75
    assert arithmetic(flops, counts, dict.fromkeys(PARTS, 0.0), None)["loop"]["gflops_per_second"] is None


def _last_weights(run):
    ckpt = torch.load(run / "ckpt" / "last.pt", weights_only=True)
    return ckpt["state_dict"], ckpt["method"], ckpt["optimizer"]["state"], ckpt["method_state"]


def _same(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if torch.is_tensor(a):
        return torch.equal(a, b)
    return a == b


# a generator method, a pool method with optimiser states outside its modules, one with BN moving averages, and the
# student's moving average; all with a learning-rate warm-up the counted step must not advance
@pytest.mark.parametrize(
    "method,extra",
    [("cudfkd", ["train.ema_decay=0.9"]), ("cmi", []), ("fastdfkd", []), ("dfad", ["train.warmup_steps=3"])],
)
def test_counting_flops_leaves_the_training_trajectory_as_it_was(data_root, teacher_run, tmp_path, method, extra):
    weights = []
    for count in ("false", "true"):
        out = tmp_path / count
        overrides = [f"data.root={data_root}", f"teacher.weights={teacher_run}", f"out={out}", *TINY_DISTILL]
        overrides += ["train.epochs=2", "engine.sample_every=0", f"engine.count_flops={count}", *extra]
        recipe = RECIPE.format(method)
        summary = dfkd.distill(load_config("distill", recipe, tiny_distill_overrides(recipe, overrides)))
        weights.append(_last_weights(out))
        assert ("flops" in summary) == (count == "true")
    assert _same(weights[0], weights[1])
    flops = summary["flops"]
    assert flops["generator_round"] > 0 and flops["student_step"] > 0, flops
    # a generator makes each student batch; a pool method samples its batches from stored images: no arithmetic
    assert (flops["student_batch"] > 0) == (method in ("cudfkd", "dfad")), flops


def test_throughput_reports_the_arithmetic_of_every_part(data_root, tmp_path):
    tiny = [o for o in TINY_DISTILL if not o.startswith("train.rounds_per_epoch=")]
    table = run_throughput(
        tmp_path, RECIPE.format("cudfkd"), ["fp32", "bf16-cl"], rounds=2, overrides=[f"data.root={data_root}", *tiny]
    )
    numbers = json.loads((tmp_path / "throughput.json").read_text())
    for name, s in numbers.items():
        flops, rates, peak = s["flops"], s["arithmetic"], s["peak"]
        assert list(flops) == list(PARTS) and all(v > 0 for v in flops.values()), flops
        assert rates["counts"] == {"generator_round": 2, "student_batch": 4, "student_step": 4}
        seconds = s["synth_seconds"] + s["student_seconds"]
        work = sum(flops[part] * rates["counts"][part] for part in PARTS)
        assert rates["loop"]["gflops_per_second"] == pytest.approx(work / seconds / 1e9)
        assert rates["student_batch"]["gflops_per_second"] == pytest.approx(
            flops["student_batch"] * 4 / s["batch_seconds"] / 1e9
        )
        for part in (*PARTS, "loop"):
            for op in ("matmul", "conv"):
                achieved, best = rates[part]["gflops_per_second"], peak[f"{op}_gflops_per_second"]
                assert rates[part][f"of_{op}_peak"] == pytest.approx(achieved / best), (name, part, op)
        assert math.isfinite(peak["matmul_gflops_per_second"]) and peak["conv_gflops_per_second"] > 0
    # the same work in fp32 and bf16: FlopCounterMode counts operations, not their precision
    assert numbers["fp32"]["flops"] == numbers["bf16-cl"]["flops"]
    assert "### Arithmetic" in table and "| fp32 |" in table.split("### Arithmetic")[1]
    assert "Peak of this machine" in table and "bf16-cl" in table.split("Peak of this machine")[1]
