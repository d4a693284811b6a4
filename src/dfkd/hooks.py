"""Forward hooks that capture features without touching a model's ``forward``."""

from __future__ import annotations

from torch import Tensor, nn


class InputHook:
    """Keeps the input of ``module`` from its latest forward (e.g. the penultimate feature at the classifier)."""

    def __init__(self, module: nn.Module):
        self.value: Tensor | None = None
        self._handle = module.register_forward_hook(self._hook)

    def _hook(self, _module: nn.Module, inputs: tuple[Tensor, ...], _output: Tensor) -> None:
        self.value = inputs[0]

    def pop(self) -> Tensor:
        if self.value is None:
            raise RuntimeError("the hooked module has not run a forward yet")
        value, self.value = self.value, None
        return value

    def remove(self) -> None:
        self._handle.remove()
