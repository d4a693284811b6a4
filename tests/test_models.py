"""Model zoo, generators, weight loading and the normalising wrapper (CPU, a few seconds)."""

from __future__ import annotations

import argparse
import functools
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from dfkd.errors import CheckpointError, ConfigError, DfkdError
from dfkd.models import (
    GENERATORS,
    MODELS,
    Normalized,
    bn_layers,
    build_network,
    classifier_module,
    create_generator,
    create_model,
    describe_model,
    init_dcgan_,
    load_weights,
    model_names,
    read_weights,
)

# The state-dict key names and shapes of the CMI model zoo (zju-vipa/CMI@9e79fa9:datafree/models/classifiers/:
# resnet.py, wresnet.py, vgg.py (vgg11_bn), lenet.py), whose published teacher checkpoints must load strictly.
FIXTURE = Path(__file__).parent / "fixtures" / "cmi-state-dict-keys.json"
CMI_KEYS: dict[str, dict[str, list[int]]] = json.loads(FIXTURE.read_text())["models"]


def _in_channels(name: str) -> int:
    return 1 if name.startswith("lenet") else 3


def _img_size(name: str) -> int:
    return 16 if name == "tiny_cnn" else 32


@functools.cache
def _shared_model(name: str, num_classes: int = 10) -> nn.Module:
    """A model for read-only checks (never load into it or train it)."""
    return create_model(name, num_classes, _in_channels(name)).eval()


def _n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


# ---------------------------------------------------------------- classifiers


def test_registry_holds_the_zoo():
    expected = {"lenet5", "lenet5_half", "lenet5_bn", "lenet5_half_bn", "resnet18", "resnet34", "tiny_cnn"}
    expected |= {"wrn16_1", "wrn16_2", "wrn40_1", "wrn40_2", "vgg11", "vgg11_bn"}
    assert expected <= set(model_names())
    assert model_names() == sorted(model_names())
    assert MODELS.get("vgg11") is MODELS.get("vgg11_bn")


@pytest.mark.parametrize("name", model_names())
def test_forward_gives_logits(name):
    model = _shared_model(name)
    size = _img_size(name)
    with torch.no_grad():
        logits = model(torch.rand(2, _in_channels(name), size, size))
    assert logits.shape == (2, 10)
    assert torch.isfinite(logits).all()
    assert model.arch == name
    line = describe_model(name)
    assert line and "\n" not in line


def test_num_classes_and_in_channels_are_used():
    for name in ("tiny_cnn", "wrn16_1", "lenet5_half"):
        model = create_model(name, num_classes=7, in_channels=2).eval()
        with torch.no_grad():
            assert model(torch.rand(2, 2, 32, 32)).shape == (2, 7)


@pytest.mark.parametrize("size", [4, 28, 64])
def test_tiny_cnn_any_size_trains(size):
    model = create_model("tiny_cnn", num_classes=5)
    loss = model(torch.rand(2, 3, size, size)).logsumexp(1).mean()
    loss.backward()
    # every parameter takes part in the output at any input size (no layer cut off by a too-small image)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_vgg_takes_64px_inputs():
    with torch.no_grad():
        assert _shared_model("vgg11")(torch.rand(1, 3, 64, 64)).shape == (1, 10)


def test_lenet_rejects_other_sizes():
    with pytest.raises(DfkdError, match="32x32"):
        _shared_model("lenet5")(torch.rand(2, 1, 28, 28))


def test_unknown_model_suggests_a_name():
    with pytest.raises(ConfigError, match="did you mean 'resnet18'"):
        create_model("resnet19")
    with pytest.raises(ConfigError, match="num_classes"):
        create_model("tiny_cnn", num_classes=0)


@pytest.mark.parametrize(
    "name, count",
    [
        ("resnet18", 11_173_962),
        ("resnet34", 21_282_122),
        ("wrn16_1", 175_066),
        ("wrn16_2", 691_674),
        ("wrn40_1", 563_930),
        ("wrn40_2", 2_243_546),
        ("vgg11", 9_231_114),
        ("lenet5", 61_706),
        ("lenet5_half", 15_738),
    ],
)
def test_parameter_counts(name, count):
    assert _n_params(_shared_model(name)) == count


def test_batchnorm_layers():
    assert len(bn_layers(_shared_model("resnet34"))) == 36
    wrn_bns = bn_layers(_shared_model("wrn40_2"))
    assert len(wrn_bns) == 37
    assert sum(bn.num_features for bn in wrn_bns) == 2704
    assert bn_layers(_shared_model("lenet5")) == []
    assert len(bn_layers(_shared_model("lenet5_bn"))) == 3
    assert len(bn_layers(Normalized(_shared_model("tiny_cnn"), [0.5] * 3, [0.5] * 3))) == 2


def test_wrn_init_follows_zskt():
    model = _shared_model("wrn40_2")
    conv = model.block3.layer[1].conv1
    expected_std = (2.0 / (3 * 3 * conv.out_channels)) ** 0.5
    assert conv.weight.std().item() == pytest.approx(expected_std, rel=0.05)
    assert torch.all(model.bn1.weight == 1) and torch.all(model.fc.bias == 0)


def test_vgg_init_follows_repdistiller():
    model = _shared_model("vgg11")
    assert model.classifier.weight.std().item() == pytest.approx(0.01, rel=0.1)
    assert torch.all(model.block3[0].bias == 0)


@pytest.mark.parametrize("entry", sorted(CMI_KEYS))
def test_state_dict_matches_cmi(entry):
    name, num_classes = entry.split("/")
    model = create_model(name, int(num_classes), _in_channels(name))
    expected = CMI_KEYS[entry]
    # Same keys, shapes and even order as CMI's classes.
    assert [(k, list(v.shape)) for k, v in model.state_dict().items()] == list(expected.items())
    # A checkpoint of exactly these shapes loads strictly, and the values arrive.
    fake = {
        k: torch.zeros((), dtype=torch.long) if k.endswith("num_batches_tracked") else torch.randn(shape)
        for k, shape in expected.items()
    }
    load_weights(model, fake, source=f"fixture {entry}")
    first = next(iter(expected))
    assert torch.equal(model.state_dict()[first], fake[first])
    model.load_state_dict(fake, strict=True)


# ---------------------------------------------------------------- generators


@pytest.mark.parametrize(
    "name, nz, count", [("dcgan", 256, 2_328_899), ("dcgan_large", 256, 4_581_955), ("dcgan_large", 512, 8_776_259)]
)
def test_generator_parameter_counts(name, nz, count):
    assert _n_params(create_generator(name, nz=nz, ngf=64, img_size=32, nc=3)) == count


def test_dcgan_large_depth2_is_cmi_large_generator():
    nz, ngf = 16, 8
    g = create_generator("dcgan_large", nz=nz, ngf=ngf, img_size=32, nc=3, depth=2)
    expected = {
        "l1.0.weight": [4 * ngf * 8 * 8, nz],
        "l1.0.bias": [4 * ngf * 8 * 8],
        "conv_blocks.0.weight": [4 * ngf],
        "conv_blocks.0.bias": [4 * ngf],
        "conv_blocks.2.weight": [2 * ngf, 4 * ngf, 3, 3],
        "conv_blocks.3.weight": [2 * ngf],
        "conv_blocks.3.bias": [2 * ngf],
        "conv_blocks.6.weight": [ngf, 2 * ngf, 3, 3],
        "conv_blocks.7.weight": [ngf],
        "conv_blocks.7.bias": [ngf],
        "conv_blocks.9.weight": [3, ngf, 3, 3],
        "conv_blocks.9.bias": [3],
    }
    assert {k: list(p.shape) for k, p in g.named_parameters()} == expected
    assert isinstance(g.conv_blocks[10], nn.Sigmoid)


@pytest.mark.parametrize(
    "name, img_size, nc, kw",
    [
        ("dcgan", 32, 3, {}),
        ("dcgan", 28, 1, {}),
        ("dcgan_large", 32, 3, {}),
        ("dcgan_large", 28, 1, {}),
        ("dcgan_large", 64, 3, {"depth": 3}),
    ],
)
def test_generator_output(name, img_size, nc, kw):
    g = create_generator(name, nz=32, ngf=8, img_size=img_size, nc=nc, **kw)
    x = g(torch.randn(2, 32))
    assert x.shape == (2, nc, img_size, img_size)
    assert x.min() >= 0 and x.max() <= 1
    assert g(torch.randn(2, 32, 1, 1)).shape == x.shape


def test_generator_errors():
    assert set(GENERATORS.names()) >= {"dcgan", "dcgan_large"}
    with pytest.raises(ConfigError, match="divisible by 4"):
        create_generator("dcgan", nz=8, ngf=8, img_size=30, nc=3)
    with pytest.raises(ConfigError, match="divisible by 8"):
        create_generator("dcgan_large", nz=8, ngf=8, img_size=28, nc=3, depth=3)
    with pytest.raises(ConfigError, match="depth"):
        create_generator("dcgan", nz=8, ngf=8, img_size=32, nc=3, depth=3)
    with pytest.raises(ConfigError, match="did you mean 'dcgan'"):
        create_generator("dcgann", nz=8, ngf=8, img_size=32, nc=3)


def test_init_dcgan_statistics():
    torch.manual_seed(0)
    g = create_generator("dcgan", nz=64, ngf=32, img_size=32, nc=3)
    assert init_dcgan_(g) is g
    w = g.l1[0].weight
    assert w.mean().item() == pytest.approx(0.0, abs=1e-3)
    assert w.std().item() == pytest.approx(0.02, rel=0.02)
    assert g.conv_blocks[2].weight.std().item() == pytest.approx(0.02, rel=0.05)
    bn_w = torch.cat([bn.weight for bn in bn_layers(g)])
    assert bn_w.mean().item() == pytest.approx(1.0, abs=0.01)
    assert bn_w.std().item() == pytest.approx(0.02, rel=0.3)
    biases = [m.bias for m in g.modules() if getattr(m, "bias", None) is not None]
    assert biases and all(torch.all(b == 0) for b in biases)
    init_dcgan_(nn.Sequential(nn.BatchNorm2d(3, affine=False)))


# ---------------------------------------------------------------- reading and loading weights


def _tiny_state(num_classes: int = 10, in_channels: int = 3) -> dict[str, torch.Tensor]:
    return create_model("tiny_cnn", num_classes, in_channels).state_dict()


@pytest.mark.parametrize(
    "layout, prefix",
    [
        ("raw", ""),
        ("state_dict", ""),
        ("model", ""),
        ("raw", "module."),
        ("state_dict", "module._orig_mod."),
        ("model", "_orig_mod.module."),
    ],
)
def test_read_weights_layouts(tmp_path, layout, prefix):
    state = _tiny_state()
    stored = {prefix + k: v for k, v in state.items()}
    if layout == "raw":
        obj = stored
    else:
        obj = {layout: stored, "arch": "tiny_cnn", "num_classes": 10, "top1": 0.5, "optimizer": {"state": {}}}
    path = tmp_path / "w.pt"
    torch.save(obj, path)
    read, meta = read_weights(str(path))
    assert list(read) == list(state)
    assert all(torch.equal(read[k], state[k]) for k in state)
    assert meta == ({} if layout == "raw" else {"arch": "tiny_cnn", "num_classes": 10, "top1": 0.5})


def test_read_weights_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        read_weights(tmp_path / "nope.pt")
    with pytest.raises(CheckpointError, match="not a file"):
        read_weights(tmp_path)
    text = tmp_path / "notes.txt"
    text.write_text("hello\n")
    with pytest.raises(CheckpointError, match=r"not a PyTorch checkpoint.*torch\.save"):
        read_weights(text)
    pickled = tmp_path / "args.pt"
    torch.save({"state_dict": _tiny_state(), "args": argparse.Namespace(lr=0.1)}, pickled)
    with pytest.raises(CheckpointError, match=r"argparse\.Namespace.*torch\.save"):
        read_weights(pickled)
    empty = tmp_path / "empty.pt"
    torch.save({"epoch": 3, "best_acc": 0.9}, empty)
    with pytest.raises(CheckpointError, match="holds no tensors.*'epoch'"):
        read_weights(empty)
    listed = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], listed)
    with pytest.raises(CheckpointError, match="holds a list"):
        read_weights(listed)


def test_load_weights_class_count_mismatch():
    model = create_model("tiny_cnn", num_classes=10)
    with pytest.raises(CheckpointError) as e:
        load_weights(model, _tiny_state(num_classes=100), source="teacher checkpoint t.pt")
    msg = str(e.value)
    assert msg.startswith("teacher checkpoint t.pt does not fit tiny_cnn")
    assert "trained for 100 classes but the dataset has 10" in msg
    assert "'fc.weight' has shape [100, 32] in the file but [10, 32] in the model" in msg
    assert "\n" not in msg


def test_load_weights_shape_mismatch():
    model = create_model("lenet5", in_channels=3)
    state = create_model("lenet5", in_channels=1).state_dict()
    with pytest.raises(CheckpointError) as e:
        load_weights(model, state)
    msg = str(e.value)
    assert "'features.0.weight' has shape [6, 1, 5, 5] in the file but [6, 3, 5, 5] in the model" in msg
    assert "classes" not in msg


def test_load_weights_missing_and_unexpected_keys():
    model = create_model("tiny_cnn")
    state = _tiny_state()
    del state["fc.weight"]
    state["extra.a"] = state["extra.b"] = state["extra.c"] = state["extra.d"] = torch.zeros(1)
    with pytest.raises(CheckpointError) as e:
        load_weights(model, state, source="student checkpoint s.pt")
    msg = str(e.value)
    assert "1 keys of the model are missing from it ('fc.weight')" in msg
    assert "4 keys in it are unknown to the model ('extra.a', 'extra.b', 'extra.c', ...)" in msg
    with pytest.raises(CheckpointError, match="11 keys of the model are missing .* and 9 keys in it are unknown"):
        load_weights(model, create_model("lenet5").state_dict())


def test_load_weights_success_paths():
    source = create_model("tiny_cnn")
    state = {k: v for k, v in source.state_dict().items() if not k.endswith("num_batches_tracked")}
    target = Normalized(create_model("tiny_cnn"), [0.5] * 3, [0.2] * 3)
    load_weights(target, state)
    assert torch.equal(target.net.fc.weight, source.fc.weight)


def test_build_network(tmp_path):
    teacher = create_model("tiny_cnn", num_classes=4)
    path = tmp_path / "best.pt"
    torch.save({"state_dict": teacher.state_dict(), "arch": "tiny_cnn", "num_classes": 4}, path)
    net = build_network("tiny_cnn", num_classes=4, in_channels=3, weights=str(path))
    assert torch.equal(net.fc.weight, teacher.fc.weight)
    given = create_model("tiny_cnn", num_classes=4)
    assert build_network(given, weights=path) is given
    assert torch.equal(given.fc.weight, teacher.fc.weight)
    with pytest.raises(CheckpointError, match=f"teacher checkpoint {path} .*trained for 4 classes .* has 10"):
        build_network("tiny_cnn", num_classes=10, weights=str(path), role="teacher")
    with pytest.raises(CheckpointError, match="holds a tiny_cnn .* but lenet5 was asked for"):
        build_network("lenet5", num_classes=4, weights=str(path))
    assert isinstance(build_network("lenet5_half", 10, 1), nn.Module)


def test_classifier_module():
    assert classifier_module(_shared_model("resnet18")) is _shared_model("resnet18").linear
    assert classifier_module(_shared_model("wrn16_1")) is _shared_model("wrn16_1").fc
    assert classifier_module(_shared_model("vgg11")) is _shared_model("vgg11").classifier
    lenet = _shared_model("lenet5")
    # DAFL's LeNet feature is the 120-d conv output, which enters fc.0.
    assert classifier_module(Normalized(lenet, [0.5], [0.5])) is lenet.fc[0]
    assert classifier_module(lenet).in_features == 120
    with pytest.raises(DfkdError, match="no nn.Linear"):
        classifier_module(nn.Sequential(nn.Conv2d(3, 3, 1)))


# ---------------------------------------------------------------- Normalized


def test_normalized_math():
    mean, std = [0.4914, 0.4822, 0.4465], [0.2023, 0.1994, 0.2010]
    model = Normalized(nn.Identity(), mean, std)
    x = torch.rand(2, 3, 4, 4)
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(model(x), (x - m) / s)
    torch.testing.assert_close(model.denormalize(model(x)), x)
    assert model.mean.shape == (1, 3, 1, 1)
    assert model.to(torch.float64).std.dtype == torch.float64


def test_normalized_state_dict_is_the_inner_one():
    net = create_model("tiny_cnn")
    wrapped = Normalized(net, [0.5] * 3, [0.5] * 3)
    assert list(wrapped.state_dict()) == [f"net.{k}" for k in net.state_dict()]
    with pytest.raises(ConfigError, match="2 mean values but 3 std"):
        Normalized(net, [0.5, 0.5], [0.5] * 3)
    with pytest.raises(ConfigError, match="positive"):
        Normalized(net, [0.5], [0.0])
