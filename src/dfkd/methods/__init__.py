"""Data-free distillation methods: one file each, registered by name.

Adding a method is one file in this package with a ``@METHODS.register("name")`` class; every module here is
imported on first use, so nothing else changes. Beside the methods: ``base.py`` (the interface and the templates
they share) and ``heldout.py`` (the held-out synthetic set by which a run without data scores its student).
"""

import importlib
import pkgutil
import sys

from dfkd.methods.base import (
    Batch,
    Ctx,
    GeneratorConfig,
    GeneratorMethod,
    Method,
    MethodConfig,
    Progress,
    frozen,
    optimizer_step,
)
from dfkd.methods.registry import METHODS

_INFRASTRUCTURE = {"base", "heldout", "registry"}  # modules that are no method
for _module in pkgutil.iter_modules(__path__):
    if _module.name not in _INFRASTRUCTURE and not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "METHODS",
    "Batch",
    "Ctx",
    "GeneratorConfig",
    "GeneratorMethod",
    "Method",
    "MethodConfig",
    "Progress",
    "frozen",
    "optimizer_step",
]


def method_names() -> list[str]:
    return METHODS.names()


def describe_method(name: str) -> str:
    """The first line of the method's module docstring (its paper)."""
    module = sys.modules[METHODS.get(name).__module__]
    return (module.__doc__ or "").strip().splitlines()[0]
