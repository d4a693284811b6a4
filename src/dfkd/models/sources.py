"""Networks from outside the zoo: timm, torchvision, torch.hub, TorchScript files and Python factories.

Wherever an architecture is named (``teacher.arch`` above all), one of these source specs may stand instead of a
zoo name:

==========================================  ===================================================================
``timm:NAME``, ``timm:hf-hub:ORG/NAME``     ``timm.create_model``: its pretrained weights, or a weights file's
``torchvision:NAME[:WEIGHTS]``              ``torchvision.models.get_model``; WEIGHTS is a member of its weights
                                            enum (``DEFAULT``, ``IMAGENET1K_V1``)
``hub:github:OWNER/REPO[:REF]:ENTRY``       ``torch.hub.load`` from GitHub
``hub:DIR:ENTRY``                           ``torch.hub.load`` from a folder that exists, holding a ``hubconf.py``
``torchscript:FILE`` (or just ``FILE``)     ``torch.jit.load``
``py:package.module:function``              ``function()``, any importable function returning an ``nn.Module``
==========================================  ===================================================================

``hub:``, ``torchscript:`` and ``py:`` run code that dfkd cannot check (a ``hubconf.py``, a TorchScript program, a
Python module), so they are refused unless the caller trusts it for this build (``trust_code=True``; the command line's
``--trust-code``). timm and torchvision build those libraries' own architectures; a weights file is read as tensors.

A weights file (a state dict, see :func:`~dfkd.models.read_weights`) may fill the network of every source but
TorchScript. What the source states about the network's input (mean/std, image shape, classes) is attached as a
:class:`~dfkd.models.meta.TeacherMeta`; the engine normalises with that mean/std and checks the shape against the data.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import os
import re
import zipfile
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from dfkd.errors import ConfigError, closest
from dfkd.models.meta import TeacherMeta, attach_meta, teacher_meta
from dfkd.models.registry import MODELS
from dfkd.models.weights import _last_linear, load_weights, read_weights

SOURCES = ("timm", "torchvision", "hub", "torchscript", "py")
_HTTP_LIBRARIES = {"requests", "urllib3", "httpx", "httpcore", "huggingface_hub"}
_FORMS = (
    "timm:NAME, torchvision:NAME[:WEIGHTS], hub:github:OWNER/REPO:ENTRY, hub:DIR:ENTRY, torchscript:FILE or "
    "py:MODULE:FUNCTION"
)
_GITHUB = "github:"
# what torch.hub takes as a GitHub repository: OWNER/REPO with an optional :REF (branch, tag or commit)
_GITHUB_REPO = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*/[A-Za-z0-9._-]+(:[A-Za-z0-9._/-]+)?")


def is_external_arch(arch: object) -> bool:
    """Whether ``arch`` names a source spec (``prefix:...`` or an existing file) rather than a zoo model."""
    if not isinstance(arch, str) or not arch or arch in MODELS:
        return False
    return ":" in arch or Path(arch).expanduser().is_file()


def is_torchscript(net: nn.Module) -> bool:
    """Whether ``net`` is, or contains, a TorchScript module (forward hooks cannot be registered on those)."""
    return any(isinstance(m, torch.jit.ScriptModule) for m in net.modules())


def build_source(
    spec: str,
    weights: str | os.PathLike[str] | None = None,
    *,
    num_classes: int | None = None,
    role: str = "",
    trust_code: bool = False,
) -> nn.Module:
    """Build the network a source spec names, fill it from ``weights`` and attach its :class:`TeacherMeta`.

    Args:
        spec: A source spec (see the module docstring).
        weights: A state-dict file to load into the network, or None for the source's own weights.
        num_classes: Class count for a torchvision network built without a weights enum (its file decides
            otherwise); ignored by the other sources, whose class count is their own.
        role: Word naming the network in messages and the config keys they suggest, e.g. ``"teacher"``.
        trust_code: Run the code a ``hub:``, ``torchscript:`` or ``py:`` spec names; without it they are refused.

    Returns:
        The network on the CPU, with ``teacher_meta(net).source == spec``.

    Raises:
        ConfigError: Unknown source, a module, entry, folder or file that is not there, a source that runs code
            without ``trust_code``, a download that failed (the message says how to pass a local file instead), a
            factory that returns no ``nn.Module``.
        CheckpointError: ``weights`` cannot be read or does not fit the network.

    Example:
        >>> from dfkd.models.sources import build_source
        >>> from dfkd.models.meta import teacher_meta
        >>> net = build_source("py:dfkd.examples.teachers:lenet5_bn_fashion", trust_code=True)
        >>> teacher_meta(net).input_shape
        (1, 32, 32)
    """
    keys = _Keys(role)
    prefix, sep, rest = spec.partition(":")
    if not sep and Path(spec).expanduser().is_file():
        prefix, rest = "torchscript", spec
    elif prefix not in SOURCES:
        raise ConfigError(
            f"{keys.arch}={spec}: unknown source '{prefix}:'; name a zoo model (`dfkd list models`) or use {_FORMS}"
        )
    if not rest:
        raise ConfigError(f"{keys.arch}={spec} names nothing after '{prefix}:'; use {_FORMS}")
    state = read_weights(weights)[0] if weights is not None else None
    if prefix == "torchscript":
        if state is not None:
            raise ConfigError(f"{keys.arch}={spec}: a TorchScript file holds its own weights; drop {keys.weights}")
        net, meta = _torchscript(spec, rest, keys, trust_code)
    elif prefix == "timm":
        net, meta = _timm(spec, rest, state, keys)
    elif prefix == "torchvision":
        net, meta = _torchvision(spec, rest, state, num_classes, keys)
    elif prefix == "hub":
        net, meta = _hub(spec, rest, keys, trust_code)
    else:
        net, meta = _python(spec, rest, keys, trust_code)
    if state is not None:
        load_weights(net, state, f"{role} weights {weights}" if role else f"weights {weights}")
    return attach_meta(net, meta)


class _Keys:
    """The config keys that messages tell the user to set, for a network in ``role``."""

    def __init__(self, role: str):
        self.arch = f"{role}.arch" if role else "arch"
        self.weights = f"{role}.weights" if role else "weights"


def _require_trust(spec: str, what: str, keys: _Keys, trust_code: bool) -> None:
    """Refuse a source that runs code unless the caller trusts it for this build."""
    if not trust_code:
        raise ConfigError(
            f"{keys.arch}={spec} {what}, code that dfkd cannot check: if you trust its author, pass --trust-code "
            "(trust_code=true; trust_code=True in Python) for this run"
        )


def _one_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {' '.join(str(e).split())}".rstrip(": ")


def _module(spec: str, value: Any, what: str, keys: _Keys) -> nn.Module:
    if not isinstance(value, nn.Module):
        raise ConfigError(f"{keys.arch}={spec}: {what} returned a {type(value).__name__}, not an nn.Module")
    return value


def _head_classes(net: nn.Module, state: dict[str, Tensor] | None) -> int | None:
    """The class count a weights file's final linear layer has, when it differs from ``net``'s (else None)."""
    if state is None:
        return None
    last = _last_linear(net)
    if last is None:
        return None
    found = state.get(f"{last[0]}.weight")
    if found is None or found.dim() != 2 or found.shape[0] == last[1].out_features:
        return None
    return int(found.shape[0])


def _import_optional(name: str, spec: str, keys: _Keys) -> Any:
    try:
        return importlib.import_module(name)
    except Exception as e:  # a torchvision built for another torch fails with more than ImportError
        extra = name.split(".")[0]
        raise ConfigError(
            f"{keys.arch}={spec} needs {extra}, which does not import ({_one_line(e)}); pip install 'dfkd[{extra}]'"
        ) from e


def _is_fetch_error(e: BaseException) -> bool:
    """A download that failed: an OSError (URLError, HTTPError, requests' errors) or an HTTP library's own error."""
    return isinstance(e, OSError) or any(c.__module__.partition(".")[0] in _HTTP_LIBRARIES for c in type(e).__mro__)


def _fetch_failed(spec: str, what: str, e: BaseException, keys: _Keys) -> ConfigError:
    return ConfigError(
        f"{keys.arch}={spec}: could not fetch {what} ({_one_line(e)}); download the file where there is network, "
        f"copy it here and pass it as {keys.weights}=FILE"
    )


# -- timm ---------------------------------------------------------------------------------------------------------


def _timm(spec: str, name: str, state: dict[str, Tensor] | None, keys: _Keys) -> tuple[nn.Module, TeacherMeta]:
    timm = _import_optional("timm", spec, keys)

    def create(**kwargs: Any) -> nn.Module:
        try:
            return timm.create_model(name, **kwargs)
        except Exception as e:
            if _is_fetch_error(e):
                what = "its pretrained weights" if kwargs.get("pretrained") else "its configuration"
                raise _fetch_failed(spec, what, e, keys) from e
            if isinstance(e, RuntimeError) and "Unknown model" in str(e):
                raise ConfigError(f"{keys.arch}={spec}: timm has no model '{name}' (timm.list_models())") from e
            raise

    net = create(pretrained=state is None)
    classes = _head_classes(net, state)
    if classes is not None:
        net = create(pretrained=False, num_classes=classes)
    return net, timm_meta(net, spec)


def timm_meta(net: nn.Module, spec: str) -> TeacherMeta:
    """Mean/std, input size and class count from a timm model's ``pretrained_cfg`` (class names where the config
    carries them, or ImageNet's from timm's bundled synset tables when the class count is an ImageNet subset's)."""
    cfg = getattr(net, "pretrained_cfg", None) or {}
    cfg = dict(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)  # a PretrainedCfg dataclass in some versions
    num_classes = getattr(net, "num_classes", None) or cfg.get("num_classes") or None
    input_size = cfg.get("input_size")
    classes = cfg.get("label_names") or None
    if classes is None and num_classes:
        classes = _imagenet_classes(net)
    if classes is not None and len(classes) != num_classes:
        classes = None
    return TeacherMeta(
        mean=_floats(cfg.get("mean")),
        std=_floats(cfg.get("std")),
        input_shape=tuple(int(v) for v in input_size) if input_size and len(input_size) == 3 else None,
        num_classes=int(num_classes) if num_classes else None,
        classes=tuple(str(c) for c in classes) if classes is not None else None,
        source=spec,
    )


def _imagenet_classes(net: nn.Module) -> list[str] | None:
    try:
        from timm.data import ImageNetInfo, infer_imagenet_subset
    except ImportError:  # timm before 0.9.8 has no class tables
        return None
    subset = infer_imagenet_subset(net)
    return list(ImageNetInfo(subset).label_descriptions()) if subset else None


def _floats(values: Any) -> tuple[float, ...] | None:
    return tuple(float(v) for v in values) if values is not None and len(values) else None


# -- torchvision --------------------------------------------------------------------------------------------------


def _torchvision(
    spec: str, rest: str, state: dict[str, Tensor] | None, num_classes: int | None, keys: _Keys
) -> tuple[nn.Module, TeacherMeta]:
    models = _import_optional("torchvision.models", spec, keys)
    name, _, weights_name = rest.partition(":")
    try:
        enum = models.get_model_weights(name)
    except ValueError:
        raise ConfigError(
            f"{keys.arch}={spec}: torchvision has no model '{name}' (torchvision.models.list_models())"
        ) from None
    weights_name = weights_name.rpartition(".")[2]  # ResNet18_Weights.IMAGENET1K_V1 as get_weight spells it
    chosen = None
    if weights_name:
        try:
            chosen = enum[weights_name]
        except KeyError:
            members = [m.name for m in enum] + ["DEFAULT"]
            raise ConfigError(
                f"{keys.arch}={spec}: {enum.__name__} has no '{weights_name}'{closest(weights_name, members)}; "
                f"choose one of {', '.join(members)}"
            ) from None
    elif state is None:
        raise ConfigError(
            f"{keys.arch}={spec} names no weights: add them (torchvision:{name}:DEFAULT) or pass {keys.weights}=FILE"
        )
    meta = torchvision_meta(chosen, spec)
    kwargs: dict[str, Any] = {}
    if chosen is not None:
        kwargs["num_classes"] = meta.num_classes
    elif num_classes is not None:
        kwargs["num_classes"] = num_classes
    try:
        net = models.get_model(name, weights=chosen if state is None else None, **kwargs)
    except Exception as e:
        if _is_fetch_error(e):
            raise _fetch_failed(spec, f"the weights {chosen}", e, keys) from e
        raise
    classes = _head_classes(net, state)
    if classes is not None:
        net = models.get_model(name, weights=None, num_classes=classes)
        meta = dataclasses.replace(meta, num_classes=classes, classes=None)  # the enum's names are not the file's
    return net, meta


def torchvision_meta(weights: Any, spec: str) -> TeacherMeta:
    """Mean/std, crop size and class names from a torchvision weights enum member (or just ``spec`` for None)."""
    if weights is None:
        return TeacherMeta(source=spec)
    preset = weights.transforms()
    categories = weights.meta.get("categories")
    crop = getattr(preset, "crop_size", None)
    size = int(crop[0]) if isinstance(crop, (list, tuple)) else int(crop) if crop else None
    return TeacherMeta(
        mean=_floats(getattr(preset, "mean", None)),
        std=_floats(getattr(preset, "std", None)),
        input_shape=(3, size, size) if size else None,
        num_classes=len(categories) if categories else None,
        classes=tuple(str(c) for c in categories) if categories else None,
        source=spec,
    )


# -- torch.hub ----------------------------------------------------------------------------------------------------


def _hub(spec: str, rest: str, keys: _Keys, trust_code: bool) -> tuple[nn.Module, TeacherMeta]:
    repo, _, entry = rest.rpartition(":")
    if not repo or not entry:
        raise ConfigError(
            f"{keys.arch}={spec}: give hub:DIR:ENTRY or hub:github:OWNER/REPO:ENTRY (ENTRY: the function in hubconf.py)"
        )
    local = Path(repo).expanduser()
    if local.is_dir():  # a folder that exists is always the local form, even when its name looks like OWNER/REPO
        if not (local / "hubconf.py").is_file():
            raise ConfigError(f"{keys.arch}={spec}: {local} is not a directory with a hubconf.py")
        _require_trust(spec, f"runs {local / 'hubconf.py'}", keys, trust_code)
        net = _hub_load(spec, entry, keys, partial(torch.hub.load, str(local), entry, source="local"))
    elif repo.startswith(_GITHUB) and _GITHUB_REPO.fullmatch(repo[len(_GITHUB) :]):
        github_repo = repo[len(_GITHUB) :]
        _require_trust(spec, f"downloads {github_repo} from GitHub and runs its hubconf.py", keys, trust_code)
        load = partial(torch.hub.load, github_repo, entry, source="github", trust_repo=trust_code)
        net = _hub_load(spec, entry, keys, load, github_repo=github_repo)
    else:
        # Never a silent download: a folder missing here (a relative path run from elsewhere) is not a repository.
        remote = (
            f"; for the GitHub repository write {keys.arch}=hub:{_GITHUB}{repo}:{entry}"
            if _GITHUB_REPO.fullmatch(repo)
            else ""
        )
        raise ConfigError(
            f"{keys.arch}={spec}: there is no folder {local} (hub:DIR:ENTRY loads a local folder){remote}"
        )
    return net, _own_meta(net, spec)


def _hub_load(spec: str, entry: str, keys: _Keys, load: Callable[[], Any], github_repo: str = "") -> nn.Module:
    try:
        value = load()
    except Exception as e:
        if "Cannot find callable" in str(e):
            raise ConfigError(f"{keys.arch}={spec}: hubconf.py has no entry '{entry}'") from e
        if github_repo and _is_fetch_error(e):
            raise ConfigError(
                f"{keys.arch}={spec}: could not fetch {github_repo} from GitHub ({_one_line(e)}); clone it where "
                f"there is network, copy it here and pass {keys.arch}=hub:/path/to/clone:{entry}"
            ) from e
        raise ConfigError(f"{keys.arch}={spec}: loading hub entry '{entry}' failed ({_one_line(e)})") from e
    return _module(spec, value, f"hub entry '{entry}'", keys)


# -- TorchScript --------------------------------------------------------------------------------------------------


def _torchscript(spec: str, path_text: str, keys: _Keys, trust_code: bool) -> tuple[nn.Module, TeacherMeta]:
    path = Path(path_text).expanduser()
    if not path.is_file():
        raise ConfigError(f"{keys.arch}={spec}: the TorchScript file {path} does not exist")
    if not _is_torchscript_archive(path):
        raise ConfigError(
            f"{keys.arch}={spec}: {path} is not a TorchScript archive; save one with "
            f"torch.jit.save(torch.jit.script(model), path), or pass a state dict as {keys.weights}=FILE"
        )
    _require_trust(spec, f"loads the TorchScript program {path}", keys, trust_code)
    return torch.jit.load(str(path), map_location="cpu"), TeacherMeta(source=spec)


def _is_torchscript_archive(path: Path) -> bool:
    # torch.save writes a zip too; only TorchScript archives carry compiled code and constants.pkl.
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("/constants.pkl") for n in z.namelist())


# -- Python factories ---------------------------------------------------------------------------------------------


def _python(spec: str, rest: str, keys: _Keys, trust_code: bool) -> tuple[nn.Module, TeacherMeta]:
    module_name, _, attr = rest.rpartition(":")
    if not module_name or not attr:
        raise ConfigError(f"{keys.arch}={spec}: give py:package.module:function")
    _require_trust(spec, f"imports {module_name} and calls {attr}()", keys, trust_code)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and module_name.startswith(e.name):
            raise ConfigError(
                f"{keys.arch}={spec}: there is no module '{module_name}' ({_one_line(e)}); check the name and that "
                "its folder is on PYTHONPATH"
            ) from e
        raise ConfigError(f"{keys.arch}={spec}: importing {module_name} failed ({_one_line(e)})") from e
    except Exception as e:
        raise ConfigError(f"{keys.arch}={spec}: importing {module_name} failed ({_one_line(e)})") from e
    factory: Any = module
    for part in attr.split("."):
        if not hasattr(factory, part):
            names = [n for n in dir(factory) if not n.startswith("_")]
            raise ConfigError(f"{keys.arch}={spec}: {module_name} has no '{attr}'{closest(part, names)}")
        factory = getattr(factory, part)
    if not callable(factory):
        raise ConfigError(f"{keys.arch}={spec}: {module_name}.{attr} is a {type(factory).__name__}, not a function")
    required = _required_parameters(factory)
    if required:
        raise ConfigError(
            f"{keys.arch}={spec}: {attr}() needs the arguments {', '.join(required)}; give a "
            "function that builds the network without arguments (wrap it in one that passes them)"
        )
    try:
        value = factory()
    except Exception as e:
        raise ConfigError(f"{keys.arch}={spec}: calling {attr}() failed ({_one_line(e)})") from e
    net = _module(spec, value, f"{attr}()", keys)
    return net, _own_meta(net, spec)


def _required_parameters(factory: Callable[..., Any]) -> list[str]:
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):  # builtins without a signature: just call them
        return []
    return [
        p.name
        for p in params
        if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    ]


def _own_meta(net: nn.Module, spec: str) -> TeacherMeta:
    """The meta a factory attached itself (with ``spec`` as its source), else one that only names ``spec``."""
    return dataclasses.replace(teacher_meta(net), source=spec)


__all__ = ["SOURCES", "build_source", "is_external_arch", "is_torchscript", "timm_meta", "torchvision_meta"]
