"""FastDFKD: the meta-gradient (first-order MAML sums the K inner gradients), Reptile, the non-meta variant, the
first-layer restart, the adversarial start and the momentum BN statistics, on tiny networks."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from test_methods import INFO, TinyNet, make_teacher, tiny_config
from torch import nn

from dfkd.engine.env import Env
from dfkd.methods import Ctx, Progress, fastdfkd
from dfkd.methods.fastdfkd import FastDFKD, accumulate_meta_grad, reptile_grad, reset_first_layers
from dfkd.models import Normalized


def build(**overrides) -> FastDFKD:
    torch.manual_seed(0)
    cfg = dataclasses.replace(tiny_config("fastdfkd"), **overrides)
    student = Normalized(TinyNet(4), INFO.mean, INFO.std)
    return FastDFKD(cfg, Ctx(make_teacher(), student, INFO, Env(torch.device("cpu")), batch_size=8))


def prog(synthesis_round: int, warmup_epochs: int = 2, rounds: int = 2) -> Progress:
    epoch, rnd = divmod(synthesis_round, rounds)
    return Progress(epoch - warmup_epochs, rnd, 0, 3, rounds, 2, warmup_epochs)


def test_meta_gradient_helpers_by_hand():
    meta, fast = nn.Linear(2, 1), nn.Linear(2, 1)
    with torch.no_grad():
        meta.weight.copy_(torch.tensor([[1.0, 2.0]]))
        meta.bias.fill_(0.5)
        fast.weight.copy_(torch.tensor([[1.5, 1.0]]))
        fast.bias.fill_(0.0)
    for k, g in enumerate((1.0, 2.0, 4.0)):
        fast.weight.grad, fast.bias.grad = torch.full((1, 2), g), torch.tensor([g])
        accumulate_meta_grad(meta, fast, first=k == 0)
    assert torch.equal(meta.weight.grad, torch.full((1, 2), 7.0)) and meta.bias.grad.item() == 7.0
    accumulate_meta_grad(meta, fast, first=True)  # a new round starts the sum again
    assert meta.bias.grad.item() == 4.0
    reptile_grad(meta, fast, 2.0)  # 2 * (theta - theta')
    assert torch.equal(meta.weight.grad, torch.tensor([[-1.0, 2.0]])) and meta.bias.grad.item() == 1.0


def test_fomaml_steps_theta_with_the_sum_of_the_inner_gradients():
    method = build(g_steps=3, meta="fomaml", adv=0.0)
    seen: dict[int, list[torch.Tensor]] = {}
    for i, p in enumerate(method.fast_generator.parameters()):
        p.register_hook(lambda g, i=i: seen.setdefault(i, []).append(g.detach().clone()))
    method.synthesize(prog(0))
    assert method.opt_meta.param_groups[0]["lr"] == pytest.approx(3 * method.cfg.lr_g)
    for i, p in enumerate(method.generator.parameters()):
        assert len(seen[i]) == 3
        # Adam's first moment after one step is (1 - beta1) * gradient
        expected = (1 - method.cfg.betas_g[0]) * torch.stack(seen[i]).sum(0)
        assert torch.allclose(method.opt_meta.state[p]["exp_avg"], expected, atol=1e-7, rtol=1e-5), i


def test_each_round_starts_from_the_meta_generator_and_only_fomaml_leaves_theta_apart():
    method = build(meta="fomaml")
    before = [p.detach().clone() for p in method.generator.parameters()]
    method.synthesize(prog(0))
    moved = [p for p, b in zip(method.generator.parameters(), before) if not torch.equal(p, b)]
    assert moved, "the meta step did not move theta"
    assert any(not torch.equal(a, b) for a, b in zip(method.generator.parameters(), method.fast_generator.parameters()))

    plain = build(meta="none")
    plain.synthesize(prog(0))
    for a, b in zip(plain.generator.state_dict().values(), plain.fast_generator.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-7)  # theta <- theta'_K, buffers included


def test_reptile_moves_theta_toward_the_adapted_weights():
    method = build(meta="reptile", g_steps=3)
    before = [p.detach().clone() for p in method.generator.parameters()]
    method.synthesize(prog(0))
    for p, b, q in zip(method.generator.parameters(), before, method.fast_generator.parameters()):
        direction, step = q.detach() - b, p.detach() - b
        large = direction.abs() > 1e-4
        # Adam's first step is lr * sign of -grad = sign(theta' - theta)
        assert torch.equal(torch.sign(step[large]), torch.sign(direction[large]))


def test_first_layers_restart_once_after_the_warm_up(monkeypatch):
    method = build(reset_l0_after=2)
    generator = method.generator
    calls = []
    monkeypatch.setattr(
        fastdfkd, "reset_first_layers", lambda module: (calls.append(module), reset_first_layers(module))
    )
    for r in range(8):  # 2 warm-up epochs of 2 rounds: the restart comes at round 4 + 2 - 1 = 5
        method.synthesize(prog(r))
        assert len(calls) == (1 if r >= 5 else 0)
    monkeypatch.undo()
    assert calls == [generator]
    reset_first_layers(generator)
    bn = generator.get_submodule("conv_blocks.0")
    assert bn.bias.abs().sum() == 0 and generator.get_submodule("l1.0").bias.abs().sum() == 0
    assert bn.weight.abs().max() < 0.2  # N(0, 0.02): the reference restarts the BN scale near 0


@pytest.mark.parametrize("early, first_round", [(1, 3), (0, 4)])
def test_the_adversarial_term_starts_relative_to_the_first_student_step(early, first_round):
    method = build(adv_early_rounds=early, adv=1.0)
    on = [method.adversarial_on(prog(r)) for r in range(6)]  # 2 warm-up epochs x 2 rounds: students from round 4
    assert on == [r >= first_round for r in range(6)]
    assert not build(adv=0.0).adversarial_on(prog(5))


def test_momentum_statistics_start_after_the_first_round_and_the_pool_grows():
    method = build()
    assert not bool(method.bn_stats.initialised)
    logs = method.synthesize(prog(0))
    assert bool(method.bn_stats.initialised)
    assert logs["pool_size"] == method.synthesis_batch_size == len(method.pool)
    method.synthesize(prog(1))
    assert len(method.pool) == 2 * method.synthesis_batch_size
    assert {"bn_stats.initialised", "bn_stats.mean_0"} <= set(method.state_dict())
    method.close()
