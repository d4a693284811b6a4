"""Name -> builder registries (models, generators, datasets, methods)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, TypeVar

from dfkd.errors import ConfigError, closest

T = TypeVar("T")


class Registry(Generic[T]):
    """A named table of builders, filled by the ``@REGISTRY.register("name")`` decorator."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def add(obj: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} '{name}' is registered twice")
            self._entries[name] = obj
            return obj

        return add

    def get(self, name: str) -> T:
        try:
            return self._entries[name]
        except KeyError:
            raise ConfigError(
                f"unknown {self.kind} '{name}'{closest(name, self._entries)}; "
                f"run 'dfkd list {self.kind}s' to see them all"
            ) from None

    def build(self, name: str, *args: Any, **kwargs: Any) -> Any:
        return self.get(name)(*args, **kwargs)  # type: ignore[operator]

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries


# The methods' registry lives here, at the bottom, and not in dfkd.methods: the config (below the methods) finds the
# Config class of the method a recipe names in it. Every method module registers itself when dfkd.methods is
# imported, which importing the package dfkd does before anything else runs, so the table is full when a config is
# built; the config never imports the methods.
METHODS: Registry = Registry("method")
