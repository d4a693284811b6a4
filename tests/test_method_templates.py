"""The shared pieces of the method templates: the generator step (student mode, logs), the step-count check, the
configurable inversion views, the references' replay generators and the forward-capture helper."""

from __future__ import annotations

import math

import pytest
import torch
from test_methods import INFO, METHOD_NAMES, Ctx, Env, Normalized, TinyNet, build, make_teacher
from torch import nn
from torch.nn.utils import parametrize

from dfkd.config import build as build_config
from dfkd.errors import ConfigError
from dfkd.hooks import ForwardCapture, InputHook
from dfkd.losses import class_entropy, histogram_entropy
from dfkd.methods import METHODS, GeneratorMethod, Progress
from dfkd.methods.deepinv import jitter_and_flip
from dfkd.models import create_generator
from dfkd.models.generators import UnitRange
from dfkd.models.replay import replay_generator

GENERATOR_METHODS = [n for n in METHOD_NAMES if issubclass(METHODS.get(n), GeneratorMethod)]
PROG = Progress(0, 0, 0, 2, 2, 2)


# -- class entropy: golden values ---------------------------------------------------------------------------------


def logits_for(classes: list[int], num_classes: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(classes), num_classes).float() * 5.0


@pytest.mark.parametrize(
    ("classes", "num_classes", "expected"),
    [
        ([0, 1, 2, 3], 4, 1.0),  # every class equally often
        ([2, 2, 2, 2], 4, 0.0),  # one class
        ([0, 0, 1, 2], 3, (0.5 * math.log(2) + 0.5 * math.log(4)) / math.log(3)),  # p = (1/2, 1/4, 1/4)
        ([0, 0, 1, 2], 4, (0.5 * math.log(2) + 0.5 * math.log(4)) / math.log(4)),  # an unseen class counts
    ],
)
def test_class_entropy_golden_values(classes, num_classes, expected):
    value = class_entropy(logits_for(classes, num_classes))
    assert value.dtype == torch.float32 and not value.requires_grad
    assert value.item() == pytest.approx(expected, abs=1e-6)


def test_histogram_entropy_golden_values():
    # p = (1/2, 1/4, 1/4, 0): 1/2 ln 2 + 2 * 1/4 ln 4 = 1.5 ln 2 nats; the empty bin adds nothing (no NaN)
    assert histogram_entropy(torch.tensor([2.0, 1.0, 1.0, 0.0])).item() == pytest.approx(1.5 * math.log(2), abs=1e-6)
    assert histogram_entropy(torch.tensor([3.0, 3.0, 3.0])).item() == pytest.approx(math.log(3), abs=1e-6)


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_every_method_logs_the_teachers_class_entropy_on_its_synthetic_batches(name):
    method, _ = build(name)
    logs = method.synthesize(PROG)
    method.close()
    if name == "dafl" and method.cfg.step == "joint":
        pytest.skip("the joint step logs it from student_loss")
    assert 0.0 <= float(logs["class_entropy"]) <= 1.0


# -- the generator step's student mode ----------------------------------------------------------------------------


def student_bn_means(student: nn.Module) -> list[torch.Tensor]:
    return [m.running_mean.clone() for m in student.modules() if isinstance(m, nn.BatchNorm2d)]


# the methods whose generator loss runs the student (CuDFKD only once its adversarial ramp starts; DAFL never)
STUDENT_IN_GENERATOR_LOSS = ["dfad", "dfq", "mb_dfkd", "pre_dfkd", "zskt"]


@pytest.mark.parametrize("name", STUDENT_IN_GENERATOR_LOSS)
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_g_student_mode_decides_whether_the_generator_step_moves_the_students_bn_statistics(name, mode):
    method, student = build(name)
    method.cfg.g_student_mode = mode
    student.train()
    before = student_bn_means(student)
    method.synthesize(PROG)
    after = student_bn_means(student)
    moved = any(not torch.equal(a, b) for a, b in zip(after, before))
    assert moved == (mode == "train")
    assert student.training, "the student's own mode is restored after the generator step"
    assert all(p.requires_grad for p in student.parameters())
    assert all(p.grad is None for p in student.parameters()), "the generator step never trains the student"
    method.close()


def test_g_student_mode_defaults_follow_the_references():
    assert METHODS.get("zskt").Config().g_student_mode == "eval"  # the CMI benchmark; zskt_original recipes: train
    assert METHODS.get("dfad").Config().g_student_mode == "eval"  # the benchmark; dfad_original recipes: train
    assert METHODS.get("mb_dfkd").Config().g_student_mode == "train"
    assert METHODS.get("pre_dfkd").Config().g_student_mode == "train"


# -- a synthesis round needs a step ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_g_steps_zero_is_a_config_error_that_names_the_key(name):
    with pytest.raises(ConfigError, match="g_steps=0"):
        build_config(METHODS.get(name).Config, {"g_steps": 0}, "method")


def test_mb_dfkd_memory_pushes_must_be_positive():
    with pytest.raises(ConfigError, match="memory_pushes=0"):
        build_config(METHODS.get("mb_dfkd").Config, {"memory_pushes": 0}, "method")


# -- the inversion views -----------------------------------------------------------------------------------------------


def test_cmi_default_views_are_the_references():
    method, _ = build("cmi")
    x = torch.rand(6, 3, 16, 16)
    assert not torch.equal(method.global_view(x), x)  # the reference's crop + flip
    assert not torch.equal(method.local_view(x), x)  # the reference's resized crop + flip
    method.close()


def test_cmi_builds_its_views_from_the_config():
    cfg = METHODS.get("cmi").Config(
        g_steps=1, nz=8, ngf=4, head_dim=8, bank_size=64, n_neg=8, global_view="none", local_view="none"
    )
    ctx = Ctx(make_teacher(), Normalized(TinyNet(4), INFO.mean, INFO.std), INFO, Env(torch.device("cpu")), 8)
    method = METHODS.get("cmi")(cfg, ctx)
    seen: list[torch.Tensor] = []
    handle = ctx.teacher.register_forward_pre_hook(lambda _m, inputs: seen.append(inputs[0].detach().clone()))
    method.synthesize(PROG)
    handle.remove()
    method.close()
    # both views are the generator's batch itself: the global and local forwards of the step see the same images
    assert len(seen) == 2 and torch.equal(seen[0], seen[1])


def test_deepinv_without_jitter_and_flip_scores_the_plain_pixels():
    v = torch.randn(4, 3, 16, 16)
    for _ in range(5):
        assert torch.equal(jitter_and_flip(v, 0.0, False), v)
    assert any(not torch.equal(jitter_and_flip(v, 0.25, True), v) for _ in range(10))


# -- the references' replay generators -----------------------------------------------------------------------------


def test_pre_dfkd_generators_are_the_references():
    novel = create_generator("pre_dfkd", nz=16, ngf=8, img_size=16, nc=3)
    memory = create_generator("pre_dfkd_memory", nz=16, ngf=8, img_size=16, nc=3)
    convs = [m for m in novel.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 3 and all(parametrize.is_parametrized(c, "weight") for c in convs)
    assert not any(parametrize.is_parametrized(m, "weight") for m in memory.modules() if isinstance(m, nn.Conv2d))
    for net in (novel, memory):
        bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
        assert [bn.eps for bn in bns] == [1e-5, 0.8, 0.8, 1e-5]  # the DAFL-derived eps 0.8 of the hidden blocks
        assert not bns[-1].affine and isinstance(list(net.modules())[-2], nn.Tanh)  # tanh -> affine-free BN
        assert net.output_space == "normalized"
    out = novel.train()(torch.randn(32, 16))
    assert out.mean(dim=(0, 2, 3)).abs().max() < 1e-4  # normalised space: per-channel zero mean in train mode


def test_replay_generator_initialises_spectral_norm_weights_through_their_original():
    torch.manual_seed(0)
    g = replay_generator("pre_dfkd", 16, 8, (1, 16, 16))
    originals = [m.parametrizations.weight.original for m in g.modules() if parametrize.is_parametrized(m, "weight")]
    assert originals and all(w.abs().max() <= 0.08 for w in originals)
    assert all(m.bias.abs().max() == 0 for m in g.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))


def test_pre_dfkd_memory_generator_emits_unit_range_images():
    method, _ = build("pre_dfkd")
    assert isinstance(method.memory.generator, UnitRange) and isinstance(method.generator, UnitRange)
    x = method.memory.generator(torch.randn(8, method.cfg.latent_dim))
    assert x.min() >= 0 and x.max() <= 1
    method.close()


# -- the forward-capture helper --------------------------------------------------------------------------------------


def test_forward_capture_records_the_latest_forward_only_while_capturing():
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    hooks = ForwardCapture([net[0], net[2]], lambda _m, _inputs, out: out.detach().clone())
    net(torch.ones(1, 3))
    with pytest.raises(RuntimeError, match="no hooked module"):
        hooks.pop()
    with hooks.capture():
        net(torch.zeros(1, 3))
        last = net(torch.ones(2, 3))
    net(torch.zeros(5, 3))  # after the block: not recorded
    first, second = hooks.pop()
    assert first.shape == (2, 4) and torch.equal(second, last)
    with hooks.capture():
        net[0](torch.ones(1, 3))  # the second hooked module does not run
    with pytest.raises(RuntimeError, match=r"\[1\]"):
        hooks.pop()
    with hooks.capture():
        net[0](torch.ones(1, 3))
    assert len(hooks.pop(partial=True)) == 1
    with pytest.raises(RuntimeError):
        hooks.pop()  # popped values are gone
    hooks.remove()
    with hooks.capture():
        net(torch.ones(1, 3))
    with pytest.raises(RuntimeError):
        hooks.pop()  # removed hooks record nothing


def test_input_hook_always_keeps_the_latest_input():
    net = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    hook = InputHook(net[1])
    net(torch.zeros(1, 3))
    x = torch.ones(2, 3)
    net(x)
    assert torch.equal(hook.pop(), net[0](x))
    hook.remove()


def test_a_bn_statistics_method_on_a_teacher_without_batchnorm_names_the_option():
    teacher = Normalized(nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, INFO.num_classes)), INFO.mean, INFO.std)
    ctx = Ctx(teacher.eval(), Normalized(TinyNet(4), INFO.mean, INFO.std), INFO, Env(torch.device("cpu")), 8)
    with pytest.raises(ConfigError, match=r"set method\.bn=0"):
        METHODS.get("dfq")(METHODS.get("dfq").Config(nz=8, ngf=4), ctx)


@pytest.mark.parametrize("name", [n for n in METHOD_NAMES if hasattr(build(n)[0], "generator")])
def test_bf16_runs_the_generator_in_bf16_and_hands_out_fp32_images(name):
    method, _ = build(name)
    method.ctx.env.precision = "bf16"
    generators = [module for name, module in method.named_children() if "generator" in name]  # FastDFKD: two
    convs = [m for g in generators for m in g.modules() if isinstance(m, nn.Conv2d)]
    seen: list[torch.dtype] = []
    for conv in convs:
        conv.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    prog = Progress(0, 0, 0, 2, 2, 2)
    method.synthesize(prog)
    assert seen and set(seen) == {torch.bfloat16}, "the synthesis step's generator forward"
    seen.clear()
    batch = method.next_batch(prog)
    if seen:  # pool methods (CMI) draw student batches from the pool, without a generator forward
        assert set(seen) == {torch.bfloat16}
    assert batch.x.dtype == torch.float32
