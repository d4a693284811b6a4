"""Golden values: every CuDFKD loss term, the self-paced weights, the lambda schedule, the adversarial ramp and both
loyalty metrics against values computed by the reference implementation's own functions
(tests/fixtures/cudfkd-reference-values.json, ljrprocc/DataFree @ bf3096b)."""

from __future__ import annotations

import math

import pytest
import torch

from dfkd import losses as L
from dfkd import metrics as M
from dfkd.methods.cudfkd import adv_weight, spl_lambda, spl_weight

TOL = 1e-9  # float64 inputs, float64 arithmetic
TOL32 = 1e-6  # values the reference computed in float32


@pytest.fixture(scope="module")
def io(reference_values):
    inputs = {k: torch.tensor(v, dtype=torch.float64) for k, v in reference_values["inputs"].items()}
    return inputs, reference_values["outputs"]


def close(value, expected, tol=TOL):
    value = torch.as_tensor(value, dtype=torch.float64)
    expected = torch.as_tensor(expected, dtype=torch.float64)
    assert value.shape == expected.shape
    assert torch.allclose(value, expected, atol=tol, rtol=0), (value, expected)


@pytest.mark.parametrize("T", [1, 4, 20])
def test_kldiv_batchmean(io, T):
    (x, out) = io
    close(L.kd_kl(x["student_logits"], x["teacher_logits"], T), out[f"kldiv_batchmean_T{T}"])


def test_kldiv_per_sample_rowsum(io):
    x, out = io
    close(L.kd_kl(x["student_logits"], x["teacher_logits"], 3, reduction="sample"), out["kldiv_none_T3_rowsum"])


def test_jsdiv_and_adversarial_js(io):
    x, out = io
    s, t = x["student_logits"], x["teacher_logits"]
    close(L.js_div(s, t, 3), out["jsdiv_T3_batchmean"])
    close(L.adv_js(s, t, 3), out["adv_js_T3"])


def test_masked_adversarial_kl(io):
    x, out = io
    s, t = x["student_logits"], x["teacher_logits"]
    close(L.agreement_mask(s, t), out["agree_mask"])
    close(L.adv_masked_kl(s, t, 3), out["adv_masked_kl_T3"])


def test_masked_adversarial_gradient_flows_through_both_players(io):
    x, _ = io
    s = x["student_logits"].clone().requires_grad_()
    t = x["teacher_logits"].clone().requires_grad_()
    L.adv_masked_kl(s, t, 3).backward()
    masked_rows = L.agreement_mask(s, t) == 0
    assert s.grad.abs().sum() > 0 and t.grad.abs().sum() > 0
    assert s.grad[masked_rows].abs().sum() == 0  # disagreeing samples exert no pressure


@pytest.mark.parametrize("T", [1, 20])
def test_batch_entropy(io, T):
    x, out = io
    close(L.batch_entropy(x["teacher_logits"], T), out[f"batch_entropy_T{T}"])


def test_batch_entropy_of_saturated_logits_is_finite_with_finite_gradients():
    # logits like an untrained teacher's on synthetic images: every class but one underflows to probability 0
    t = torch.tensor([[7.4e7, -2.0e7, 3.3e7], [-6.6e7, 3.9e7, 2.2e7]], requires_grad=True)
    entropy = L.batch_entropy(t, 1.0)
    entropy.backward()
    assert entropy.item() == pytest.approx(math.log(2))  # two classes at 1/2 each, the third exactly 0
    assert torch.isfinite(t.grad).all()


def test_onehot_balance_l1_tv_bn(io):
    x, out = io
    close(L.onehot_ce(x["teacher_logits"]), out["onehot_ce_argmax"])
    close(L.class_balance(x["teacher_logits"]), out["class_balance"])
    close(L.kd_l1(x["student_logits"], x["teacher_logits"]), out["l1_logits_mean"])
    close(L.tv_l1(x["images_2x3x8x8"]), out["tv_l1_4dirs"])
    close(L.bn_stat_loss(x["bn_input_5x4x3x3"], x["bn_running_mean"], x["bn_running_var"]), out["bn_stat_loss"])


def test_bn_hooks_sum_layers_and_only_capture_when_asked(io):
    x, out = io
    bn = torch.nn.BatchNorm2d(4).double().eval()
    bn.running_mean.copy_(x["bn_running_mean"])
    bn.running_var.copy_(x["bn_running_var"])
    model = torch.nn.Sequential(bn, torch.nn.Identity())
    hooks = L.BNStatsHooks(model)
    model(x["bn_input_5x4x3x3"])  # outside capture: nothing recorded
    with pytest.raises(RuntimeError):
        hooks.loss()
    with hooks.capture():
        model(x["bn_input_5x4x3x3"])
    close(hooks.loss(), out["bn_stat_loss"])
    hooks.remove()


def _one_channel_bn(mean: float, var: float) -> torch.nn.Module:
    bn = torch.nn.BatchNorm2d(1).double().eval()
    bn.running_mean.fill_(mean)
    bn.running_var.fill_(var)
    return torch.nn.Sequential(bn)


def test_bn_momentum_loss_by_hand_over_three_rounds():
    # running mean 0, var 1; batches [1, 3] (mean 2, var 1), [0, 0] (mean 0, var 0), [1, 3]; momentum 0.9
    model = _one_channel_bn(0.0, 1.0)
    stats = L.MomentumBNStats(model, 0.9).double()
    batches = [[1.0, 3.0], [0.0, 0.0], [1.0, 3.0]]
    # round 1, no average yet: |1 - 1| + |0 - 2| = 2; the average becomes (mean 2, var 1)
    # round 2: blended var 0.1*0 + 0.9*1 = 0.9, mean 0.9*2 = 1.8: |1 - 0.9| + |1.8| = 1.9; average (1.8, 0.9)
    # round 3: var 0.1*1 + 0.9*0.9 = 0.91, mean 0.1*2 + 0.9*1.8 = 1.82: 0.09 + 1.82 = 1.91
    expected = [2.0, 1.9, 1.91]
    for values, loss in zip(batches, expected):
        with stats.capture():
            model(torch.tensor(values, dtype=torch.float64).view(2, 1, 1, 1))
        close(stats.loss(), loss, 1e-12)
        stats.update()
    close(stats.mean_0, [0.9 * 1.8 + 0.1 * 2], 1e-12)
    close(stats.var_0, [0.9 * 0.9 + 0.1 * 1], 1e-12)
    stats.remove()


def test_bn_momentum_loss_without_an_average_is_the_plain_bn_loss(io):
    x, out = io
    m = torch.tensor(0.0, dtype=torch.float64)
    mean, var = x["bn_input_5x4x3x3"].mean(dim=(0, 2, 3)), x["bn_input_5x4x3x3"].var(dim=(0, 2, 3), unbiased=False)
    junk = torch.full_like(mean, 7.0)
    loss = L.bn_momentum_loss(mean, var, x["bn_running_mean"], x["bn_running_var"], junk, junk, m)
    close(loss, out["bn_stat_loss"])


def test_bn_momentum_average_is_state_and_survives_a_checkpoint():
    model = _one_channel_bn(0.0, 1.0)
    stats = L.MomentumBNStats(model, 0.5).double()
    with stats.capture():
        model(torch.tensor([1.0, 3.0], dtype=torch.float64).view(2, 1, 1, 1))
    stats.loss()
    stats.update()
    state = stats.state_dict()
    assert set(state) == {"mean_0", "var_0", "initialised"} and bool(state["initialised"])
    restored = L.MomentumBNStats(model, 0.5).double()
    restored.load_state_dict(state)
    x = torch.tensor([0.0, 0.0], dtype=torch.float64).view(2, 1, 1, 1)
    losses = []
    for hooks in (stats, restored):
        with hooks.capture():
            model(x)
        losses.append(hooks.loss())
    close(losses[0], losses[1], 0.0)
    with pytest.raises(ValueError, match="momentum"):
        L.MomentumBNStats(model, 1.0)


@pytest.mark.parametrize("lam", [1, 2, 12])
@pytest.mark.parametrize("kind", ["hard", "soft", "log"])
def test_self_paced_weights(io, kind, lam):
    x, out = io
    tol = TOL32 if kind == "soft" else TOL
    close(spl_weight(x["spl_losses"], float(lam), kind), out[f"spl_{kind}_lambda{lam}_v"], tol)


def test_self_paced_none_is_one(io):
    x, _ = io
    assert torch.equal(spl_weight(x["spl_losses"], 2.0, "none"), torch.ones_like(x["spl_losses"]))


def test_lambda_schedule(io):
    _, out = io
    for key, expected in out["lambda_schedule"].items():
        lambda_0, slope, step = key.split(",")
        close(spl_lambda(int(step), float(lambda_0), float(slope)), expected)


@pytest.mark.parametrize("name", ["adv_ramp_c10_r34_r18", "adv_ramp_c10_wrn402_wrn161", "adv_ramp_c100_r34_r18"])
def test_adversarial_ramp(io, name):
    _, out = io
    epochs, begin, end, grad, adv0 = out[name]["E,b,f,g,adv0"]
    for epoch, expected in out[name]["during_epoch"].items():
        close(adv_weight(int(epoch), int(epochs), adv0, grad, begin, end), expected)


def test_probability_loyalty_both_forms(io):
    x, out = io
    s, t = x["student_logits"], x["teacher_logits"]
    close(M.prob_loyalty(s, t), out["prob_loyalty_single_root"])
    # the reference fed float32 logits to this one
    close(M.prob_loyalty_reference(s.float(), t.float()), out["prob_loyalty_reference_double_root"], TOL32)
    close(M.agreement_percent(s, t), out["agreement_percent"])


def test_losses_upcast_half_precision():
    s = torch.randn(4, 10).bfloat16()
    assert L.kd_kl(s, s.flip(0), 4).dtype == torch.float32
    assert L.bn_stat_loss(torch.randn(4, 3, 2, 2).bfloat16(), torch.zeros(3), torch.ones(3)).dtype == torch.float32


def test_bn_stat_loss_of_a_bf16_input_matches_fp32_without_keeping_an_fp32_copy():
    torch.manual_seed(0)
    x32 = (torch.randn(64, 8, 6, 6) * 1.5 + 0.4).requires_grad_()
    x16 = x32.detach().bfloat16().requires_grad_()
    mean, var = torch.full((8,), 0.1), torch.full((8,), 2.0)
    loss32, loss16 = L.bn_stat_loss(x32, mean, var), L.bn_stat_loss(x16, mean, var)
    assert loss16.dtype == torch.float32
    assert abs(loss16.item() - loss32.item()) <= 0.01 * loss32.item()  # bf16 inputs, statistics rounded once
    (grad32,) = torch.autograd.grad(loss32, x32)
    (grad16,) = torch.autograd.grad(loss16, x16)
    assert grad16.dtype == torch.bfloat16
    assert torch.nn.functional.cosine_similarity(grad16.float().flatten(), grad32.flatten(), dim=0) > 0.99

    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        L.bn_stat_loss(x16, mean, var)
    assert saved and all(t.dtype != torch.float32 or t.numel() <= 8 for t in saved)  # no fp32 copy of x


def test_accuracy_curve_stats_window():
    stats = M.accuracy_curve_stats([10.0, 20.0, 30.0, 40.0], start=2)
    assert stats["best"] == 40.0 and stats["mu"] == 35.0 and stats["var"] == 25.0
    empty = M.accuracy_curve_stats([10.0, 20.0], start=80)
    assert empty["mu"] is None and empty["var"] is None and empty["best"] == 20.0
