"""The recipe and override contract: typed defaults, YAML recipes, key=value overrides, one-line errors."""

from __future__ import annotations

import pytest

from dfkd.config import build, load_config, parse_overrides, recipe_names, to_dict, to_yaml
from dfkd.errors import ConfigError

DEMO = "fashion-mnist/cudfkd-lenet5_bn-lenet5_half"


def test_overrides_are_typed_and_nested():
    cfg = load_config("distill", DEMO, ["train.epochs=3", "method.lr_g=1e-3", "engine.channels_last=yes", "out=x"])
    assert cfg.train.epochs == 3 and isinstance(cfg.train.epochs, int)
    assert cfg.method.lr_g == pytest.approx(1e-3) and isinstance(cfg.method.lr_g, float)
    assert cfg.engine.channels_last is True
    assert cfg.out == "x"
    assert cfg.method.name == "cudfkd"


def test_required_keys_exist_with_their_meaning():
    cfg = load_config(
        "distill",
        DEMO,
        [
            "data.name=fashion-mnist-32",
            "data.root=/data",
            "teacher.arch=lenet5_bn",
            "teacher.weights=t.pt",
            "student.arch=lenet5_half",
            "method.name=cudfkd",
            "train.epochs=1",
            "train.batch_size=8",
            "engine.device=cpu",
            "engine.seed=7",
            "out=runs/x",
        ],
    )
    assert (cfg.data.root, cfg.teacher.weights, cfg.train.batch_size, cfg.engine.seed) == ("/data", "t.pt", 8, 7)


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("train.epoch=3", "unknown config key 'train.epoch' (did you mean 'train.epochs'?)"),
        ("trian.epochs=3", "unknown config key 'trian'"),
        ("method.lr_gg=1", "unknown config key 'method.lr_gg' (did you mean 'method.lr_g'?)"),
        ("train.epochs=abc", "train.epochs: expected an integer, got 'abc'"),
        ("train.epochs=1.5", "train.epochs: expected an integer"),
        ("engine.channels_last=maybe", "engine.channels_last: expected true or false"),
        ("method.loss=l3", "method.loss: 'l3' is not one of l1, kl, l2"),
        ("method.name=cudfk", "unknown method 'cudfk' (did you mean 'cudfkd'?)"),
        ("train.epochs", "is not of the form key=value"),
        ("train.epochs=0", "train: epochs=0: give epochs >= 1"),
        ("train.kd_steps=-1", "train: kd_steps=-1: give kd_steps >= 1"),
    ],
)
def test_bad_overrides_name_the_key(override, fragment):
    with pytest.raises(ConfigError) as err:
        load_config("distill", DEMO, [override])
    assert fragment in str(err.value)
    assert "\n" not in str(err.value)


def test_unknown_recipe_suggests_the_closest():
    with pytest.raises(ConfigError, match=r"unknown recipe 'fashion-mnist/cudfkd-lenet5_bn-lenet5_hal'.*did you mean"):
        load_config("distill", "fashion-mnist/cudfkd-lenet5_bn-lenet5_hal")


def test_recipe_from_a_path_and_yaml_errors(tmp_path):
    good = tmp_path / "r.yaml"
    good.write_text("method: {name: cudfkd, nz: 8}\ntrain: {epochs: 2}\n")
    cfg = load_config("distill", str(good))
    assert cfg.method.nz == 8 and cfg.train.epochs == 2
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {epochs: [1\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config("distill", str(bad))
    listing = tmp_path / "list.yaml"
    listing.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="YAML mapping"):
        load_config("distill", str(listing))


def test_recipe_kind_mismatch_is_explained():
    with pytest.raises(ConfigError, match="dfkd train-teacher"):
        load_config("distill", "teachers/fashion-mnist-32-lenet5_bn")
    with pytest.raises(ConfigError, match="dfkd distill"):
        load_config("train-teacher", DEMO)


def test_method_name_is_required():
    with pytest.raises(ConfigError, match="method.name is not set"):
        load_config("distill", None, ["train.epochs=1"])


def test_resolved_config_round_trips_through_yaml(tmp_path):
    import yaml

    cfg = load_config("distill", DEMO, ["train.epochs=3"])
    data = yaml.safe_load(to_yaml(cfg))
    path = tmp_path / "config.yaml"
    path.write_text(to_yaml(cfg))
    assert to_dict(load_config("distill", str(path))) == to_dict(cfg) == data


def test_parse_overrides_values():
    assert parse_overrides(["a.b=1", "a.c=[1, 2]", "d=null", "e="]) == {
        "a": {"b": 1, "c": [1, 2]},
        "d": None,
        "e": None,
    }


def test_list_coercion_and_optional():
    from dfkd.config import DistillTrainConfig

    cfg = build(DistillTrainConfig, {"milestones": "10,20", "grad_clip": "null"}, "train")
    assert cfg.milestones == [10, 20] and cfg.grad_clip is None


def test_recipes_are_found():
    names = recipe_names()
    assert DEMO in names and "cifar10/cudfkd-resnet34-resnet18" in names and "teachers/cifar10-resnet34" in names


def test_a_teacher_run_needs_an_epoch():
    with pytest.raises(ConfigError, match="epochs=0: give epochs >= 1"):
        load_config("train-teacher", "teachers/fashion-mnist-32-lenet5_bn", ["train.epochs=0"])
