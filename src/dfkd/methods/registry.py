"""The method registry, where each method file registers its class: :data:`dfkd.registry.METHODS`, defined in the
bottom layer so that the config can look a method's ``Config`` up in it without importing the methods."""

from dfkd.registry import METHODS

__all__ = ["METHODS"]
