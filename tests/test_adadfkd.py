"""AdaDFKD: golden values of its hardness schedule, ring bounds, R2M loss and in-batch InfoNCE (worked out by hand on
tiny inputs), the queue's wrap-around for any batch size, where each term's gradient goes, the feature projection
options, the composition of the generator and student losses, and the recipes' feature widths."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from test_methods import INFO, TinyNet, make_teacher, run_rounds

from dfkd import losses as L
from dfkd.config import build as build_config
from dfkd.config import load_config
from dfkd.engine.env import Env
from dfkd.errors import ConfigError
from dfkd.losses.infonce import FeatureQueue, batch_infonce, hardness, r2m_loss, ring_bounds
from dfkd.methods import METHODS, Batch, Ctx, Progress
from dfkd.models import Normalized, classifier_module, create_model

TINY = {"nz": 8, "ngf": 4, "synthesis_batch_size": 8, "n_neg": 16}


def close(value, expected, tol=1e-6):
    assert abs(float(value) - expected) < tol, (float(value), expected)


def build(student_width: int = 4, **overrides):
    """AdaDFKD on the generic tests' tiny nets: a 16-d teacher feature; the student's is 2 x ``student_width``."""
    torch.manual_seed(0)
    teacher = make_teacher()
    student = Normalized(TinyNet(student_width), INFO.mean, INFO.std)
    ctx = Ctx(teacher, student, INFO, Env(torch.device("cpu")), batch_size=8)
    cfg = METHODS.get("adadfkd").Config(**{"projection": "fixed", **TINY, **overrides})
    return METHODS.get("adadfkd")(cfg, ctx), student


def prog(epoch: int = 0, epochs: int = 4) -> Progress:
    return Progress(epoch, 0, 0, epochs, 2, 2)


# -- the hardness schedule and the ring ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("epoch", "expected"),
    [
        (-3, 0.0),  # a synthesis-only warm-up epoch
        (0, 0.0),
        (75, 0.0),  # floor(300 x 0.25) = 75: the ramp starts here
        (76, 0.1 * 1 / 150),  # (1 - 0.9) x (76 - 75) / floor(300 x 0.5)
        (150, 0.05),  # 0.1 x 75 / 150
        (225, 0.1),  # 0.1 x 150 / 150 = 1 - length
        (299, 0.1),  # capped at 1 - length
    ],
)
def test_hardness_golden_values_of_the_cifar10_script(epoch, expected):
    # adadfkd_cifar10_resnet34_resnet18.sh: E 300, begin 0.25, end 0.75, length 0.9
    close(hardness(epoch, 300, 0.25, 0.75, 0.9), expected, 1e-12)


def test_a_ramp_shorter_than_an_epoch_jumps_in_one_epoch():
    # E 10, begin = end = 0.5: floor(10 x 0) = 0 epochs of ramp (the reference divides by zero)
    assert hardness(5, 10, 0.5, 0.5, 0.8) == 0.0
    close(hardness(6, 10, 0.5, 0.5, 0.8), 0.2, 1e-12)


@pytest.mark.parametrize(
    ("h", "length", "k", "expected"),
    [
        (0.0, 0.9, 4096, (0, 3686)),  # floor(0.9 x 4096 = 3686.4)
        (0.05, 0.9, 4096, (204, 3891)),  # floor(204.8), floor(0.95 x 4096 = 3891.2)
        (hardness(300, 300, 0.25, 0.75, 0.9), 0.9, 4096, (409, 4096)),  # floor(409.6): the hardest 90 %
        (0.25, 0.5, 4, (1, 3)),
        (0.0, 1.0, 4, (0, 4)),
    ],
)
def test_ring_bounds_golden_values(h, length, k, expected):
    assert ring_bounds(h, length, k) == expected


# -- R2M: the ring InfoNCE against the queue -------------------------------------------------------------------------

# Four unit negatives (columns); their cosines with the query e1 = [1, 0] are 0, -1, 0.6, 0.8 and with e2 = [0, 1]
# they are 1, 0, 0.8, -0.6.
QUEUE = torch.tensor([[0.0, -1.0, 0.6, 0.8], [1.0, 0.0, 0.8, -0.6]], dtype=torch.float64)


def test_r2m_golden_value_one_row():
    # q = e1, k = e1: positive logit 1. Negatives sorted ascending: -1, 0, 0.6, 0.8; h 0.25, length 0.5 of K = 4
    # keeps ranks [1, 3) = {0, 0.6}. At tau 0.5: -log(e^2 / (e^2 + e^0 + e^1.2)) = log(1 + e^-2 + e^-0.8).
    f_t = torch.tensor([[3.0, 0.0]], dtype=torch.float64)  # not unit: the loss normalises
    f_s = torch.tensor([[5.0, 0.0]], dtype=torch.float64)
    close(r2m_loss(f_t, f_s, QUEUE, h=0.25, length=0.5, tau=0.5), math.log(1 + math.exp(-2) + math.exp(-0.8)), 1e-12)


def test_r2m_golden_value_sorts_each_row_on_its_own():
    # row 1: q = e1, k = e1 (positive 1), ring {0, 0.6}:  log(1 + e^(0 - 1) + e^(0.6 - 1))     at tau 1
    # row 2: q = e2, k = [0.6, 0.8] (positive 0.8); sorted -0.6, 0, 0.8, 1, ring {0, 0.8}:  log(1 + e^-0.8 + e^0)
    f_t = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    f_s = torch.tensor([[1.0, 0.0], [0.6, 0.8]], dtype=torch.float64)
    row1 = math.log(1 + math.exp(-1) + math.exp(-0.4))
    row2 = math.log(2 + math.exp(-0.8))
    close(r2m_loss(f_t, f_s, QUEUE, h=0.25, length=0.5, tau=1.0), (row1 + row2) / 2, 1e-12)


def test_r2m_ring_slides_from_the_easiest_to_the_hardest_negatives():
    # q = k = e1 (positive 1), tau 1, length 0.5 of K = 4: h 0 keeps {-1, 0} (the least similar), h 0.5 keeps {0.6, 0.8}
    e1 = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    close(r2m_loss(e1, e1, QUEUE, h=0.0, length=0.5, tau=1.0), math.log(1 + math.exp(-2) + math.exp(-1)), 1e-12)
    close(r2m_loss(e1, e1, QUEUE, h=0.5, length=0.5, tau=1.0), math.log(1 + math.exp(-0.4) + math.exp(-0.2)), 1e-12)


def test_r2m_gradient_reaches_the_queries_only():
    f_t = torch.randn(5, 6, requires_grad=True)
    f_s = torch.randn(5, 6, requires_grad=True)
    queue = F.normalize(torch.randn(6, 10), dim=0).requires_grad_()
    r2m_loss(f_t, f_s, queue, h=0.1, length=0.7, tau=0.07).backward()
    assert f_t.grad is not None and f_t.grad.abs().sum() > 0
    assert f_s.grad is None and queue.grad is None


def test_r2m_is_float32_under_bf16_autocast():
    f_t, f_s, queue = torch.randn(4, 8), torch.randn(4, 8), F.normalize(torch.randn(8, 12), dim=0)
    expected = r2m_loss(f_t, f_s, queue, 0.0, 0.9, 0.07)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = r2m_loss(f_t.bfloat16(), f_s.bfloat16(), queue, 0.0, 0.9, 0.07)
    assert value.dtype == torch.float32
    assert abs(float(value) - float(expected)) < 0.05  # only the inputs' bf16 rounding


# -- the student's in-batch InfoNCE ----------------------------------------------------------------------------------


def test_batch_infonce_golden_values():
    # cosines d_ij of teacher row i and student row j: [[1, 0.6], [0, 0.8]]; tau 1
    # row 1: -log(e^1 / (e^1 + e^0.6)) = log(1 + e^-0.4);  row 2: -log(e^0.8 / (e^0 + e^0.8)) = log(1 + e^-0.8)
    f_t = torch.tensor([[2.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    f_s = torch.tensor([[1.0, 0.0], [3.0, 4.0]], dtype=torch.float64)
    rows = [math.log(1 + math.exp(-0.4)), math.log(1 + math.exp(-0.8))]
    per_row = batch_infonce(f_t, f_s, tau=1.0, reduction="none")
    assert torch.allclose(per_row, torch.tensor(rows, dtype=torch.float64), atol=1e-12)
    close(batch_infonce(f_t, f_s, tau=1.0), sum(rows) / 2, 1e-12)
    # tau 0.5 doubles every logit: log(1 + e^-0.8), log(1 + e^-1.6)
    close(batch_infonce(f_t, f_s, tau=0.5), (math.log(1 + math.exp(-0.8)) + math.log(1 + math.exp(-1.6))) / 2, 1e-12)


def test_batch_infonce_gradient_reaches_the_student_only():
    f_t = torch.randn(5, 6, requires_grad=True)
    f_s = torch.randn(5, 6, requires_grad=True)
    batch_infonce(f_t, f_s, tau=0.07).backward()
    assert f_s.grad is not None and f_s.grad.abs().sum() > 0 and f_t.grad is None


# -- the queue -------------------------------------------------------------------------------------------------------


def cols(first: int, n: int, dim: int = 2) -> torch.Tensor:
    """n rows whose entries are first, first + 1, ... (one value per row), to see where each lands."""
    return torch.arange(first, first + n, dtype=torch.float32)[:, None].repeat(1, dim)


def test_queue_starts_with_random_unit_columns():
    queue = FeatureQueue(6, 10)
    assert queue.queue.shape == (6, 10) and torch.allclose(queue.queue.norm(dim=0), torch.ones(10))
    assert int(queue.ptr) == 0


def test_queue_wraps_around_with_a_batch_that_does_not_divide_its_size():
    queue = FeatureQueue(2, 5)  # batches of 3 into 5 columns: the reference's assertion rejects this
    queue.push(cols(0, 3))  # columns 0, 1, 2
    queue.push(cols(3, 3))  # columns 3, 4, then 0
    assert queue.queue[0].tolist() == [5.0, 1.0, 2.0, 3.0, 4.0] and int(queue.ptr) == 1
    queue.push(cols(6, 3))  # columns 1, 2, 3
    assert queue.queue[0].tolist() == [5.0, 6.0, 7.0, 8.0, 4.0] and int(queue.ptr) == 4
    # more rows than columns: rows 10..16 would land on 4, 0, 1, 2, 3, 4, 0; the last write of each column wins
    queue.push(cols(10, 7))
    assert queue.queue[0].tolist() == [16.0, 12.0, 13.0, 14.0, 15.0] and int(queue.ptr) == 1


def test_queue_state_resumes_exactly():
    queue = FeatureQueue(2, 5)
    queue.push(cols(0, 3))
    state = copy.deepcopy(queue.state_dict())
    assert set(state) == {"queue", "ptr"}
    torch.manual_seed(7)
    fresh = FeatureQueue(2, 5)
    fresh.load_state_dict(state)
    for q in (queue, fresh):
        q.push(cols(3, 4))
    assert torch.equal(queue.queue, fresh.queue) and torch.equal(queue.ptr, fresh.ptr)


def test_the_cifar10_script_queue_takes_its_batch():
    # N_neg 4096 at batch 768 (4096 mod 768 = 256): six pushes leave the pointer at 6 x 768 mod 4096 = 512
    queue = FeatureQueue(4, 4096)
    for _ in range(6):
        queue.push(F.normalize(torch.randn(768, 4), dim=1))
    assert int(queue.ptr) == 512


# -- feature widths -------------------------------------------------------------------------------------------------


def test_different_widths_without_a_projection_are_a_one_line_config_error():
    with pytest.raises(ConfigError, match=r"16-d and the student's 8-d; set method\.projection=fixed") as err:
        build(projection="error")
    assert "\n" not in str(err.value)


def test_fixed_projection_is_one_saved_linear_map():
    method, _ = build(projection="fixed")
    state = method.state_dict()
    assert state["proj_weight"].shape == (16, 8) and state["proj_bias"].shape == (16,)
    bound = 1 / math.sqrt(8)  # nn.Linear's default init
    assert state["proj_weight"].abs().max() <= bound and state["proj_bias"].abs().max() <= bound
    f = torch.randn(3, 8)
    assert torch.equal(method.project(f), method.project(f))
    assert torch.allclose(method.project(f), f @ state["proj_weight"].T + state["proj_bias"])
    method.close()


def test_resample_projection_draws_a_fresh_map_on_every_call():
    method, _ = build(projection="resample")
    assert "proj_weight" not in method.state_dict()
    f = torch.randn(3, 8)
    a, b = method.project(f), method.project(f)
    assert a.shape == (3, 16) and not torch.allclose(a, b)
    method.close()


def test_equal_widths_need_no_projection():
    method, _ = build(student_width=8, projection="error")
    f = torch.randn(3, 16)
    assert method.project(f) is f and "proj_weight" not in method.state_dict()
    method.close()


def test_recipe_pairs_feature_widths():
    """The CIFAR and Fashion-MNIST ResNet/WRN pairs have equal widths (projection: error); the LeNets do not."""
    widths = {}
    for arch in ("resnet34", "resnet18", "wrn40_2", "wrn16_2", "lenet5_bn", "lenet5_half"):
        widths[arch] = classifier_module(create_model(arch, 10, 3 if "lenet" not in arch else 1)).in_features
    assert widths["resnet34"] == widths["resnet18"] == 512 and widths["wrn40_2"] == widths["wrn16_2"] == 128
    assert (widths["lenet5_bn"], widths["lenet5_half"]) == (120, 60)
    for recipe, projection in [
        ("cifar10/adadfkd-resnet34-resnet18", "error"),
        ("cifar100/adadfkd-resnet34-resnet18", "error"),
        ("cifar100/adadfkd-wrn40_2-wrn16_2", "error"),
        ("fashion-mnist/adadfkd-resnet34-resnet18", "error"),
        ("fashion-mnist/adadfkd-lenet5_bn-lenet5_half", "fixed"),
    ]:
        assert load_config("distill", recipe).method.projection == projection, recipe


def test_cifar10_recipe_keeps_the_scripts_queue_and_batch():
    cfg = load_config("distill", "cifar10/adadfkd-resnet34-resnet18")
    assert (cfg.method.n_neg, cfg.train.batch_size) == (4096, 768) and cfg.method.synthesis_batch_size is None


# -- the method: where the terms go ----------------------------------------------------------------------------------


def forwards(method, x):
    """Teacher logits and feature, student logits and projected feature on ``x`` (student in eval mode)."""
    with torch.no_grad():
        t = method.ctx.teacher(x)
        f_t = method.teacher_features.pop()
        s = method.ctx.student(x)
        f_s = method.project(method.student_features.pop())
    return t, f_t, s, f_s


def test_generator_loss_composition_and_the_unmasked_adversarial_kl():
    method, student = build(adv=1.5, hard=0.3)
    student.eval()
    x = torch.rand(8, *INFO.image_shape)
    t, _, s, f_s = forwards(method, x)
    with torch.no_grad():
        loss, _, logs = method.generator_loss(x, prog(epoch=0))
    c = method.cfg
    expected = (
        c.lmda_ent * logs["entropy"]
        + 1.5 * logs["loss_adv"]
        + c.oh * logs["loss_oh"]
        + c.bn * logs["loss_bn"]
        + 0.3 * logs["loss_r2m"]
    )
    assert torch.allclose(loss, expected, atol=1e-5)
    # every sample counts (CuDFKD's KL keeps only those where the two networks agree)
    assert torch.allclose(logs["loss_adv"], L.adv_unmasked_kl(s, t, 3.0), atol=1e-6)
    # the queue got the normalised (projected) student features of the batch, at the pointer
    assert int(method.queue.ptr) == 8
    assert torch.allclose(method.queue.queue[:, :8], F.normalize(f_s, dim=1).T, atol=1e-6)
    method.close()


def test_r2m_reaches_the_generator_through_the_teacher_only():
    # every other generator term off: L_G = hard * R2M
    method, student = build(lmda_ent=0.0, oh=0.0, bn=0.0, adv=0.0, hard=1.0)
    student.eval()
    x = method.generate(8)
    loss, _, logs = method.generator_loss(x, prog())
    assert torch.allclose(loss, logs["loss_r2m"])
    loss.backward()
    assert all(p.grad is None for p in student.parameters()), "the keys carry no gradient into the student"
    grads = [p.grad for p in method.generator.parameters()]
    assert any(g is not None and g.abs().sum() > 0 for g in grads), "R2M moves the generator"
    method.close()


def test_hardness_follows_the_epoch():
    method, _ = build(begin_fraction=0.25, end_fraction=0.75, length=0.9)
    assert [round(method.hardness(prog(e, epochs=300)), 12) for e in (75, 150, 225)] == [0.0, 0.05, 0.1]
    logs = method.synthesize(prog(epoch=150, epochs=300))
    close(logs["hardness"], hardness(150, 300, 0.25, 0.75, 0.9), 1e-12)
    method.close()


def test_without_hard_there_is_no_queue_and_no_r2m():
    method, _ = build(hard=0.0, adv=0.0)
    logs = method.synthesize(prog())
    assert method.queue is None and "loss_r2m" not in logs
    assert not any(k.startswith("queue") for k in method.state_dict())
    method.close()


def test_student_loss_adds_the_infonce_to_the_self_paced_difficulty():
    method, student = build(s_nce=0.4, T=4.0, curr_option="none")
    method.cfg.nce_requires_spl = False
    student.eval()  # batch statistics would differ between the two forwards
    x = torch.rand(8, *INFO.image_shape)
    t, f_t, s, f_s = forwards(method, x)
    out = method.student_loss(Batch(x=x), student, prog())
    nce = batch_infonce(f_t, f_s, 0.07)
    close(out["loss_nce"], float(nce), 1e-5)
    close(out["difficulty"], float(L.kd_kl(s, t, 4.0) + 0.4 * nce), 1e-5)
    close(out["loss"].detach(), float(out["difficulty"]), 1e-5)  # curr_option none: weight 1
    method.close()


def test_the_student_infonce_needs_self_paced_learning_as_in_the_reference():
    method, student = build(curr_option="none")
    x = torch.rand(8, *INFO.image_shape)
    out = method.student_loss(Batch(x=x), student, prog())
    assert "loss_nce" not in out  # the reference drops it without SPL
    method.cfg.curr_option = "log"
    assert "loss_nce" in method.student_loss(Batch(x=x), student, prog())
    method.close()


def test_the_student_infonce_reaches_the_student_through_its_feature():
    method, student = build(s_nce=1.0, curr_option="none")
    method.cfg.nce_requires_spl = False
    student.eval()
    x = torch.rand(8, *INFO.image_shape)
    fc, conv = student.net.fc.weight, student.net.features[0].weight

    def grads():
        return torch.autograd.grad(method.student_loss(Batch(x=x), student, prog())["loss"], [fc, conv])

    fc_with, conv_with = grads()
    method.cfg.s_nce = 0.0
    fc_without, conv_without = grads()
    # the InfoNCE reads the feature entering the classifier: it moves the layers below it, not the classifier
    assert torch.allclose(fc_with, fc_without, atol=1e-7)
    assert not torch.allclose(conv_with, conv_without)
    method.close()


def test_per_sample_self_paced_weights_see_a_per_sample_infonce():
    method, student = build(spl_granularity="sample", curr_option="log")
    student.eval()
    out = method.student_loss(Batch(x=torch.rand(8, *INFO.image_shape)), student, prog())
    assert torch.isfinite(out["loss"]) and float(out["spl_weight"]) > 0
    method.close()


def test_keys_of_every_rank_are_enqueued_under_ddp():
    method, _ = build()

    class TwoRanks(Env):
        def all_gather(self, tensor):
            return torch.cat([tensor, -tensor])

    method.ctx.env = TwoRanks(torch.device("cpu"), rank=0, world_size=2)
    method.generator_loss(method.generate(4), prog())
    queue, pointer = method.queue.queue, int(method.queue.ptr)
    assert pointer == 8  # four keys from each of the two ranks
    assert torch.allclose(queue[:, :4], -queue[:, 4:8])
    method.close()


def test_two_rounds_move_the_queue_pointer_by_every_synthesised_key():
    method, student = build(g_steps=2)
    run_rounds(method, student, rounds=2)
    assert int(method.queue.ptr) == (2 * 2 * 8) % 16  # 2 rounds x 2 generator steps x 8 images, 16 columns
    method.close()


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("length", 0.0, "length=0.0"),
        ("length", 1.5, "length=1.5"),
        ("tau_nce", 0.0, "tau_nce=0.0"),
        ("n_neg", 0, "n_neg=0"),
        ("hard", -1.0, "hard=-1.0"),
    ],
)
def test_config_checks_name_the_key(key, value, message):
    with pytest.raises(ConfigError, match=message):
        build_config(METHODS.get("adadfkd").Config, {key: value}, "method")


def test_defaults_are_the_cifar10_script():
    c = METHODS.get("adadfkd").Config()
    assert (c.adv, c.grad_adv, c.adv_type, c.tau_adv, c.loss, c.T, c.lambda_0, c.curr_option) == (
        1.0,
        0.0,
        "kl",
        3.0,
        "kl",
        20.0,
        2.2,
        "log",
    )
    assert (c.hard, c.length, c.tau_nce, c.n_neg, c.s_nce, c.projection, c.nce_requires_spl) == (
        0.1,
        0.9,
        0.07,
        4096,
        0.1,
        "error",
        True,
    )
    assert (c.begin_fraction, c.end_fraction, c.nz, c.lr_g, c.betas_g) == (0.25, 0.75, 512, 1e-3, [0.9, 0.99])
