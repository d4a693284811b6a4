"""The generator methods' student-batch options (replay, reuse, student_augment, mix) and the mixing functions."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import TINY_DISTILL, interrupted_after
from test_generative_methods import build

import dfkd
from dfkd import load_config
from dfkd.data.mixing import box_mask, cutmix, mix_batch, mixup
from dfkd.errors import ConfigError
from dfkd.methods import Progress

B = 8  # the student batch size of test_generative_methods.build

# -- the mixing functions: golden values ----------------------------------------------------------------------------


def test_mixup_is_the_convex_combination_with_the_partner():
    x = torch.tensor([0.0, 1.0, 0.5, 0.25]).view(4, 1, 1, 1)
    out = mixup(x, 0.75, torch.tensor([1, 0, 3, 2]))
    assert out.view(-1).tolist() == [0.25, 0.75, 0.4375, 0.3125]


def test_box_mask_is_clipped_to_the_image():
    # lam 0.75: sides floor(8 * sqrt(0.25)) = 4, centred at row 2, column 7: rows 0..3, columns 5..7 (clipped)
    mask = box_mask(8, 8, torch.tensor(0.75), torch.tensor(2), torch.tensor(7))
    expected = torch.zeros(8, 8, dtype=torch.bool)
    expected[0:4, 5:8] = True
    assert torch.equal(mask, expected)
    assert not box_mask(8, 8, torch.tensor(1.0), torch.tensor(4), torch.tensor(4)).any()  # lam 1: no box


def test_cutmix_pastes_the_partner_under_the_mask():
    x = torch.arange(4.0).view(4, 1, 1, 1).expand(4, 2, 3, 3).clone()
    mask = torch.zeros(3, 3, dtype=torch.bool)
    mask[1, 2] = True
    out = cutmix(x, mask, torch.tensor([3, 2, 1, 0]))
    assert out[:, :, 1, 2].tolist() == [[3.0, 3.0], [2.0, 2.0], [1.0, 1.0], [0.0, 0.0]]
    out[:, :, 1, 2] = x[:, :, 1, 2]
    assert torch.equal(out, x)  # nothing else changed


def test_mix_batch_draws_lambda_permutation_and_box_from_the_global_rng():
    x = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(9))
    torch.manual_seed(0)  # draws: lambda 0.8637616..., permutation [1, 0, 3, 2]
    lam = torch.tensor(0.8637616038322449)
    assert torch.equal(mix_batch(x, "mixup", 1.0), mixup(x, lam, torch.tensor([1, 0, 3, 2])))
    torch.manual_seed(3)  # lambda 0.6556679 -> sides floor(8 * 0.5868) = 4, permutation [1, 2, 0, 3], centre (3, 1)
    expected = x.clone()
    expected[:, :, 1:5, 0:3] = x[[1, 2, 0, 3], :, 1:5, 0:3]
    assert torch.equal(mix_batch(x, "cutmix", 1.0), expected)
    assert mix_batch(x, "none", 1.0) is x


@pytest.mark.parametrize("kind", ["mixup", "cutmix"])
def test_mixed_batches_keep_shape_dtype_and_range(kind):
    torch.manual_seed(1)
    x = torch.rand(16, 3, 8, 8)
    for alpha in (0.2, 1.0, 5.0):
        out = mix_batch(x, kind, alpha)
        assert out.shape == x.shape and out.dtype == x.dtype
        assert 0 <= out.min() and out.max() <= 1
    with pytest.raises(ValueError, match="unknown mix"):
        mix_batch(x, "blend", 1.0)


# -- the options on a generator method -------------------------------------------------------------------------------


def count_forwards(method) -> list[int]:
    """The batch size of every generator forward from now on."""
    sizes: list[int] = []
    method.generator.register_forward_hook(lambda module, args, out: sizes.append(out.shape[0]))
    return sizes


def progress(step: int, kd_steps: int = 6) -> Progress:
    return Progress(0, step // kd_steps, step, 2, 2, kd_steps)


def test_default_batches_are_the_plain_generator_batches_and_draw_nothing_else():
    method, _ = build("cudfkd")
    assert not method.batch_options and method.replay_pool is None
    torch.manual_seed(5)
    x = method.next_batch(progress(0)).x
    after = torch.get_rng_state()
    torch.manual_seed(5)
    method.generator.eval()
    assert torch.equal(x, method.generate(B)) and torch.equal(after, torch.get_rng_state())
    assert "replay_pool._extra_state" not in method.state_dict()


def test_replay_fills_the_pool_and_draws_the_replayed_share_from_it():
    method, _ = build("cudfkd", replay=0.5, pool_size=10)
    sizes = count_forwards(method)
    pool = method.replay_pool
    method.next_batch(progress(0))  # an empty pool: all 8 fresh
    assert sizes == [8] and len(pool) == 8
    for step in (1, 2):
        x = method.next_batch(progress(step)).x
        assert x.shape[0] == B
        assert torch.equal(x[4:] * 255, (x[4:] * 255).round())  # the replayed half is 8-bit
    assert sizes == [8, 4, 4] and len(pool) == 10 and pool.n_added == 16  # FIFO at 10 images


def test_replayed_images_are_past_images():
    method, _ = build("cudfkd", replay=0.25, pool_size=64)
    for step in range(3):
        method.next_batch(progress(step))
    before = method.replay_pool.rows().clone()
    x = method.next_batch(progress(3)).x
    replayed = (x[6:] * 255).round().to(torch.uint8)
    assert all(any(torch.equal(r, p) for p in before) for r in replayed)


def test_reuse_runs_the_generator_once_per_reuse_steps_and_never_across_rounds():
    method, _ = build("cudfkd", reuse=4)
    sizes = count_forwards(method)
    batches = [method.next_batch(progress(step, kd_steps=6)).x for step in range(12)]
    assert len(sizes) == 4  # steps 0 and 4 of each 6-step round
    assert all(torch.equal(batches[0], batches[k]) for k in (1, 2, 3))
    assert not torch.equal(batches[3], batches[4]) and not torch.equal(batches[5], batches[6])


def test_reuse_with_replay_draws_the_replayed_share_anew():
    method, _ = build("cudfkd", reuse=3, replay=0.5)
    sizes = count_forwards(method)
    method.next_batch(progress(0))
    a, b = (method.next_batch(progress(step)).x for step in (3, 4))
    assert sizes == [8, 4]
    assert torch.equal(a[:4], b[:4]) and not torch.equal(a[4:], b[4:])


def test_student_augment_transforms_every_student_batch():
    method, _ = build("cudfkd", reuse=2, student_augment="crop_flip", student_padding=4)
    torch.manual_seed(0)
    a, b = method.next_batch(progress(0)).x, method.next_batch(progress(1)).x
    held = method._held
    assert not torch.equal(a, held) and not torch.equal(a, b)  # two views of the one held batch
    assert (a == 0).any() and not (held == 0).any()  # the crop's zero padding


def test_mix_mixes_the_student_batch():
    method, _ = build("cudfkd", mix="mixup", mix_alpha=0.5)
    x = method.next_batch(progress(0)).x
    held = method._held
    assert x.shape == held.shape and not torch.equal(x, held)
    assert held.min() <= x.min() and x.max() <= held.max()  # convex combinations of the batch's images


@pytest.mark.parametrize(
    ("name", "setting", "why"),
    [
        ("mb_dfkd", {}, "replay memory"),
        ("dafl", {"step": "joint"}, "step=joint"),
        ("zskt", {"loader": "shared"}, "loader=shared"),
    ],
)
def test_methods_that_make_their_own_student_batches_refuse_the_options(name, setting, why):
    with pytest.raises(ConfigError, match=f"{why} makes its own student batches, so reuse=2 would be ignored"):
        build(name, reuse=2, **setting)
    build(name, **setting)  # the defaults are fine


# -- the config ------------------------------------------------------------------------------------------------------

DEMO = "demo/fashion-mnist-cudfkd"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("method.replay=1", r"replay=1.0: the replayed fraction of a student batch is in \[0, 1\)"),
        ("method.replay=-0.1", r"replay=-0.1"),
        ("method.reuse=0", r"reuse=0: a generated batch serves at least one student step"),
        ("method.pool_size=0", r"pool_size=0"),
        ("method.mix_alpha=0", r"mix_alpha=0.0"),
        ("method.mix=blend", r"method.mix: 'blend' is not one of none, mixup, cutmix"),
        ("method.student_augment=jitter", r"method.student_augment: 'jitter' is not one of none, crop"),
    ],
)
def test_bad_option_values_are_one_line_config_errors(override, message):
    with pytest.raises(ConfigError, match=message) as err:
        load_config("distill", DEMO, [override])
    assert "\n" not in str(err.value)


def test_the_options_are_recipe_keys():
    over = [
        "method.replay=0.5",
        "method.pool_size=100",
        "method.reuse=2",
        "method.student_augment=crop_flip",
        "method.mix=cutmix",
        "method.mix_alpha=0.4",
    ]
    m = load_config("distill", DEMO, over).method
    assert (m.replay, m.pool_size, m.reuse, m.student_augment, m.mix, m.mix_alpha) == (
        0.5,
        100,
        2,
        "crop_flip",
        "cutmix",
        0.4,
    )


# -- end to end -------------------------------------------------------------------------------------------------------

OPTIONS = [
    "method.replay=0.5",
    "method.pool_size=96",
    "method.reuse=2",
    "method.student_augment=crop_flip",
    "method.mix=mixup",
]


def metrics(run):
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]


def distill_cfg(data_root, teacher_run, out, *extra):
    return load_config(
        "distill",
        "fashion-mnist/cudfkd-lenet5_bn-lenet5_half",
        [f"data.root={data_root}", f"teacher.weights={teacher_run}", f"out={out}", *TINY_DISTILL, *OPTIONS, *extra],
    )


def test_a_run_with_every_option_resumes_exactly(data_root, teacher_run, tmp_path):
    full = tmp_path / "full"
    summary = dfkd.distill(distill_cfg(data_root, teacher_run, full, "train.epochs=3"))
    assert summary["epochs"] == 3
    cut = tmp_path / "cut"
    with interrupted_after(2), pytest.raises(KeyboardInterrupt):
        dfkd.distill(distill_cfg(data_root, teacher_run, cut, "train.epochs=3"))
    dfkd.distill(distill_cfg(data_root, teacher_run, cut, "train.epochs=3"), resume=True)
    assert metrics(cut) == metrics(full)
    a = torch.load(full / "ckpt" / "last.pt", weights_only=True)
    b = torch.load(cut / "ckpt" / "last.pt", weights_only=True)
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    pool_a, pool_b = a["method"]["replay_pool._extra_state"], b["method"]["replay_pool._extra_state"]
    assert pool_a["n_added"] == pool_b["n_added"] > 0
    assert torch.equal(pool_a["rows"], pool_b["rows"])
