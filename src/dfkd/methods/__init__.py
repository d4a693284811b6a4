"""Data-free distillation methods: one file each, registered by name.

Adding a method is one file with a ``@METHODS.register("name")`` class and one import line here.
"""

from dfkd.methods.base import Batch, Ctx, Method, MethodConfig, Progress, frozen, optimizer_step
from dfkd.methods.registry import METHODS

from dfkd.methods import cudfkd  # noqa: E402, F401  (registers)

__all__ = ["METHODS", "Batch", "Ctx", "Method", "MethodConfig", "Progress", "frozen", "optimizer_step"]


def method_names() -> list[str]:
    return METHODS.names()


def describe_method(name: str) -> str:
    """The first line of the method's module docstring (its paper)."""
    import sys

    module = sys.modules[METHODS.get(name).__module__]
    return (module.__doc__ or "").strip().splitlines()[0]
