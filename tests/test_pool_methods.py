"""DeepInversion, CMI, MB-DFKD and PRE-DFKD beyond the generic contract: golden priors and losses, which iterate
DeepInversion pools, CMI's per-round re-initialisation, and how the replay methods mix memory into student batches."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from test_methods import INFO, TinyNet, make_teacher, tiny_config

from dfkd.data import to_uint8
from dfkd.engine.env import Env
from dfkd.losses import tv_l1, tv_l2
from dfkd.losses.replay import balance_log10, js_competition, latent_prior_loss, vae_loss
from dfkd.methods import METHODS, Batch, Ctx, Progress
from dfkd.methods.deepinv import jitter_and_flip
from dfkd.models import Normalized


def close(a, b, tol=1e-6):
    assert abs(float(a) - float(b)) < tol, (float(a), float(b))


def build(name: str, batch_size: int = 8, **overrides):
    torch.manual_seed(0)
    student = Normalized(TinyNet(4), INFO.mean, INFO.std)
    ctx = Ctx(make_teacher(), student, INFO, Env(torch.device("cpu")), batch_size=batch_size)
    cfg = dataclasses.replace(tiny_config(name), **{"g_steps": 1, **overrides})
    return METHODS.get(name)(cfg, ctx)


# -- golden values ---------------------------------------------------------------------------------------------------

X_2x2 = torch.tensor([[[[0.0, 1.0], [2.0, 3.0]]]])  # differences: horizontal -1, vertical -2, diagonals 1 and -3


def test_tv_priors_golden():
    close(tv_l1(X_2x2), 1 + 2 + 1 + 3)  # CMI benchmark: sum over 4 directions of mean |d|
    close(tv_l2(X_2x2), math.sqrt(2) + math.sqrt(8) + 1 + 3)  # official DeepInversion: sum of L2 norms


def test_vae_loss_golden():
    x_rec, x = torch.tensor([[0.5, 1.0]]), torch.zeros(1, 2)
    t_rec, t = torch.tensor([[1.0, 2.0]]), torch.zeros(1, 2)
    mu, logvar = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, math.log(2.0)]])
    # L1 0.75 + L1 1.5 + KLD -0.5 * ((1 + 0 - 1 - 1) + (1 + ln 2 - 0 - 2)) = 1 - ln(2) / 2
    kld = 1 - math.log(2) / 2
    out = vae_loss(x_rec, x, t_rec, t, mu, logvar, kld_weight=1.0)
    close(out["rec_image"], 0.75), close(out["rec_logits"], 1.5), close(out["kld"], kld)
    close(out["loss"], 0.75 + 1.5 + kld)
    close(vae_loss(x_rec, x, t_rec, t, mu, logvar)["loss"], 2.25 + 1e-5 * kld)  # the reference's weight


def test_vae_loss_detaches_its_targets():
    x_rec, x = torch.rand(3, 4, requires_grad=True), torch.rand(3, 4, requires_grad=True)
    t_rec, t = torch.randn(3, 5, requires_grad=True), torch.randn(3, 5, requires_grad=True)
    vae_loss(x_rec, x, t_rec, t, torch.randn(3, 2), torch.randn(3, 2))["loss"].backward()
    assert x.grad is None and t.grad is None and x_rec.grad is not None and t_rec.grad is not None


def test_replay_terms_golden():
    t = torch.log(torch.tensor([[0.5, 0.5], [0.9, 0.1]]))  # batch-mean softmax (0.7, 0.3)
    close(balance_log10(t), 0.7 * math.log10(0.7) + 0.3 * math.log10(0.3))
    close(latent_prior_loss(torch.tensor([[1.0, 0.0], [-1.0, 2.0]])), ((2 - 1) ** 2 + (2 - 1) ** 2) / 2 + (0 + 1) / 2)
    close(js_competition(t, t), 1.0)  # no disagreement


def test_js_competition_matches_the_reference_formula():
    torch.manual_seed(1)
    s, t = torch.randn(6, 5), torch.randn(6, 5)
    p, q = F.softmax(t / 3, dim=1), F.softmax(s / 3, dim=1)
    m = (0.5 * (p + q)).clamp(0.01, 0.99)
    p, q = p.clamp(0.01, 0.99), q.clamp(0.01, 0.99)
    # the reference's nn.KLDivLoss() default reduction: the mean over batch and classes
    js = 0.5 * (m * (m.log() - p.log())).mean() + 0.5 * (m * (m.log() - q.log())).mean()
    close(js_competition(s, t), 1 - js.clamp(0, 1))


# -- DeepInversion ---------------------------------------------------------------------------------------------------


def test_jitter_and_flip_is_one_roll_and_flip_for_the_whole_batch():
    torch.manual_seed(0)
    x = torch.arange(2 * 3 * 16 * 16, dtype=torch.float32).view(2, 3, 16, 16).requires_grad_()
    shifts, flips = set(), set()
    for _ in range(200):
        out = jitter_and_flip(x, 1 / 8, flip=True)
        match = [
            (dy, dx, f)
            for dy in range(-2, 3)
            for dx in range(-2, 3)
            for f in (False, True)
            if torch.equal(out, (lambda r: r.flip(3) if f else r)(torch.roll(x, (dy, dx), (2, 3))))
        ]
        assert len(match) == 1  # the same transform for every image, offsets within H/8 and W/8
        shifts.add(match[0][:2])
        flips.add(match[0][2])
    assert len(shifts) == 25 and flips == {False, True}
    jitter_and_flip(x, 1 / 8).sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))
    assert all(not torch.equal(jitter_and_flip(x, 1 / 8, flip=False), x.flip(3)) for _ in range(20))


def record_deepinv_iterates(method):
    """Wrap the inversion objective and the clamp to record (evaluated iterate, loss) pairs and the final pixels."""
    evaluated, clamped = [], []
    objective, clamp = method.inversion_loss, method._clamp_

    def inversion_loss(v, y):
        out = objective(v, y)
        evaluated.append((v.detach().clone(), out["loss"].item()))
        return out

    def clamp_(v):
        clamp(v)
        clamped.append(v.detach().clone())

    method.inversion_loss, method._clamp_ = inversion_loss, clamp_
    return evaluated, clamped


def pooled_as(method, v):
    return to_uint8(v * method.std + method.mean)


@pytest.mark.parametrize("which", ["last", "best"])
def test_deepinversion_pools_the_last_iterate_by_default_and_the_best_on_request(which):
    method = build("deepinv", pool_iterate=which, g_steps=8, lr_g=2.0, adv=1.0)  # a large step: the loss oscillates
    evaluated, clamped = record_deepinv_iterates(method)
    method.synthesize(Progress(0, 0, 0, 1, 1, 1))
    best_v, _ = min(evaluated, key=lambda pair: pair[1])
    assert not torch.equal(pooled_as(method, best_v), pooled_as(method, clamped[-1]))  # the two options differ here
    expected = clamped[-1] if which == "last" else best_v
    assert torch.equal(method.pool.rows(), pooled_as(method, expected))
    assert method.images_synthesized == 8 and len(method.pool) == 8


def test_deepinversion_keeps_pixels_in_the_valid_image_range():
    method = build("deepinv", g_steps=3, lr_g=5.0)
    _, clamped = record_deepinv_iterates(method)
    method.synthesize(Progress(0, 0, 0, 1, 1, 1))
    images = clamped[-1] * method.std + method.mean
    assert images.min() >= -1e-6 and images.max() <= 1 + 1e-6


# -- CMI -------------------------------------------------------------------------------------------------------------


def test_cmi_reinitialises_generator_and_latent_every_round_and_keeps_the_head():
    method = build("cmi", g_steps=2)
    calls = []
    method.generator.register_forward_pre_hook(
        lambda module, args: calls.append((args[0].detach().clone(), [p.detach().clone() for p in module.parameters()]))
    )
    method.synthesize(Progress(0, 0, 0, 1, 2, 1))
    end_of_round = [p.detach().clone() for p in method.generator.parameters()]
    head = [p.detach().clone() for p in method.head.parameters()]
    method.synthesize(Progress(0, 1, 1, 1, 2, 1))
    (z1, first1), (z1b, _), (z2, first2), _ = calls
    assert not torch.equal(z1, z1b)  # z is optimised within a round
    assert not torch.allclose(z1, z2)  # a new latent per round
    assert all(not torch.equal(a, b) for a, b in zip(end_of_round, first2))  # trained weights are thrown away
    weights = [(a, b) for a, b in zip(first1, first2) if a.dim() > 1]
    assert all(not torch.equal(a, b) for a, b in weights)  # ... for a fresh random init
    conv_weights = [w for w in first2 if w.dim() == 4]
    assert all(abs(float(w.std()) - 0.02) < 0.01 for w in conv_weights)  # reset_model: N(0, 0.02)
    assert any(not torch.equal(a, b) for a, b in zip(head, method.head.parameters()))  # the head keeps training
    assert len(method.pool) == 16 and len(method.bank) == 16 and method.bank.row_shape == (2 * (8 + 16),)


def test_cmi_hooks_named_layers():
    method = build("cmi", feature_layers=["features.5"])  # the second BatchNorm2d of TinyNet: 16 channels
    assert method.bank.row_shape == (32,)
    method.close()
    with pytest.raises(Exception, match="features.9"):
        build("cmi", feature_layers=["features.9"])


def test_cmi_contrastive_reduction_option_changes_the_loss():
    logs = {}
    for reduction in ("split", "mean"):
        method = build("cmi", g_steps=1, cr_reduction=reduction)
        method.synthesize(Progress(0, 0, 0, 1, 2, 1))  # fills the bank
        logs[reduction] = method.synthesize(Progress(0, 1, 1, 1, 2, 1))["loss_cr"]
        method.close()
    assert logs["split"] > logs["mean"]  # with cached rows, split = mean(current) + mean(cached)


# -- MB-DFKD and PRE-DFKD --------------------------------------------------------------------------------------------


def run_epoch(method, epoch: int, rounds: int = 2, kd_steps: int = 2):
    batches = []
    for r in range(rounds):
        prog = Progress(epoch, r, (epoch * rounds + r) * kd_steps, 4, rounds, kd_steps)
        method.synthesize(prog)
        for _ in range(kd_steps):
            batches.append(method.next_batch(prog).x)
            prog.step += 1
    return batches


def test_mb_dfkd_pushes_memory_pushes_times_per_run_and_mixes_the_memory_into_student_batches():
    # 4 epochs x 2 rounds and memory_pushes=2: a push at the end of every 4th round, i.e. after epochs 1 and 3
    method = build("mb_dfkd", replay_batch_size=3, memory_size=3, memory_pushes=2)
    epoch0 = run_epoch(method, 0)
    assert all(len(x) == 8 for x in epoch0) and len(method.memory) == 0  # empty memory: the novel batch alone
    epoch1 = run_epoch(method, 1)
    assert all(len(x) == 8 for x in epoch1)
    assert len(method.memory) == 3 and torch.equal(method.memory.rows(), to_uint8(epoch1[-1][:3]))
    epoch2 = run_epoch(method, 2)
    assert all(len(x) == 8 + 3 for x in epoch2)  # B novel + replay_batch_size replayed
    stored = {tuple(img.flatten().tolist()) for img in to_uint8(epoch1[-1][:3])}
    assert all(tuple(img.flatten().tolist()) in stored for x in epoch2 for img in to_uint8(x[8:]))
    assert len(method.memory) == 3  # no push in epoch 2
    epoch3 = run_epoch(method, 3)
    assert torch.equal(method.memory.rows(), to_uint8(epoch3[-1][:3]))  # bounded: the latest push replaced the first
    prog = Progress(3, 1, 15, 4, 2, 2)
    loss = method.student_loss(method.next_batch(prog), method.ctx.student, prog)["loss"]
    assert torch.isfinite(loss)


def test_mb_dfkd_memory_pushes_scale_with_the_run_length():
    method = build("mb_dfkd", replay_batch_size=1, memory_size=100, memory_pushes=80)
    assert method.push_interval(Progress(0, 0, 0, 400, 36, 10)) == 180  # the reference: every 5 epochs of 36 rounds
    assert method.push_interval(Progress(0, 0, 0, 10, 40, 10)) == 5  # a 10-epoch run still pushes 80 times
    assert method.push_interval(Progress(0, 0, 0, 1, 4, 10)) == 1  # shorter runs push after every round


def test_pre_dfkd_replays_every_step_and_trains_its_memory_on_the_first_steps_of_each_round():
    method = build("pre_dfkd", replay_batch_size=2, memory_steps=1, g_steps=1)
    encoder_inputs = []
    method.memory.encoder.register_forward_pre_hook(lambda module, args: encoder_inputs.append(args[0].shape[0]))
    snapshots = [[p.detach().clone() for p in method.memory.parameters()]]
    batches = []
    for r in range(2):
        prog = Progress(0, r, r * 2, 1, 2, 2)
        method.synthesize(prog)
        for _ in range(2):
            batches.append(method.next_batch(prog).x)
            snapshots.append([p.detach().clone() for p in method.memory.parameters()])
            prog.step += 1
    assert all(len(x) == 8 + 2 for x in batches)  # B novel + B/8-style pseudo-replay, from the very first step
    changed = [any(not torch.equal(a, b) for a, b in zip(s0, s1)) for s0, s1 in zip(snapshots, snapshots[1:])]
    assert changed == [True, False, True, False]  # memory_steps=1: only the first student step of each round
    assert encoder_inputs == [4, 4 + 2]  # the first round sees half a novel batch, later rounds add replayed images
    out = method.student_loss(Batch(x=batches[-1]), method.ctx.student, prog)  # after a step that trained the memory
    assert set(out) >= {"loss", "memory/loss", "memory/kld"} and all(torch.isfinite(v) for v in out.values())
    assert set(method.student_loss(Batch(x=batches[-1]), method.ctx.student, prog)) == {"loss"}
    assert method.images_synthesized == 2 * 8 + 4 * (8 + 2)  # 2 generator steps (synth 8) + 4 student batches


def test_cmi_default_feature_layers_follow_the_reference_rule():
    from dfkd.methods.cmi import feature_modules
    from dfkd.models import create_model

    resnet = create_model("resnet18", 10, 3)
    assert feature_modules(Normalized(resnet, INFO.mean, INFO.std), []) == [
        resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4
    ]  # fmt: skip
    tiny = make_teacher()
    assert feature_modules(tiny, []) == [m for m in tiny.modules() if isinstance(m, torch.nn.BatchNorm2d)]
