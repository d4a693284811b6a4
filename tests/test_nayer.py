"""NAYER beyond the generic contract: the label layout, the generator's lifetime rule, the noisy-layer generator, the
label-embedding tables, and what one round does during and after the synthesis warm-up."""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import pytest
import torch
from test_methods import INFO, TinyNet, make_teacher, tiny_config

from dfkd.engine.env import Env
from dfkd.errors import ConfigError
from dfkd.methods import METHODS, Ctx, Progress
from dfkd.methods.nayer import NAYERConfig, label_embeddings, nayer_labels, recreate_generator, table_digest
from dfkd.models import Normalized
from dfkd.models.conditional import NoisyLayerGenerator

# -- pure functions --------------------------------------------------------------------------------------------------


def test_labels_are_full_copies_then_a_uniform_remainder():
    torch.manual_seed(0)
    y = nayer_labels(25, 10)
    assert y.dtype == torch.int64 and y.shape == (25,)
    assert y[:20].tolist() == list(range(10)) * 2  # 25 // 10 = 2 copies in order
    assert ((y[20:] >= 0) & (y[20:] < 10)).all()  # 25 % 10 = 5 uniform labels
    assert nayer_labels(400, 100).tolist() == list(range(100)) * 4  # CIFAR-100 at 400: no random part
    assert nayer_labels(400, 10).tolist() == list(range(10)) * 40  # CIFAR-10 at 400: no random part
    small = nayer_labels(3, 10)  # fewer samples than classes: all random
    assert small.shape == (3,) and ((small >= 0) & (small < 10)).all()
    draws = torch.cat([nayer_labels(7, 4)[4:] for _ in range(200)])  # the remainder covers every class
    assert set(draws.tolist()) == {0, 1, 2, 3}


def test_recreation_rule_with_warmup_a_multiple_of_g_life():
    # W = 20, g_life = 10 (every script): (n - 20) % 10 == 0 <=> n % 10 == 0, so every 10 rounds from 0
    fired = [n for n in range(60) if recreate_generator(n, 20, 10)]
    assert fired == [0, 10, 20, 30, 40, 50]
    assert [n for n in range(25) if recreate_generator(n, 0, 10)] == [0, 10, 20]  # no warm-up


def test_recreation_rule_with_warmup_not_a_multiple_of_g_life():
    # W = 3, g_life = 10: n % 10 == 0 at 0, 10, 20; (n - 3) % 10 == 0 at 3, 13, 23 (Python modulo: (0 - 3) % 10 = 7)
    assert [n for n in range(25) if recreate_generator(n, 3, 10)] == [0, 3, 10, 13, 20, 23]
    # W = 2, g_life = 4: n % 4 == 0 at 0, 4, 8; (n - 2) % 4 == 0 at 2, 6, 10
    assert [n for n in range(11) if recreate_generator(n, 2, 4)] == [0, 2, 4, 6, 8, 10]
    assert all(recreate_generator(n, 5, 1) for n in range(8))  # g_life 1: every round


# -- the generator ---------------------------------------------------------------------------------------------------


def make_generator(classes: int = 4, n_noisy: int = 3, dim: int = 6) -> NoisyLayerGenerator:
    torch.manual_seed(0)
    return NoisyLayerGenerator(torch.randn(classes, dim), n_noisy=n_noisy, nz=8, ngf=4, img_size=16, nc=3)


def test_generator_shapes_range_and_layer_count():
    g = make_generator()
    assert NoisyLayerGenerator.layers_for(10, 4) == 3 and NoisyLayerGenerator.layers_for(8, 4) == 2
    assert NoisyLayerGenerator.layers_for(400, 10) == 40 and NoisyLayerGenerator.layers_for(400, 100) == 4
    x = g(torch.tensor([0, 1, 2, 3, 0, 1, 2, 3, 1, 2]))
    assert x.shape == (10, 3, 16, 16) and x.min() >= 0 and x.max() <= 1
    assert g(torch.tensor([0, 1, 2])).shape == (3, 3, 16, 16)  # fewer chunks than layers is fine
    with pytest.raises(ValueError, match="needs 4 noisy layers"):
        g(torch.zeros(13, dtype=torch.long))  # 13 samples of 4 classes: 4 chunks, 3 layers
    assert "embeddings" in dict(g.named_buffers()) and not any(n.startswith("norm.") for n, _ in g.named_buffers())


def test_noisy_layer_i_only_changes_chunk_i():
    g = make_generator()
    labels = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3, 1, 2])  # chunks [0:4], [4:8], [8:10]
    with torch.no_grad():
        g.train()
        g(labels)  # non-trivial running statistics for the body
        g.eval()  # the body's BatchNorm2d in train mode would mix the chunks; the BatchNorm1d never uses running ones
        before = g(labels)
        g.noisy[1].weight.add_(0.5)
        after = g(labels)
    changed = (after - before).abs().flatten(1).amax(dim=1) > 0
    assert changed.tolist() == [False] * 4 + [True] * 4 + [False] * 2


def test_batchnorm1d_always_uses_batch_statistics():
    g = make_generator()
    labels = torch.tensor([0, 1, 2, 3])
    g.eval()
    e = g.embeddings[labels]
    expected = (e - e.mean(0)) / torch.sqrt(e.var(0, unbiased=False) + g.norm.eps)
    assert torch.allclose(g.norm(e), expected, atol=1e-5)


def test_reinit_keeps_parameter_identity_and_restarts_the_weights():
    g = make_generator()
    g.noisy_std = 2.0
    params = {name: p for name, p in g.named_parameters()}
    old = {name: p.detach().clone() for name, p in params.items()}
    g.train()
    with torch.no_grad():
        g(torch.arange(4).repeat(2))
    assert g.body.conv_blocks[0].running_mean.abs().sum() > 0

    g.reinit_noisy()
    assert all(p is params[name] for name, p in g.named_parameters())
    for layer in g.noisy:
        assert torch.equal(layer.bias, torch.zeros_like(layer.bias))
    weights = torch.cat([layer.weight.flatten() for layer in g.noisy])
    assert abs(weights.std().item() - 2.0) < 0.3 and abs(weights.mean().item()) < 0.3  # N(0, noisy_std)
    assert all(torch.equal(p, old[n]) for n, p in g.named_parameters() if not n.startswith("noisy."))

    g.reinit_all()
    assert all(p is params[name] for name, p in g.named_parameters())
    assert all(not torch.equal(p, old[n]) for n, p in g.named_parameters() if p.dim() > 1)
    bn = g.body.conv_blocks[0]
    assert torch.equal(bn.running_mean, torch.zeros_like(bn.running_mean))
    assert torch.equal(bn.weight, torch.ones_like(bn.weight))
    assert torch.equal(g.norm.weight, torch.ones_like(g.norm.weight))


# -- the label-embedding tables --------------------------------------------------------------------------------------


def test_random_table_is_fixed_across_runs_and_seeds():
    torch.manual_seed(1)
    a = label_embeddings("random", 10, 512)
    torch.manual_seed(2)
    b = label_embeddings("random", 10, 512)
    assert a.shape == (10, 512) and a.dtype == torch.float32 and torch.equal(a, b)
    assert abs(a.mean().item()) < 0.05 and abs(a.std().item() - 1) < 0.05  # N(0, 1)
    assert table_digest(a) == table_digest(b) and len(table_digest(a)) == 12
    assert table_digest(a) != table_digest(label_embeddings("random", 10, 256))


def test_onehot_table():
    assert torch.equal(label_embeddings("onehot", 7, 512), torch.eye(7))


def test_table_files_load_weights_only(tmp_path):
    table = torch.randn(10, 12).half()  # the reference's tables are float16
    torch.save(table, tmp_path / "t.pt")
    np.save(tmp_path / "t.npy", table.float().numpy())
    assert torch.equal(label_embeddings(str(tmp_path / "t.pt"), 10, 512), table.float())
    assert torch.equal(label_embeddings(str(tmp_path / "t.npy"), 10, 512), table.float())


@pytest.mark.parametrize(
    "content, name, message",
    [
        (torch.randn(9, 12), "bad.pt", r"shape \(9, 12\) but the dataset has 10 classes"),
        (torch.randn(10), "flat.pt", r"shape \(10,\)"),
        (torch.arange(20).view(10, 2), "ints.pt", "torch.int64 tensor"),
        ({"table": torch.randn(10, 4)}, "dict.pt", "holds a dict, not a tensor"),
        (np.random.randn(3, 4), "bad.npy", r"shape \(3, 4\)"),
        (np.array([{"a": 1}], dtype=object), "pickled.npy", "cannot read .* without pickles"),
        (torch.full((10, 4), float("nan")), "nan.pt", "NaN or infinite"),
        (None, "missing.pt", "no file"),
        (None, "table.csv", "is not random, onehot or a table file"),
    ],
)
def test_bad_table_files_are_one_line_config_errors(tmp_path, content, name, message):
    path = tmp_path / name
    if isinstance(content, np.ndarray):
        np.save(path, content, allow_pickle=True)
    elif content is not None:
        torch.save(content, path)
    with pytest.raises(ConfigError, match=message) as err:
        label_embeddings(str(path), 10, 512)
    assert "\n" not in str(err.value) and "[10, dim]" in str(err.value)


def test_a_file_that_is_not_weights_only_is_refused(tmp_path):
    path = tmp_path / "obj.pt"
    torch.save(Exception("pickled object"), path)  # not a tensor type: weights_only refuses to rebuild it
    with pytest.raises(ConfigError, match="without pickles"):
        label_embeddings(str(path), 10, 512)


# -- the method ------------------------------------------------------------------------------------------------------


def build(**overrides):
    torch.manual_seed(0)
    student = Normalized(TinyNet(4), INFO.mean, INFO.std)
    ctx = Ctx(make_teacher(), student, INFO, Env(torch.device("cpu")), batch_size=8)
    small = {"g_steps": 2, "gwp_loops": 3, "g_loops": 2, "embed_dim": 16, "le_emb_size": 16}
    cfg = dataclasses.replace(tiny_config("nayer"), **{**small, **overrides})
    return METHODS.get("nayer")(cfg, ctx), student


def count_forwards(module):
    modes = []
    module.register_forward_pre_hook(lambda m, _inputs: modes.append(m.training))
    return modes


def test_method_builds_its_generator_from_the_table_and_batch(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="dfkd.methods.nayer"):
        method, _ = build(synthesis_batch_size=10)  # 4 classes: chunks of 4, 4, 2
    assert len(method.generator.noisy) == 3 and method.generator.embeddings.shape == (4, 16)
    assert torch.equal(method.generator.embeddings, label_embeddings("random", 4, 16))
    digest = table_digest(method.generator.embeddings)
    assert any(digest in r.getMessage() and "NAYER-noLTE" in r.getMessage() for r in caplog.records)
    onehot, _ = build(embeddings="onehot")
    assert torch.equal(onehot.generator.embeddings, torch.eye(4))
    torch.save(torch.randn(5, 3), tmp_path / "five.pt")
    with pytest.raises(ConfigError, match="4 classes"):
        build(embeddings=str(tmp_path / "five.pt"))
    method.close()
    onehot.close()


def test_random_table_does_not_depend_on_the_run_seed():
    a, _ = build()
    torch.manual_seed(5)
    b = METHODS.get("nayer")(a.cfg, a.ctx)
    assert torch.equal(a.generator.embeddings, b.generator.embeddings)
    a.close()
    b.close()


def test_warmup_rounds_run_gwp_loops_without_the_adversarial_term():
    method, student = build()
    modes = count_forwards(student)
    prog = Progress(-2, 0, 0, 3, 1, 4, warmup_epochs=2)  # first of two warm-up epochs, one round each
    logs = method.synthesize(prog)
    assert modes == []  # no adversarial forward through the student
    assert len(method.pool) == 3 * 8 and method.images_synthesized == 3 * 8  # gwp_loops batches of 8
    assert logs["loops"] == 3 and logs["generator_recreated"] == 1.0 and float(logs["loss_adv"]) == 0.0
    assert bool(method.bn_stats.initialised)
    method.close()


def test_distillation_rounds_run_g_loops_with_the_adversarial_term():
    method, student = build()
    modes = count_forwards(student)
    prog = Progress(0, 0, 0, 3, 1, 4, warmup_epochs=2)  # the first distillation epoch: round 2 overall
    logs = method.synthesize(prog)
    assert modes == [False] * (2 * 2)  # g_loops x g_steps adversarial forwards, student in eval mode
    assert len(method.pool) == 2 * 8
    assert logs["loops"] == 2 and logs["generator_recreated"] == 1.0  # (2 - W) % 10 == 0
    prog.epoch = 1  # round 3: (3 - 2) % 10 and 3 % 10 are not 0, the generator carries on
    assert method.synthesize(prog)["generator_recreated"] == 0.0
    assert len(method.pool) == 4 * 8
    method.close()


def test_no_adversarial_forward_when_adv_is_zero():
    method, student = build(adv=0.0)
    modes = count_forwards(student)
    method.synthesize(Progress(0, 0, 0, 3, 1, 4))
    assert modes == []
    method.close()


def test_generator_is_recreated_in_place_by_the_lifetime_rule():
    method, _ = build(g_life=3, gwp_loops=1, g_loops=1, g_steps=1)
    g = method.generator
    ids = [id(p) for p in g.parameters()]
    calls = []
    reinit = g.reinit_all
    g.reinit_all = lambda: (calls.append(True), reinit())[1]
    prog = Progress(0, 0, 0, 6, 1, 4, warmup_epochs=2)
    fired = []
    for n in range(8):
        prog.epoch = n - 2
        before = len(calls)
        method.synthesize(prog)
        fired.append(len(calls) > before)
    # W = 2, g_life = 3: n % 3 == 0 at 0, 3, 6; (n - 2) % 3 == 0 at 2, 5
    assert [n for n, f in enumerate(fired) if f] == [0, 2, 3, 5, 6]
    assert [id(p) for p in g.parameters()] == ids
    method.close()


def test_student_stays_in_eval_mode_unless_the_reference_leak_is_asked_for():
    method, student = build()
    running = {k: v.clone() for k, v in student.state_dict().items() if "running" in k}
    modes = count_forwards(student)
    method.synthesize(Progress(0, 0, 0, 3, 1, 4))
    assert modes == [False, False, False, False]
    assert all(torch.equal(student.state_dict()[k], v) for k, v in running.items())
    method.close()

    leaky, student = build(student_mode_leak=True)
    modes = count_forwards(student)
    leaky.synthesize(Progress(0, 0, 0, 3, 1, 4))
    assert modes == [False, False, True, True]  # the reference: train mode from the second loop of a round on
    assert student.training  # frozen() restores the mode it found
    leaky.close()


def test_config_checks():
    for name in ("g_life", "g_loops", "gwp_loops"):
        with pytest.raises(ValueError, match=f"{name}=0"):
            NAYERConfig(**{name: 0})
    with pytest.raises(ValueError, match="noisy_std"):
        NAYERConfig(noisy_std=0.0)
