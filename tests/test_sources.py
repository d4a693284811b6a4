"""Teachers from outside the zoo: py: factories, torch.hub directories, TorchScript files, timm and torchvision.

Everything here builds its models locally: no test downloads anything. timm and torchvision are tested for real
only where they import: timm imports torchvision, and PyPI's torchvision wheels for x86-64 Linux are CUDA builds whose
operators do not load beside a CPU-only torch. Their download-failure paths run everywhere against stand-in modules.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import os
import sys
import types
import urllib.error

import pytest
import torch
from helpers import TINY_DISTILL, assert_one_line_error, run_cli, save_png
from torch import nn

from dfkd.commands.bench import TINY_METHOD
from dfkd.commands.cli import main
from dfkd.data import DatasetInfo, dataset_info, load_split
from dfkd.engine.common import build_model
from dfkd.engine.env import Env
from dfkd.engine.evaluate import predict
from dfkd.errors import CheckpointError, ConfigError
from dfkd.methods import METHODS, Ctx, Progress
from dfkd.models import Normalized, build_network, create_model
from dfkd.models.meta import TeacherMeta, teacher_meta
from dfkd.models.sources import is_external_arch, is_torchscript, timm_meta, torchvision_meta

INFO = DatasetInfo("tiny", 4, (3, 16, 16), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), tuple("abcd"), "16x16 test images")
CPU = Env(torch.device("cpu"))
MODULE = "dfkd_test_teachers"

FACTORIES = '''
import torch
from torch import nn

from dfkd.models.meta import TeacherMeta, attach_meta


class Net(nn.Module):
    """conv(-BN)-ReLU x2, global pool, linear: 3x16x16 -> 4 logits."""

    def __init__(self, batch_norm: bool):
        super().__init__()
        norm = nn.BatchNorm2d if batch_norm else lambda c: nn.Identity()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), norm(8), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1), norm(16), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        return self.fc(self.features(x))


def with_bn():
    torch.manual_seed(1)
    net = Net(batch_norm=True)
    net.train()
    with torch.no_grad():  # non-trivial running statistics
        net(torch.rand(16, 3, 16, 16) * 4 - 2)
    return net.eval()


def without_bn():
    torch.manual_seed(1)
    return Net(batch_norm=False)


def with_meta():
    meta = TeacherMeta(mean=(0.1, 0.2, 0.3), std=(0.5, 0.6, 0.7), input_shape=(3, 16, 16), num_classes=4)
    return attach_meta(with_bn(), meta)


def for_8px():
    return attach_meta(with_bn(), TeacherMeta(input_shape=(3, 8, 8)))


def conv_head():
    """Logits from a 1x1 conv and global pooling: no nn.Linear, so no penultimate feature to hook."""
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())


def not_a_module():
    return 42


def needs_width(width):
    return Net(batch_norm=True)


def broken():
    raise ValueError("no such layer\\nsecond line")
'''


@pytest.fixture
def factories(tmp_path, monkeypatch):
    """A module of teacher factories importable as ``dfkd_test_teachers`` (as a user's own file would be)."""
    folder = tmp_path / "pkg"
    folder.mkdir()
    (folder / f"{MODULE}.py").write_text(FACTORIES)
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.delitem(sys.modules, MODULE, raising=False)
    return folder


def trusted(spec: str, *args, **kwargs) -> nn.Module:
    """``build_network`` for a spec whose code the test trusts (its own factories, hub folders, TorchScript files)."""
    return build_network(spec, *args, trust_code=True, **kwargs)


def eager(factory: str) -> nn.Module:
    return getattr(sys.modules[MODULE], factory)()


def test_which_arch_strings_name_sources(tmp_path):
    assert not is_external_arch("lenet5_bn") and not is_external_arch("") and not is_external_arch(None)
    for spec in ("py:a.b:c", "timm:resnet18", "torchvision:resnet18:DEFAULT", "hub:o/r:e", "torchscript:x.pt"):
        assert is_external_arch(spec), spec
    path = tmp_path / "model.ts"
    assert not is_external_arch(str(path))  # a bare path counts once the file is there
    path.write_bytes(b"x")
    assert is_external_arch(str(path))


def test_py_factory_builds_the_network_and_names_its_source(factories):
    net = trusted(f"py:{MODULE}:with_bn", role="teacher")
    x = torch.rand(2, 3, 16, 16)
    assert torch.equal(net(x), eager("with_bn")(x))
    assert teacher_meta(net) == TeacherMeta(source=f"py:{MODULE}:with_bn")


def test_teacher_weights_fill_a_py_model(factories, tmp_path):
    trusted(f"py:{MODULE}:with_bn")  # imports the module
    torch.manual_seed(7)
    trained = sys.modules[MODULE].Net(batch_norm=True)
    path = tmp_path / "w.pt"
    torch.save({"state_dict": trained.state_dict()}, path)
    net = trusted(f"py:{MODULE}:with_bn", weights=path, role="teacher")
    for key, value in trained.state_dict().items():
        assert torch.equal(net.state_dict()[key], value), key
    torch.save(create_model("tiny_cnn", 4, 3).state_dict(), tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="teacher weights .*other.pt does not fit"):
        trusted(f"py:{MODULE}:with_bn", weights=tmp_path / "other.pt", role="teacher")


def test_the_sources_mean_std_reach_the_normalising_wrapper(factories, caplog):
    caplog.set_level("INFO", logger="dfkd")
    own = build_model(f"py:{MODULE}:with_meta", INFO, CPU, None, "teacher", trust_code=True)
    assert isinstance(own, Normalized)
    assert torch.allclose(own.mean.flatten(), torch.tensor([0.1, 0.2, 0.3]))
    assert torch.allclose(own.std.flatten(), torch.tensor([0.5, 0.6, 0.7]))
    assert "normalising with its own mean" in caplog.text
    x = torch.rand(2, 3, 16, 16)
    expected = eager("with_bn")(
        (x - torch.tensor([0.1, 0.2, 0.3]).view(1, 3, 1, 1)) / torch.tensor([0.5, 0.6, 0.7]).view(1, 3, 1, 1)
    )
    assert torch.allclose(own.eval()(x), expected, atol=1e-6)
    plain = build_model(f"py:{MODULE}:with_bn", INFO, CPU, None, "teacher", trust_code=True)
    assert torch.allclose(plain.mean.flatten(), torch.tensor(INFO.mean))
    assert "normalising with dataset tiny's mean/std" in caplog.text


def test_a_teacher_for_another_image_size_is_refused(factories):
    with pytest.raises(ConfigError, match=r"expects 3x8x8 images but dataset tiny has 3x16x16: .*data\.name=none"):
        build_model(f"py:{MODULE}:for_8px", INFO, CPU, None, "teacher", trust_code=True)


@pytest.mark.parametrize(
    "spec, fragment",
    [
        ("foo:bar", "unknown source 'foo:'"),
        ("py:", "names nothing after 'py:'"),
        ("py:no_such_module_xyz:f", "there is no module 'no_such_module_xyz'"),
        (f"py:{MODULE}:with_bm", f"{MODULE} has no 'with_bm' (did you mean 'with_bn'?)"),
        (f"py:{MODULE}:not_a_module", "not_a_module() returned a int, not an nn.Module"),
        (f"py:{MODULE}:needs_width", "needs the arguments width"),
        (f"py:{MODULE}:broken", "calling broken() failed (ValueError: no such layer second line)"),
        (f"py:{MODULE}", "give py:package.module:function"),
        ("torchscript:/no/such/file.ts", "the TorchScript file /no/such/file.ts does not exist"),
    ],
)
def test_bad_specs_give_one_line_errors(factories, spec, fragment):
    with pytest.raises(ConfigError) as info:
        trusted(spec, role="teacher")
    message = str(info.value)
    assert fragment in message and "\n" not in message
    assert message.startswith(f"teacher.arch={spec}")


# -- torch.hub ----------------------------------------------------------------------------------------------------

HUBCONF = '''
dependencies = ["torch"]

from torch import nn


def tiny(pretrained=False):
    """A 4-class classifier of 3x16x16 images."""
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 4))
'''


def test_local_hub_directory(tmp_path):
    hub = tmp_path / "my_hub"
    hub.mkdir()
    (hub / "hubconf.py").write_text(HUBCONF)
    net = trusted(f"hub:{hub}:tiny", role="teacher")
    assert net(torch.rand(2, 3, 16, 16)).shape == (2, 4)
    assert teacher_meta(net).source == f"hub:{hub}:tiny"
    state = {k: torch.full_like(v, 0.5) for k, v in net.state_dict().items()}
    torch.save(state, tmp_path / "w.pt")
    filled = trusted(f"hub:{hub}:tiny", weights=tmp_path / "w.pt", role="teacher")
    assert all(torch.all(v == 0.5) for v in filled.state_dict().values())
    with pytest.raises(ConfigError, match="hubconf.py has no entry 'huge'"):
        trusted(f"hub:{hub}:huge", role="teacher")
    with pytest.raises(ConfigError, match="is not a directory with a hubconf.py"):
        trusted(f"hub:{tmp_path}:tiny", role="teacher")


def test_hub_fetch_failure_says_to_clone(monkeypatch):
    def offline(repo, entry, **kwargs):
        assert kwargs["source"] == "github"
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "load", offline)
    with pytest.raises(ConfigError) as info:
        trusted("hub:github:someone/models:v1.0:resnet8", role="teacher")
    message = str(info.value)
    assert "could not fetch someone/models:v1.0 from GitHub (URLError" in message
    assert "teacher.arch=hub:/path/to/clone:resnet8" in message and "\n" not in message


# -- TorchScript --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["script", "trace"])
def test_torchscript_file_as_teacher(factories, tmp_path, how):
    trusted(f"py:{MODULE}:with_bn")  # imports the factories
    net = eager("with_bn")
    x = torch.rand(2, 3, 16, 16)
    scripted = torch.jit.script(net) if how == "script" else torch.jit.trace(net, x)
    path = tmp_path / "teacher.ts"
    scripted.save(str(path))
    for spec in (f"torchscript:{path}", str(path)):
        loaded = trusted(spec, role="teacher")
        assert is_torchscript(loaded) and teacher_meta(loaded).source == spec
        assert torch.allclose(loaded(x), net(x), atol=1e-6)
    with pytest.raises(ConfigError, match="a TorchScript file holds its own weights; drop teacher.weights"):
        torch.save(net.state_dict(), tmp_path / "w.pt")
        trusted(str(path), weights=tmp_path / "w.pt", role="teacher")
    with pytest.raises(ConfigError, match=r"is not a TorchScript archive; .*pass a state dict as teacher.weights"):
        trusted(str(tmp_path / "w.pt"), role="teacher")


def test_forward_hooks_cannot_go_on_scripted_modules(factories, tmp_path):
    """The premise of the TorchScript refusals below: PyTorch refuses hooks on scripted submodules."""
    trusted(f"py:{MODULE}:with_bn")
    scripted = torch.jit.script(eager("with_bn"))
    bn = scripted.features._modules["1"]
    assert bn.original_name == "BatchNorm2d" and not isinstance(bn, nn.BatchNorm2d)
    with pytest.raises(RuntimeError, match="not supported on ScriptModules"):
        bn.register_forward_hook(lambda *args: None)


# -- the methods against BN-less and TorchScript teachers ---------------------------------------------------------


def method_config(name: str, **changes):
    cls = METHODS.get(name).Config
    fields = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in {**TINY_METHOD, "g_steps": 2, **changes}.items() if k in fields})


def one_round(name: str, teacher: nn.Module, cfg) -> dict:
    torch.manual_seed(0)
    student = Normalized(create_model("tiny_cnn", 4, 3), INFO.mean, INFO.std)
    method = METHODS.get(name)(cfg, Ctx(teacher, student, INFO, CPU, batch_size=8))
    try:
        prog = Progress(0, 0, 0, 1, 1, 1)
        logs = dict(method.synthesize(prog))
        out = method.student_loss(method.next_batch(prog), student, prog)
        out["loss"].backward()
        logs.update(out)
    finally:
        method.close()
    return logs


def frozen_teacher(net: nn.Module) -> nn.Module:
    return Normalized(net, INFO.mean, INFO.std).eval().requires_grad_(False)


@pytest.mark.parametrize("name", METHODS.names())
def test_bn_less_teacher_with_a_bn_method_names_the_option(factories, name):
    teacher = frozen_teacher(trusted(f"py:{MODULE}:without_bn", role="teacher"))
    changes = {}
    if getattr(METHODS.get(name).Config, "bn", 0) > 0:
        with pytest.raises(ConfigError) as info:
            one_round(name, teacher, method_config(name))
        message = str(info.value)
        assert message.startswith(f"{name}: method.bn > 0 needs a teacher with BatchNorm2d layers")
        assert f"py:{MODULE}:without_bn has none; set method.bn=0" in message
        changes["bn"] = 0.0
    if name == "cmi":  # its contrastive features default to the BN layers: name others
        changes["feature_layers"] = ["features.2", "features.6"]
    logs = one_round(name, teacher, method_config(name, **changes))
    assert all(torch.isfinite(torch.as_tensor(v, dtype=torch.float64)).all() for v in logs.values())


def test_activation_loss_on_a_teacher_without_linear_layer_names_the_option(factories):
    teacher = frozen_teacher(trusted(f"py:{MODULE}:conv_head", role="teacher"))
    with pytest.raises(
        ConfigError, match=r"^dafl: method.act != 0 hooks .*has no nn.Linear layer.*; set method.act=0$"
    ):
        one_round("dafl", teacher, method_config("dafl"))
    logs = one_round("dafl", teacher, method_config("dafl", act=0.0))
    assert all(torch.isfinite(torch.as_tensor(v, dtype=torch.float64)).all() for v in logs.values())


# What each method does with a TorchScript teacher: the options that turn off its terms that hook the teacher's
# layers (each refused by name while on), or REFUSED where a hooked term is the method itself.
REFUSED = "refused"
TORCHSCRIPT_TEACHER = {
    "adadfkd": REFUSED,  # its contrastive loss on penultimate features
    "cmi": REFUSED,  # its contrastive loss on layer features
    "cudfkd": ("bn",),
    "dafl": ("act",),
    "deepinv": ("bn",),
    "dfad": (),  # logits only
    "dfq": ("bn",),
    "fastdfkd": ("bn",),
    "mb_dfkd": ("act",),
    "nayer": ("bn",),
    "pre_dfkd": ("act",),
    "zskt": (),  # logits only (its attention transfer is off by default)
}


def test_every_method_states_what_it_does_with_a_torchscript_teacher():
    assert sorted(TORCHSCRIPT_TEACHER) == METHODS.names()


def assert_torchscript_refusal(name: str, message: str) -> None:
    assert message.startswith(f"{name}: the ") and "which a TorchScript teacher does not allow" in message
    assert "teacher.arch=py:MODULE:FUNCTION or hub:DIR:ENTRY" in message and "\n" not in message


@pytest.mark.parametrize("name", METHODS.names())
def test_torchscript_teacher_runs_logit_methods_and_refuses_hooks(factories, tmp_path, name):
    trusted(f"py:{MODULE}:with_bn")
    path = tmp_path / "t.ts"
    torch.jit.script(eager("with_bn")).save(str(path))
    teacher = frozen_teacher(trusted(f"torchscript:{path}", role="teacher"))
    expected = TORCHSCRIPT_TEACHER[name]
    if expected == REFUSED:  # nothing turns the term off
        with pytest.raises(ConfigError) as refused:
            one_round(name, teacher, method_config(name))
        assert_torchscript_refusal(name, str(refused.value))
        assert f"{name} cannot run without its" in str(refused.value)
        return
    for option in expected:  # on, the term is refused and the message names its option
        with pytest.raises(ConfigError) as refused:
            one_round(name, teacher, method_config(name, **{o: 0.0 for o in expected if o != option}))
        assert_torchscript_refusal(name, str(refused.value))
        assert f"set method.{option}=0 to drop" in str(refused.value)
    logs = one_round(name, teacher, method_config(name, **{o: 0.0 for o in expected}))
    assert all(torch.isfinite(torch.as_tensor(v, dtype=torch.float64)).all() for v in logs.values())
    if name == "zskt":
        with pytest.raises(ConfigError, match="attention transfer hooks .* or set method.beta=0"):
            one_round(name, teacher, method_config(name, beta=1.0))


# -- timm and torchvision -----------------------------------------------------------------------------------------


def import_or_skip(name: str):
    """The module, or a skip where it does not import; `make test-timm` sets DFKD_REQUIRE_TIMM=1: a failure there."""
    try:
        return __import__(name)
    except Exception as e:  # torchvision built for CUDA torch fails with more than ImportError
        if os.environ.get("DFKD_REQUIRE_TIMM") == "1":
            raise
        pytest.skip(f"{name} does not import here: {type(e).__name__}: {e}")


def test_timm_metadata_from_pretrained_cfg():
    net = nn.Linear(2, 3)
    net.num_classes = 3
    net.pretrained_cfg = {
        "mean": (0.4, 0.5, 0.6),
        "std": [0.2, 0.3, 0.4],
        "input_size": (3, 64, 48),
        "num_classes": 1000,
        "label_names": ["x", "y", "z"],
    }
    meta = timm_meta(net, "timm:tiny")
    assert meta == TeacherMeta((0.4, 0.5, 0.6), (0.2, 0.3, 0.4), (3, 64, 48), 3, ("x", "y", "z"), "timm:tiny")


def test_timm_for_real_without_download(tmp_path):
    timm = import_or_skip("timm")
    torch.save(timm.create_model("resnet18", pretrained=False, num_classes=5).state_dict(), tmp_path / "r.pt")
    net = build_network("timm:resnet18", weights=tmp_path / "r.pt", role="teacher")
    meta = teacher_meta(net)
    assert meta.num_classes == 5 and meta.input_shape == (3, 224, 224) and meta.source == "timm:resnet18"
    assert meta.mean == pytest.approx(timm.data.IMAGENET_DEFAULT_MEAN)
    assert meta.std == pytest.approx(timm.data.IMAGENET_DEFAULT_STD)
    assert net(torch.rand(1, 3, 224, 224)).shape == (1, 5)
    torch.save(timm.create_model("resnet18", pretrained=False).state_dict(), tmp_path / "in1k.pt")
    meta = teacher_meta(build_network("timm:resnet18", weights=tmp_path / "in1k.pt", role="teacher"))
    assert meta.num_classes == 1000 and meta.classes == imagenet_classes(timm)
    assert meta.classes[0].startswith("tench")


def imagenet_classes(timm) -> tuple[str, ...]:
    return tuple(timm.data.ImageNetInfo().label_descriptions())


def fake_module(monkeypatch, name: str, **attrs) -> None:
    module = types.ModuleType(name)
    for key, value in attrs.items():
        setattr(module, key, value)
    monkeypatch.setitem(sys.modules, name, module)
    parent, _, child = name.rpartition(".")
    if parent:
        setattr(sys.modules[parent], child, module)


def test_timm_fetch_failure_says_how_to_pass_a_file(monkeypatch):
    def create_model(name, pretrained=False, **kwargs):
        if name == "nosuch":
            raise RuntimeError(f"Unknown model ({name})")
        raise OSError(f"We couldn't connect to 'https://huggingface.co' to load the files of {name}")

    fake_module(monkeypatch, "timm", create_model=create_model)
    with pytest.raises(ConfigError) as info:
        build_network("timm:hf-hub:org/net", role="teacher")
    message = str(info.value)
    assert message.startswith(
        "teacher.arch=timm:hf-hub:org/net: could not fetch its pretrained weights (OSError: We couldn't"
    )
    assert message.endswith("pass it as teacher.weights=FILE")
    with pytest.raises(ConfigError, match="timm has no model 'nosuch'"):
        build_network("timm:nosuch", role="teacher")
    # an HTTP library's own error, not an OSError (httpx, which newer huggingface_hub uses)
    connect_error = type("ConnectError", (Exception,), {"__module__": "httpx"})

    def create_model_httpx(name, pretrained=False, **kwargs):
        raise connect_error("[Errno 111] Connection refused")

    fake_module(monkeypatch, "timm", create_model=create_model_httpx)
    with pytest.raises(ConfigError, match=r"could not fetch its pretrained weights \(ConnectError: \[Errno 111\]"):
        build_network("timm:resnet18", role="teacher")


class FakeWeights(enum.Enum):
    """A torchvision weights enum in miniature: transforms() and meta as torchvision's members have them."""

    V1 = "v1"
    DEFAULT = "v1"

    def transforms(self):
        return types.SimpleNamespace(mean=[0.4, 0.5, 0.6], std=[0.2, 0.2, 0.2], crop_size=[16], resize_size=[20])

    @property
    def meta(self):
        return {"categories": ["w", "x", "y", "z"]}


def test_torchvision_metadata_and_fetch_failure(monkeypatch, tmp_path):
    meta = torchvision_meta(FakeWeights.V1, "torchvision:tiny:V1")
    assert meta == TeacherMeta((0.4, 0.5, 0.6), (0.2, 0.2, 0.2), (3, 16, 16), 4, tuple("wxyz"), "torchvision:tiny:V1")
    calls = []

    def get_model(name, weights=None, num_classes=1000):
        calls.append((weights, num_classes))
        if weights is not None:
            raise urllib.error.URLError("no network")
        return nn.Sequential(nn.Conv2d(3, 2, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2, num_classes))

    def get_model_weights(name):
        if name != "tiny":
            raise ValueError(f"Unknown model {name}")
        return FakeWeights

    fake_module(monkeypatch, "torchvision")
    fake_module(monkeypatch, "torchvision.models", get_model=get_model, get_model_weights=get_model_weights)
    with pytest.raises(
        ConfigError, match=r"could not fetch the weights FakeWeights.V1 \(URLError.*teacher.weights=FILE"
    ):
        build_network("torchvision:tiny:DEFAULT", role="teacher")
    with pytest.raises(ConfigError, match="FakeWeights has no 'V2' .*choose one of V1, DEFAULT"):
        build_network("torchvision:tiny:V2", role="teacher")
    with pytest.raises(ConfigError, match="names no weights: add them .*or pass teacher.weights=FILE"):
        build_network("torchvision:tiny", role="teacher")
    with pytest.raises(ConfigError, match="torchvision has no model 'huge'"):
        build_network("torchvision:huge:DEFAULT", role="teacher")
    # a local file of the same weights: no fetch, the enum's metadata, the file's class count
    mine = get_model("tiny", num_classes=6)
    torch.save(mine.state_dict(), tmp_path / "tv.pt")
    net = build_network("torchvision:tiny:V1", weights=tmp_path / "tv.pt", role="teacher")
    assert calls[-1] == (None, 6) and net[-1].out_features == 6
    assert teacher_meta(net) == TeacherMeta(
        (0.4, 0.5, 0.6), (0.2, 0.2, 0.2), (3, 16, 16), 6, None, "torchvision:tiny:V1"
    )


def test_torchvision_for_real_without_download(tmp_path):
    models = import_or_skip("torchvision").models
    torch.save(models.get_model("resnet18", weights=None).state_dict(), tmp_path / "r.pt")
    net = build_network("torchvision:resnet18:IMAGENET1K_V1", weights=tmp_path / "r.pt", role="teacher")
    meta = teacher_meta(net)
    assert meta.input_shape == (3, 224, 224) and meta.num_classes == 1000 and len(meta.classes) == 1000
    assert meta.mean == pytest.approx((0.485, 0.456, 0.406)) and meta.std == pytest.approx((0.229, 0.224, 0.225))


# -- end to end ---------------------------------------------------------------------------------------------------

ONE_STEP = [*TINY_DISTILL, "train.epochs=1", "train.rounds_per_epoch=1", "train.kd_steps=1"]


def zoo_teacher_top1(data_root, teacher_run) -> float:
    info = dataset_info("fashion-mnist-32")
    images, labels = load_split(info.name, "test", str(data_root))
    zoo = build_model("lenet5_bn", info, CPU, str(teacher_run), "teacher")
    return (predict(zoo, images, 256).argmax(1) == labels).float().mean().item() * 100


def distill_summary(capsys, out, *argv) -> dict:
    code = main(["distill", *argv, f"out={out}", *ONE_STEP])
    _, err = capsys.readouterr()
    assert code == 0, err
    return json.loads((out / "summary.json").read_text())


FOLDER_RUN = ["method.name=dfad", "student.arch=tiny_cnn", "train.batch_size=8"]


def argmax_normalised(net: nn.Module, pixels: torch.Tensor, mean, std) -> torch.Tensor:
    """The classes ``net`` gives uint8 images ``pixels`` [N, C, H, W] scaled to [0, 1] and normalised."""
    shape = (1, -1, 1, 1)
    with torch.no_grad():
        return net.eval()((pixels / 255 - torch.tensor(mean).view(shape)) / torch.tensor(std).view(shape)).argmax(1)


def labelled_folder(root, net: nn.Module, mean, std, shape) -> torch.Tensor:
    """A folder of 8 random images, each in the folder named by the index of the class ``net`` gives it when fed
    with ``mean``/``std``: a teacher fed so scores 100 % on it, one fed otherwise (almost surely) not. Returns the
    images."""
    pixels = torch.randint(0, 256, (8, *shape), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    for i, (image, label) in enumerate(zip(pixels, argmax_normalised(net, pixels, mean, std))):
        save_png(root / str(int(label)) / f"{i}.png", image.permute(1, 2, 0).numpy())
    return pixels


def test_a_data_free_run_takes_size_and_normalisation_from_the_config_over_the_teachers(factories, capsys, tmp_path):
    """with_meta states 3x16x16 images and its own mean/std; the config's 8x8 and mean/std win in distill and eval."""
    trusted(f"py:{MODULE}:with_meta")  # imports the factories
    pixels = labelled_folder(tmp_path / "test", eager("with_bn"), (0.5,) * 3, (0.25,) * 3, (3, 8, 8))
    own = argmax_normalised(eager("with_bn"), pixels, (0.1, 0.2, 0.3), (0.5, 0.6, 0.7))
    assert not torch.equal(own, argmax_normalised(eager("with_bn"), pixels, (0.5,) * 3, (0.25,) * 3))
    folder = [f"teacher.arch=py:{MODULE}:with_meta", "data.name=folder", f"data.root={tmp_path / 'test'}"]
    folder += ["data.class_names=[a,b,c,d]", "--trust-code"]  # the teacher states 4 classes, not their names
    config = ["data.image_shape=[3,8,8]", "data.mean=[0.5]", "data.std=[0.25]"]
    summary = distill_summary(capsys, tmp_path / "d", *folder, *config, *FOLDER_RUN)
    assert summary["teacher_top1"] == 100.0 and summary["student_steps"] == 1
    last = torch.load(tmp_path / "d" / "ckpt" / "last.pt", weights_only=True)
    assert (last["image_shape"], last["mean"], last["std"]) == ([3, 8, 8], [0.5] * 3, [0.25] * 3)
    code, out, err = run_cli(capsys, "eval", "--weights", tmp_path / "d", *folder)
    assert code == 0, err
    assert "teacher top-1 100.00%" in out and "agreement" in out
    pytest.importorskip("sklearn")  # the t-SNE
    code, _, err = run_cli(capsys, "plot", tmp_path / "d", "--synthetic", "12", "--trust-code")
    assert code == 0, err
    assert (tmp_path / "d" / "plots" / "plot.json").is_file()


def test_distill_and_eval_with_a_timm_teacher_from_a_weights_file(capsys, tmp_path):
    timm = import_or_skip("timm")
    torch.manual_seed(0)
    net = timm.create_model("resnet18", pretrained=False)  # 1000 ImageNet classes, 3x224x224, random weights
    weights = tmp_path / "resnet18.pt"
    torch.save(net.state_dict(), weights)
    mean, std = timm.data.IMAGENET_DEFAULT_MEAN, timm.data.IMAGENET_DEFAULT_STD
    pixels = labelled_folder(tmp_path / "test", net, mean, std, (3, 32, 32))
    labels = argmax_normalised(net, pixels, mean, std)
    assert not torch.equal(argmax_normalised(net, pixels, (0.5,) * 3, (0.25,) * 3), labels)
    folder = ["teacher.arch=timm:resnet18", "data.name=folder", f"data.root={tmp_path / 'test'}"]
    run = [*folder, "data.image_shape=[3,32,32]", *FOLDER_RUN]  # timm's mean/std, classes and channels; a smaller size

    torch.save({k: v for k, v in net.state_dict().items() if k != "fc.bias"}, tmp_path / "short.pt")
    code, _, err = run_cli(capsys, "distill", *run, f"teacher.weights={tmp_path / 'short.pt'}", f"out={tmp_path / 'o'}")
    assert_one_line_error(code, err, "short.pt does not fit ResNet: 1 keys of the model are missing from it ('fc.b")
    assert not (tmp_path / "o").exists()

    summary = distill_summary(capsys, tmp_path / "d", *run, f"teacher.weights={weights}")
    assert summary["teacher"] == "timm:resnet18" and summary["student_steps"] == 1
    assert summary["teacher_top1"] == 100.0  # the file's weights, fed as timm's config says
    last = torch.load(tmp_path / "d" / "ckpt" / "last.pt", weights_only=True)
    assert last["mean"] == pytest.approx(mean) and last["std"] == pytest.approx(std)
    assert last["image_shape"] == [3, 32, 32] and tuple(last["classes"]) == imagenet_classes(timm)
    code, out, err = run_cli(capsys, "eval", "--weights", tmp_path / "d", *folder, f"teacher.weights={weights}")
    assert code == 0, err
    assert "teacher top-1 100.00%" in out and "agreement" in out


def test_distill_with_a_py_teacher(capsys, data_root, teacher_run, tmp_path):
    spec = "py:dfkd.examples.teachers:lenet5_bn_fashion"
    summary = distill_summary(
        capsys,
        tmp_path / "d",
        "--config",
        "fashion-mnist/cudfkd-lenet5_bn-lenet5_half",
        f"data.root={data_root}",
        f"teacher.arch={spec}",
        f"teacher.weights={teacher_run}",
        "--trust-code",
    )
    assert summary["teacher"] == spec and summary["student_steps"] == 1
    assert summary["teacher_top1"] == pytest.approx(zoo_teacher_top1(data_root, teacher_run))
    code = main(
        [
            "eval",
            "--weights",
            str(tmp_path / "d"),
            f"data.root={data_root}",
            f"teacher.arch={spec}",
            f"teacher.weights={teacher_run}",
            "--trust-code",
        ]
    )
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "agreement" in out


def test_distill_and_eval_with_a_torchscript_teacher(capsys, data_root, teacher_run, tmp_path):
    net = build_network("lenet5_bn", 10, 1, teacher_run / "ckpt" / "last.pt").eval()
    path = tmp_path / "teacher.ts"
    torch.jit.trace(net, torch.zeros(1, 1, 32, 32)).save(str(path))
    summary = distill_summary(
        capsys,
        tmp_path / "d",
        "--config",
        "fashion-mnist/dfad-lenet5_bn-lenet5_half",
        f"data.root={data_root}",
        f"teacher.arch=torchscript:{path}",
        "--trust-code",
    )
    assert summary["teacher"] == f"torchscript:{path}" and summary["student_steps"] == 1
    assert summary["teacher_top1"] == pytest.approx(zoo_teacher_top1(data_root, teacher_run))
    code = main(
        ["eval", "--weights", str(tmp_path / "d"), f"data.root={data_root}", f"teacher.arch={path}", "--trust-code"]
    )
    out, err = capsys.readouterr()
    assert code == 0, err
    assert f"teacher top-1 {summary['teacher_top1']:.2f}%" in out


def test_distill_refuses_a_torchscript_teacher_for_a_bn_method_in_one_line(capsys, data_root, teacher_run, tmp_path):
    net = build_network("lenet5_bn", 10, 1, teacher_run / "ckpt" / "last.pt").eval()
    path = tmp_path / "teacher.ts"
    torch.jit.trace(net, torch.zeros(1, 1, 32, 32)).save(str(path))
    code = main(
        [
            "distill",
            "--config",
            "fashion-mnist/cudfkd-lenet5_bn-lenet5_half",
            f"data.root={data_root}",
            f"teacher.arch={path}",
            f"out={tmp_path / 'o'}",
            *ONE_STEP,
            "--trust-code",
        ]
    )
    _, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.startswith("dfkd: error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err
    assert "cudfkd: the BatchNorm-statistics loss hooks the teacher's layers" in lines[0]
    assert "or set method.bn=0" in lines[0]
    assert not (tmp_path / "o").exists()  # refused before anything was written
