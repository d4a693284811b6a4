"""Nothing runs code that the user did not trust for this run: hub:, py: and TorchScript sources, replays of a run
folder (plot, --resume, eval), recipes, and the readers that only ever read tensors and YAML.

No test touches the network: a GitHub hub spec is checked against a stand-in torch.hub.load.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers import TINY_DISTILL, assert_one_line_error
from helpers import run_cli as run
from torch import nn

import dfkd
from dfkd.commands.cli import main
from dfkd.config import find_recipe
from dfkd.errors import ConfigError
from dfkd.models import build_network

RECIPE = "fashion-mnist/cudfkd-lenet5_bn-lenet5_half"
PY_TEACHER = "py:dfkd.examples.teachers:lenet5_bn_fashion"
ONE_STEP = [*TINY_DISTILL, "train.epochs=1", "train.rounds_per_epoch=1", "train.kd_steps=1"]
ASKS_FOR_TRUST = "if you trust its author, pass --trust-code (trust_code=true; trust_code=True in Python) for this run"

HUBCONF = """
dependencies = ["torch"]

from pathlib import Path

from torch import nn

Path(__file__).with_name("ran").write_text("hubconf.py ran")


def tiny():
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 4))
"""


@pytest.fixture
def hub_calls(monkeypatch):
    """torch.hub.load, recorded; a GitHub load returns a stand-in network instead of downloading anything."""
    calls = []
    real = torch.hub.load

    def load(repo, entry, *args, **kwargs):
        calls.append((repo, entry, kwargs))
        if kwargs.get("source") == "github":
            return nn.Linear(2, 2)
        return real(repo, entry, *args, **kwargs)

    monkeypatch.setattr(torch.hub, "load", load)
    return calls


def refused(spec: str, **kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        build_network(spec, role="teacher", **kwargs)
    message = str(info.value)
    assert message.startswith(f"teacher.arch={spec}") and "\n" not in message
    return message


# -- hub: ---------------------------------------------------------------------------------------------------------


def test_a_github_hub_spec_needs_the_github_prefix_and_trust(hub_calls, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # no folder someone/models here
    message = refused("hub:someone/models:resnet8")  # the old GitHub form: never a silent download
    assert "there is no folder someone/models" in message
    assert message.endswith("write teacher.arch=hub:github:someone/models:resnet8")
    assert "hub:github:someone/models:v1.0:resnet8" in refused("hub:someone/models:v1.0:resnet8")
    assert hub_calls == []
    assert "hub:github:" in refused("hub:someone/models:e", trust_code=True)  # trust does not make it a repository
    message = refused("hub:github:someone/models:v1.0:resnet8")
    assert "downloads someone/models:v1.0 from GitHub and runs its hubconf.py" in message
    assert message.endswith(ASKS_FOR_TRUST)
    assert hub_calls == []  # nothing was fetched
    net = build_network("hub:github:someone/models:v1.0:resnet8", role="teacher", trust_code=True)
    assert isinstance(net, nn.Linear)
    assert hub_calls == [("someone/models:v1.0", "resnet8", {"source": "github", "trust_repo": True})]


def test_a_relative_hub_folder_is_local_only_where_it_exists(hub_calls, monkeypatch, tmp_path):
    folder = tmp_path / "project" / "models" / "lenet"
    folder.mkdir(parents=True)
    (folder / "hubconf.py").write_text(HUBCONF)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    message = refused("hub:models/lenet:tiny")
    assert "there is no folder models/lenet (hub:DIR:ENTRY loads a local folder)" in message
    assert message.endswith("hub:github:models/lenet:tiny")
    assert hub_calls == []  # never taken for a GitHub repository

    monkeypatch.chdir(tmp_path / "project")
    message = refused("hub:models/lenet:tiny")
    assert "runs models/lenet/hubconf.py" in message and message.endswith(ASKS_FOR_TRUST)
    assert hub_calls == [] and not (folder / "ran").exists()
    net = build_network("hub:models/lenet:tiny", role="teacher", trust_code=True)
    assert net(torch.rand(1, 3, 8, 8)).shape == (1, 4) and (folder / "ran").exists()
    assert [(repo, kwargs["source"]) for repo, _, kwargs in hub_calls] == [("models/lenet", "local")]


# -- py: and TorchScript ------------------------------------------------------------------------------------------


def test_a_py_factory_is_not_imported_without_trust(monkeypatch, tmp_path):
    (tmp_path / "untrusted_factory.py").write_text(
        "from pathlib import Path\nPath(__file__).with_name('ran').write_text('imported')\n"
        "from torch import nn\n\ndef net():\n    return nn.Linear(2, 2)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "untrusted_factory", raising=False)
    message = refused("py:untrusted_factory:net")
    assert "imports untrusted_factory and calls net()" in message and message.endswith(ASKS_FOR_TRUST)
    assert "untrusted_factory" not in sys.modules and not (tmp_path / "ran").exists()
    assert isinstance(build_network("py:untrusted_factory:net", trust_code=True), nn.Linear)
    assert (tmp_path / "ran").exists()


def test_a_torchscript_file_is_not_loaded_without_trust(monkeypatch, tmp_path):
    path = tmp_path / "teacher.ts"
    torch.jit.script(nn.Linear(2, 3)).save(str(path))
    loads = []
    real = torch.jit.load
    monkeypatch.setattr(torch.jit, "load", lambda *args, **kwargs: loads.append(args) or real(*args, **kwargs))
    for spec in (str(path), f"torchscript:{path}"):
        message = refused(spec)
        assert f"loads the TorchScript program {path}" in message and message.endswith(ASKS_FOR_TRUST)
    assert loads == []
    assert build_network(str(path), trust_code=True)(torch.rand(1, 2)).shape == (1, 3)
    assert len(loads) == 1


# -- a run folder replayed asks again -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def py_run(data_root, teacher_run, tmp_path_factory):
    """A one-step distillation whose teacher is a py: factory, trusted with --trust-code."""
    out = tmp_path_factory.mktemp("safety") / "py"
    argv = ["distill", "--config", RECIPE, f"data.root={data_root}", f"teacher.arch={PY_TEACHER}"]
    argv += [f"teacher.weights={teacher_run}", f"out={out}", *ONE_STEP, "--trust-code"]
    code = main([str(a) for a in argv])
    assert code == 0
    return out


def test_trust_is_not_saved_with_the_run(py_run):
    saved = yaml.safe_load((py_run / "config.yaml").read_text())
    assert saved["teacher"]["arch"] == PY_TEACHER and "trust_code" not in saved
    ckpt = torch.load(py_run / "ckpt" / "last.pt", weights_only=True)
    assert ckpt["config"]["teacher"]["arch"] == PY_TEACHER and "trust_code" not in ckpt["config"]


def test_plot_of_a_run_asks_for_trust_again(capsys, py_run):
    code, _, err = run(capsys, "plot", py_run, "--real", 0, "--synthetic", 6)
    assert_one_line_error(code, err, f"teacher.arch={PY_TEACHER} imports dfkd.examples.teachers")
    assert "--trust-code" in err and not (py_run / "plots" / "plot.json").exists()
    from dfkd.commands.plot import plot_run

    with pytest.raises(ConfigError, match="trust_code=True in Python"):
        plot_run(py_run, real=0, synthetic=6)
    pytest.importorskip("sklearn", reason="the plot extra (scikit-learn) is not installed")
    code, _, err = run(capsys, "plot", py_run, "--real", 0, "--synthetic", 6, "--trust-code")
    assert code == 0, err
    assert plot_run(py_run, real=0, synthetic=6, trust_code=True)["synthetic_images"] == 6


def test_resume_and_eval_of_a_run_ask_for_trust_again(capsys, py_run, data_root, teacher_run):
    code, _, err = run(capsys, "distill", "--resume", py_run)
    assert_one_line_error(code, err, f"teacher.arch={PY_TEACHER} imports dfkd.examples.teachers")
    code, _, err = run(capsys, "distill", "--resume", py_run, "--trust-code")
    assert code == 0, err
    teacher = [f"data.root={data_root}", f"teacher.arch={PY_TEACHER}", f"teacher.weights={teacher_run}"]
    code, _, err = run(capsys, "eval", "--weights", py_run, *teacher)
    assert_one_line_error(code, err, "--trust-code")
    code, out, err = run(capsys, "eval", "--weights", py_run, *teacher, "--trust-code")
    assert code == 0 and "agreement" in out, err


def test_a_file_cannot_grant_trust(capsys, py_run, tmp_path):
    never = "trust_code is never read from a file"
    recipe = yaml.safe_load(find_recipe(RECIPE).read_text())
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump({**recipe, "trust_code": True}))
    code, _, err = run(capsys, "distill", "--config", tmp_path / "recipe.yaml", f"out={tmp_path / 'r'}")
    assert_one_line_error(code, err, never)
    with pytest.raises(ConfigError, match=never):
        dfkd.load_config("distill", str(tmp_path / "recipe.yaml"))
    saved = yaml.safe_load((py_run / "config.yaml").read_text())
    (py_run / "config.yaml").write_text(yaml.safe_dump({**saved, "trust_code": True}))
    try:
        for argv in (("plot", py_run), ("distill", "--resume", py_run)):
            code, _, err = run(capsys, *argv)
            assert_one_line_error(code, err, never)
    finally:
        (py_run / "config.yaml").write_text(yaml.safe_dump(saved))


def test_a_python_caller_trusts_per_config_and_a_module_needs_nothing(tmp_path, data_root, teacher_run):
    overrides = [f"data.root={data_root}", f"teacher.arch={PY_TEACHER}", f"teacher.weights={teacher_run}"]
    cfg = dfkd.load_config("distill", RECIPE, [*overrides, f"out={tmp_path / 'a'}", *ONE_STEP])
    with pytest.raises(ConfigError, match=r"trust_code=True in Python\) for this run$"):
        dfkd.distill(cfg)
    assert not (tmp_path / "a").exists()  # refused before anything was written
    teacher = build_network(PY_TEACHER, weights=teacher_run / "ckpt" / "last.pt", trust_code=True)
    cfg = dfkd.load_config("distill", RECIPE, [f"data.root={data_root}", f"out={tmp_path / 'b'}", *ONE_STEP])
    assert dfkd.distill(cfg, teacher=teacher)["student_steps"] == 1


# -- what only reads data -----------------------------------------------------------------------------------------


def test_files_are_read_as_data_only():
    """Every torch.load in the package passes weights_only=True, YAML is read with safe_load, numpy without
    pickles, and nothing calls pickle.load (CIFAR batches go through an unpickler that allows arrays only)."""
    for path in sorted(Path(dfkd.__file__).parent.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                continue
            name, where = ast.unparse(node.func), f"{path.name}:{node.lineno}"
            keywords = {k.arg: k.value for k in node.keywords}
            if name == "torch.load":
                assert ast.literal_eval(keywords.get("weights_only", ast.Constant(None))) is True, where
            if name in ("np.load", "numpy.load"):
                assert ast.literal_eval(keywords.get("allow_pickle", ast.Constant(None))) is False, where
            assert name not in ("yaml.load", "yaml.unsafe_load", "yaml.full_load", "pickle.load", "pickle.loads"), where
