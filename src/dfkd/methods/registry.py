"""The method registry (its own module so method files can import it without a cycle)."""

from dfkd.registry import Registry

METHODS: Registry = Registry("method")
