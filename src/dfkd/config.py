"""Run configuration: typed defaults in code, recipes in YAML, ``key=value`` overrides on the command line.

A recipe is a YAML file shipped in ``dfkd/recipes`` (named by its path without ``.yaml``, e.g.
``cifar10/cudfkd-resnet34-resnet18``) or any YAML file on disk. Loading merges, in order: the dataclass defaults,
the recipe, the overrides. Every key is checked against the schema: an unknown key is an error that names it and
the closest known key, and a value of the wrong type is an error that names the key and the expected type.

The ``method`` block is validated against the ``Config`` dataclass of the method it names, so each method's
hyperparameters live in its own file.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml

from dfkd.errors import ConfigError, closest
from dfkd.registry import METHODS


def choice(default: Any, *choices: Any) -> Any:
    """A dataclass field restricted to ``choices``."""
    return field(default=default, metadata={"choices": choices})


def trust_code_field() -> Any:
    """``trust_code``: run the code a network spec names (``hub:``, ``torchscript:``, ``py:``, a TorchScript export).

    Given for one run, on the command line (``--trust-code``, ``trust_code=true``) or in Python; never saved
    (:func:`to_dict` leaves it out of config.yaml and checkpoints) and never read from a file (:func:`read_yaml`
    refuses it), so a recipe or a run folder from someone else cannot trust itself and a replay asks again.
    """
    return field(default=False, metadata={"per_run": True})


# --------------------------------------------------------------------------------------------------------------------
# Schemas


@dataclass
class DataConfig:
    name: str = "fashion-mnist-32"  # a registered dataset (`dfkd list datasets`)
    root: str | None = None  # where the files are; also searched: $DFKD_DATA, /usr/share/datasets
    # Images held out of the training split as a validation slice (a fixed permutation, the same in every run):
    # training then uses the rest, and eval.split=val evaluates on the slice. 0 = no slice.
    val_size: int = 0
    # What a run without a registered dataset (name=none: no data at all; name=folder: an ImageFolder-style test set
    # in data.root) needs to know; null takes the teacher's own metadata, and a value given both ways must agree.
    num_classes: int | None = None
    image_shape: list[int] | None = None  # C, H, W of the teacher's input
    mean: list[float] | None = None  # per-channel mean of the [0, 1] images the teacher was trained on
    std: list[float] | None = None
    class_names: list[str] | None = None  # index = logit; folder names are matched to them
    # name=none evaluates the student's agreement with the teacher on a fixed set of synthetic images, optimised
    # from noise against the teacher with its own seed (never the run's) and never trained on.
    heldout_size: int = 512
    heldout_seed: int = 1234
    heldout_steps: int = 20  # optimisation steps from noise; 0 = plain noise images


@dataclass
class TeacherConfig:
    arch: str = "lenet5_bn"  # a zoo name, or timm:/torchvision:/hub:/torchscript:/py: (docs/own-teacher.md)
    weights: str | None = None  # a checkpoint file, or a run directory of `dfkd train-teacher`


@dataclass
class StudentConfig:
    arch: str = "lenet5_half"


@dataclass
class ModelConfig:
    arch: str = "lenet5_bn"
    weights: str | None = None


@dataclass
class OptimConfig:
    """Student (or supervised model) optimiser and schedule; the schedule is stepped once per epoch."""

    optimizer: str = choice("sgd", "sgd", "adam")
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    scheduler: str = choice("cosine", "cosine", "multistep", "constant")
    milestones: list[int] = field(default_factory=list)  # epochs, for scheduler=multistep
    gamma: float = 0.1
    eta_min: float = 0.0
    grad_clip: float | None = None  # max global grad norm; null = no clipping


def check_at_least_one(section: Any, *names: str) -> None:
    """Counts a run cannot do without (epochs, batch sizes, steps): each must be >= 1."""
    for name in names:
        value = getattr(section, name)
        if value < 1:
            raise ValueError(f"{name}={value}: give {name} >= 1")


@dataclass
class DistillTrainConfig(OptimConfig):
    epochs: int = 20
    batch_size: int = 256  # student batch
    rounds_per_epoch: int = 40  # synthesis rounds per epoch (the reference's ep_steps // kd_steps)
    kd_steps: int = 10  # student steps after each synthesis round
    # Linear learning-rate warm-up over the first N student steps (on top of the epoch schedule); 0 = none.
    warmup_steps: int = 0
    # Evaluate and save an exponential moving average of the student's weights with this decay (0 = off; 0.999
    # averages over about the last thousand steps). Passive: training is unchanged (engine/ema.py).
    ema_decay: float = 0.0
    # Epochs of synthesis only before the first student step (FastDFKD's and NAYER's warm-up): every round synthesises,
    # no student step, no schedule step. ``epochs`` counts the distillation epochs after them.
    synthesis_warmup_epochs: int = 0

    def __post_init__(self) -> None:
        check_at_least_one(self, "epochs", "batch_size", "rounds_per_epoch", "kd_steps")
        if self.synthesis_warmup_epochs < 0:
            raise ValueError(f"synthesis_warmup_epochs={self.synthesis_warmup_epochs}: give 0 or more")


@dataclass
class SupervisedTrainConfig(OptimConfig):
    epochs: int = 10
    batch_size: int = 128
    augment: str = "none"  # on-device augmentation of real images: none | crop | flip | crop_flip
    padding: int = 4  # for the crop augmentations

    def __post_init__(self) -> None:
        check_at_least_one(self, "epochs", "batch_size")


@dataclass
class EvalConfig:
    batch_size: int = 1000
    # Where per-epoch accuracy (and best-checkpoint selection) is measured: the test set, or the validation slice
    # held out of the training split (data.val_size > 0) for tuning without looking at the test set.
    split: str = choice("test", "test", "val")
    # Window of epochs (0-based, end exclusive) over which mu and var of the accuracy curve are taken
    # (CuDFKD's robustness metric; the authors use epochs 80..end).
    window_start: int = 80
    window_end: int | None = None


@dataclass
class EngineConfig:
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    seed: int = 0
    # bf16 = autocast on the student/synthesis forwards; auto = bf16 where the hardware runs it faster (a GPU of
    # compute capability 8.0+, a CPU with AMX-BF16 or AVX512-BF16), fp32 elsewhere; the run logs which it picked
    precision: str = choice("fp32", "fp32", "bf16", "auto")
    channels_last: bool = False  # memory format of the networks and generators (faster convs on CPU and GPU)
    # torch.compile the networks and generators (inductor; needs a C++ compiler on CPU). Compilation costs minutes
    # before the first step: measure with `dfkd bench throughput --settings fp32,fp32-compile` whether it pays.
    compile: bool = False
    threads: int = 0  # CPU threads for torch; 0 = all cores
    progress: bool = True  # a progress bar with ETA on a terminal
    sample_every: int = 1  # write a grid of synthetic samples every N epochs (0 = never)
    # The collapse guard (engine/guard.py) always warns and sets summary.json's status; with stop_on_collapse it
    # also ends the run after collapse_patience consecutive collapsed epochs.
    stop_on_collapse: bool = False
    collapse_patience: int = 2
    # Stop after the epoch in which the run's wall time passes this many seconds (a race's budget; null = none). The
    # run ends as a finished run (summary.json says it stopped at the limit), not as a failure.
    time_limit: float | None = None
    # Before the first round, count the FLOPs of one synthesis round, one student batch and one student step in an
    # untimed pass (the state restored after it: the run trains exactly as without) and time a matmul and a conv for
    # this machine's peak; the summary's "arithmetic" holds the rates achieved (`dfkd bench throughput` turns it on)
    count_flops: bool = False


@dataclass
class LogConfig:
    # Also write every epoch's metrics, the timing split and the sample grids as TensorBoard events under
    # RUN/tensorboard (pip install 'dfkd[tensorboard]'); metrics.jsonl and metrics.csv are always written.
    tensorboard: bool = False


@dataclass
class ExpectedConfig:
    """The published number a recipe should reproduce, for `dfkd bench`; informational only."""

    top1: float | None = None
    source: str | None = None
    note: str | None = None
    budget: str | None = None  # the schedule the number was measured at (a number without it compares nothing)


@dataclass
class DistillConfig:
    data: DataConfig = field(default_factory=DataConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    method: Any = None  # the method's own Config dataclass, chosen by method.name
    train: DistillTrainConfig = field(default_factory=DistillTrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    log: LogConfig = field(default_factory=LogConfig)
    out: str | None = None  # the run directory
    expected: ExpectedConfig = field(default_factory=ExpectedConfig)
    description: str = ""
    trust_code: bool = trust_code_field()


@dataclass
class TeacherTrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: SupervisedTrainConfig = field(default_factory=SupervisedTrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    log: LogConfig = field(default_factory=LogConfig)
    out: str | None = None
    expected: ExpectedConfig = field(default_factory=ExpectedConfig)
    description: str = ""
    trust_code: bool = trust_code_field()


@dataclass
class EvalRunConfig:
    data: DataConfig = field(default_factory=lambda: DataConfig(name=""))  # "" = the dataset the checkpoint records
    model: ModelConfig = field(default_factory=lambda: ModelConfig(arch=""))
    teacher: TeacherConfig = field(default_factory=lambda: TeacherConfig(arch=""))
    eval: EvalConfig = field(default_factory=EvalConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    trust_code: bool = trust_code_field()


RunKind = Literal["distill", "train-teacher", "eval"]
SCHEMAS: dict[str, type] = {"distill": DistillConfig, "train-teacher": TeacherTrainConfig, "eval": EvalRunConfig}


# --------------------------------------------------------------------------------------------------------------------
# Recipes


def recipe_root() -> Path:
    return Path(str(resources.files("dfkd") / "recipes"))


# recipes/tables/ holds the layouts of the published tables (`dfkd bench`), not run configurations
TABLES_DIR = "tables"


def recipe_names() -> list[str]:
    root = recipe_root()
    names = (p.relative_to(root) for p in root.rglob("*.yaml"))
    return sorted(name.with_suffix("").as_posix() for name in names if name.parts[0] != TABLES_DIR)


def find_recipe(name_or_path: str) -> Path:
    """Resolve ``--config``: an existing YAML file, else a shipped recipe name (with or without ``.yaml``)."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    shipped = recipe_root() / (name_or_path if name_or_path.endswith(".yaml") else name_or_path + ".yaml")
    if shipped.is_file():
        return shipped
    raise ConfigError(
        f"unknown recipe '{name_or_path}'{closest(name_or_path, recipe_names())}: "
        "give a shipped recipe name (`dfkd list recipes`) or the path of a YAML file"
    )


def read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" line {where.line + 1}" if where is not None else ""
        raise ConfigError(f"{path}{line}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe is a YAML mapping of sections (data, teacher, method, ...)")
    if "trust_code" in data:
        raise ConfigError(
            f"{path}: trust_code is never read from a file (a recipe or a run's config.yaml cannot trust its own "
            "code); delete it and pass --trust-code on the command line for this run"
        )
    return data


def parse_overrides(items: list[str]) -> dict:
    """``["train.epochs=3", "method.lr_g=1e-3"]`` -> nested dict; values are parsed as YAML scalars."""
    nested: dict = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override '{item}' is not of the form key=value (e.g. train.epochs=5)")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        node = nested
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}' conflicts with another override of '{part}'")
        node[parts[-1]] = value
    return nested


def deep_merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


# --------------------------------------------------------------------------------------------------------------------
# Typed construction


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(_type_name(a) for a in args) + " or null"
    if origin in (list, tuple):
        return "a list"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None or (isinstance(value, str) and value.strip().lower() in ("null", "none", "~")):
            if type(None) in args:
                return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as exc:
                errors.append(exc)
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin in (list, tuple):
        (inner, *_) = typing.get_args(tp) or (Any,)
        if isinstance(value, str):
            value = [v for v in value.replace("[", "").replace("]", "").split(",") if v.strip()]
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        items = [_coerce(v.strip() if isinstance(v, str) else v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
            return value.strip().lower() in ("true", "yes", "on", "1")
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                number = float(value)
                if number.is_integer():
                    return int(number)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if dataclasses.is_dataclass(tp):
        return build(tp, value, key)
    raise TypeError(f"unsupported config type {tp!r} at {key}")


def build(schema: type, data: Any, prefix: str = "") -> Any:
    """Instantiate dataclass ``schema`` from a (partial) mapping, checking keys and coercing types."""
    where = prefix or "config"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of keys, got {data!r}")
    hints = typing.get_type_hints(schema)
    fields = {f.name: f for f in dataclasses.fields(schema)}
    for key in data:
        if key not in fields:
            full = f"{prefix}.{key}" if prefix else str(key)
            known = [f"{prefix}.{k}" if prefix else k for k in fields]
            raise ConfigError(f"unknown config key '{full}'{closest(full, known)}")
    values = {}
    for name, f in fields.items():
        if name not in data:
            continue
        key = f"{prefix}.{name}" if prefix else name
        raw = data[name]
        if isinstance(raw, dict) and f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
            if dataclasses.is_dataclass(default):  # a partial section keeps this schema's defaults for the rest
                raw = {**to_dict(default), **raw}
        value = _coerce(raw, hints[name], key)
        allowed = f.metadata.get("choices")
        if allowed and value not in allowed:
            raise ConfigError(f"{key}: '{value}' is not one of {', '.join(map(str, allowed))}{closest(value, allowed)}")
        values[name] = value
    try:
        return schema(**values)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from None


def to_dict(obj: Any) -> Any:
    """A dataclass config as plain dicts/lists/scalars (YAML- and weights_only-safe), without the per-run keys
    (``trust_code``), which a saved config must not carry into a replay."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj) if not f.metadata.get("per_run")}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj


def to_yaml(obj: Any) -> str:
    return yaml.safe_dump(to_dict(obj), sort_keys=False, default_flow_style=False)


def _build_method(data: Any) -> Any:
    if not isinstance(data, dict) or not data.get("name"):
        raise ConfigError("method.name is not set: name a method (`dfkd list methods`), e.g. method.name=cudfkd")
    method_cls = METHODS.get(str(data["name"]))
    return build(method_cls.Config, data, "method")


def load_config(kind: RunKind, recipe: str | None = None, overrides: list[str] | dict | None = None) -> Any:
    """Build the typed config of a ``dfkd`` command from a recipe and overrides.

    Args:
        kind: "distill", "train-teacher" or "eval".
        recipe: a shipped recipe name or a YAML path (None: schema defaults only).
        overrides: ``key=value`` strings or an already nested dict, applied last.

    Example:
        >>> cfg = load_config("distill", "fashion-mnist/cudfkd-lenet5_bn-lenet5_half", ["train.epochs=2"])
        >>> cfg.train.epochs
        2
    """
    data: dict = {}
    if recipe is not None:
        path = find_recipe(recipe)
        data = read_yaml(path)
        _check_recipe_kind(kind, data, recipe)
    if overrides:
        data = deep_merge(data, overrides if isinstance(overrides, dict) else parse_overrides(list(overrides)))
    return build_config(kind, data)


def build_config(kind: RunKind, data: dict) -> Any:
    schema = SCHEMAS[kind]
    data = dict(data)
    method_data = data.pop("method", None) if kind == "distill" else None
    cfg = build(schema, data)
    if kind == "distill":
        cfg.method = _build_method(method_data)
    return cfg


def _check_recipe_kind(kind: str, data: dict, recipe: str) -> None:
    if kind == "distill" and "model" in data and "method" not in data:
        raise ConfigError(f"recipe '{recipe}' trains a network on real data: run it with `dfkd train-teacher`")
    if kind == "train-teacher" and "method" in data:
        raise ConfigError(f"recipe '{recipe}' is a distillation recipe: run it with `dfkd distill`")
