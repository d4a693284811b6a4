"""Every shipped recipe parses against the schema and builds what it names (the litgpt config-hub pattern)."""

from __future__ import annotations

import pytest
import torch

from dfkd.commands.bench import SUITES, suite_recipes
from dfkd.config import find_recipe, load_config, read_yaml, recipe_names
from dfkd.data import build_augment, dataset_info
from dfkd.engine.env import Env
from dfkd.methods import METHODS, Ctx, Progress
from dfkd.models import Normalized, create_model

RECIPES = recipe_names()
DISTILL = [name for name in RECIPES if "method" in read_yaml(find_recipe(name))]
SUPERVISED = [name for name in RECIPES if name not in DISTILL]


LENET_SUITE = suite_recipes(SUITES["fashion-mnist"], None)


def test_the_lenet_suite_has_one_row_per_method_and_no_variants():
    assert LENET_SUITE == [f"fashion-mnist/{m}-lenet5_bn-lenet5_half" for m in sorted(METHODS.names())]
    assert "fashion-mnist/dfad_original-lenet5_bn-lenet5_half" in DISTILL  # a recipe, not a row


@pytest.mark.parametrize("name", LENET_SUITE)
def test_fashion_mnist_lenet_recipes_share_the_demo_budget(name):
    """The `dfkd bench fashion-mnist` table compares every method on the same student-step budget."""
    reference = load_config("distill", "fashion-mnist/cudfkd-lenet5_bn-lenet5_half")
    cfg = load_config("distill", name)
    steps = cfg.train.epochs * cfg.train.rounds_per_epoch * cfg.train.kd_steps
    assert steps == reference.train.epochs * reference.train.rounds_per_epoch * reference.train.kd_steps
    assert cfg.train.batch_size == reference.train.batch_size
    assert (cfg.data.name, cfg.teacher.arch, cfg.student.arch) == ("fashion-mnist-32", "lenet5_bn", "lenet5_half")
    assert cfg.eval.window_start == reference.eval.window_start


def test_there_are_recipes_of_both_kinds():
    assert len(DISTILL) >= 5 and len(SUPERVISED) >= 5


@pytest.mark.parametrize("name", SUPERVISED)
def test_supervised_recipe_builds(name):
    cfg = load_config("train-teacher", name)
    info = dataset_info(cfg.data.name)
    model = create_model(cfg.model.arch, info.num_classes, info.image_shape[0])
    assert sum(p.numel() for p in model.parameters()) > 0
    build_augment(cfg.train.augment, padding=cfg.train.padding)


def tiny_bn_teacher(info):
    c = info.image_shape[0]
    net = torch.nn.Sequential(
        torch.nn.Conv2d(c, 4, 3, padding=1),
        torch.nn.BatchNorm2d(4),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(4, info.num_classes),
    )
    return Normalized(net, info.mean, info.std).eval().requires_grad_(False)


@pytest.mark.parametrize("name", DISTILL)
def test_distill_recipe_builds_and_runs_one_round(name):
    cfg = load_config("distill", name)
    data = read_yaml(find_recipe(name))
    expected = data.get("expected") or {}
    assert not expected or "source" in expected, "an expected number names its source"
    assert expected.get("top1") is None or expected.get("budget"), "an expected number names its budget"
    info = dataset_info(cfg.data.name)
    create_model(cfg.teacher.arch, info.num_classes, info.image_shape[0])
    student = Normalized(create_model("tiny_cnn", info.num_classes, info.image_shape[0]), info.mean, info.std)
    # the recipe's method, unchanged except for batch sizes small enough for a CPU test
    # (and a two-step synthesis round: inversion recipes run hundreds of steps per round; and a feature projection:
    # the tiny student's penultimate width is not the tiny teacher's)
    for key, value in {"synthesis_batch_size": 4, "g_steps": 2, "projection": "fixed"}.items():
        if hasattr(cfg.method, key):
            setattr(cfg.method, key, value)
    ctx = Ctx(tiny_bn_teacher(info), student, info, Env(torch.device("cpu")), batch_size=4)
    method = METHODS.get(cfg.method.name)(cfg.method, ctx)
    prog = Progress(0, 0, 0, cfg.train.epochs, cfg.train.rounds_per_epoch, cfg.train.kd_steps)
    logged = method.synthesize(prog)
    assert all(torch.isfinite(torch.as_tensor(v)).all() for v in logged.values())
    batch = method.next_batch(prog)
    assert batch.x.shape[1:] == info.image_shape and 0 <= batch.x.min() and batch.x.max() <= 1
    out = method.student_loss(batch, student, prog)
    assert torch.isfinite(out["loss"])
    method.close()


def test_the_demo_recipe_keeps_its_robustness_settings():
    """Without warm-up, clipping and the SPL floor, one blown-up step froze the demo's student for good (BENCHMARKS.md:
    seeds 0 and 4 of five sat at 10 % for a whole run on a Xeon)."""
    from dfkd.commands.demo import DISTILL_RECIPE

    cfg = load_config("distill", DISTILL_RECIPE)
    assert cfg.method.name == "cudfkd" and cfg.method.spl_floor > 0
    assert cfg.train.warmup_steps > 0 and cfg.train.grad_clip
    assert cfg.data.val_size > 0 and cfg.eval.split == "test"  # tuned on the slice, reported on the test set
    teacher = load_config("train-teacher", "teachers/fashion-mnist-32-lenet5_bn")
    assert teacher.data.val_size == cfg.data.val_size  # the teacher never trains on the tuning slice
