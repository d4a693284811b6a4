"""Forward hooks that capture features without touching a model's ``forward``.

Every hook in dfkd is a :class:`ForwardCapture`: one forward hook per module that keeps a value computed from that
module's latest forward, either always or only inside ``with hooks.capture():`` (so that the other forwards of the
same network, e.g. the teacher on student batches, cost nothing).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from torch import Tensor, nn

Record = Callable[[nn.Module, tuple[Tensor, ...], Any], Any]


class ForwardCapture:
    """Keeps ``record(module, inputs, output)`` of the latest forward of each of ``modules``, in ``modules`` order.

    Args:
        modules: the modules to hook.
        record: what to keep from a forward (e.g. the input, the output, a statistic of either).
        always: record on every forward; otherwise only inside :meth:`capture`.

    Example:
        >>> import torch
        >>> net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> hooks = ForwardCapture([net[2]], lambda m, inputs, out: inputs[0])
        >>> with hooks.capture():
        ...     _ = net(torch.zeros(5, 3))
        >>> [v.shape for v in hooks.pop()]
        [torch.Size([5, 4])]
    """

    def __init__(self, modules: Sequence[nn.Module], record: Record, always: bool = False):
        if not modules:
            raise ValueError(f"{type(self).__name__} needs at least one module to hook")
        self._record = record
        self._always = always
        self._capturing = always
        self._values: list[Any] = [None] * len(modules)
        self._handles = [m.register_forward_hook(self._hook(i)) for i, m in enumerate(modules)]

    def _hook(self, index: int):
        def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Any) -> None:
            if self._capturing:
                self._values[index] = self._record(module, inputs, output)

        return hook

    @contextmanager
    def capture(self) -> Iterator[None]:
        """Record the forwards run inside the block (forgetting earlier ones)."""
        self._values = [None] * len(self._values)
        self._capturing = True
        try:
            yield
        finally:
            self._capturing = self._always

    def pop(self, partial: bool = False) -> list[Any]:
        """The values of the hooked modules since the last pop, one per module; with ``partial`` the modules that
        did not run are left out, else they are an error."""
        values = [v for v in self._values if v is not None]
        if not values:
            raise RuntimeError("no hooked module has run a forward: run the model (inside `with hooks.capture():`)")
        if len(values) < len(self._values) and not partial:
            missing = [i for i, v in enumerate(self._values) if v is None]
            raise RuntimeError(f"hooked modules {missing} (in hook order) did not run in the captured forward")
        self._values = [None] * len(self._values)
        return values

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


class InputHook(ForwardCapture):
    """Keeps the input of ``module`` from its latest forward (e.g. the penultimate feature at the classifier)."""

    def __init__(self, module: nn.Module):
        super().__init__([module], lambda _m, inputs, _out: inputs[0], always=True)

    def pop(self) -> Tensor:  # type: ignore[override]
        return super().pop()[0]


class OutputHooks(ForwardCapture):
    """Keeps the outputs of ``modules`` while capturing (feature maps for attention transfer)."""

    def __init__(self, modules: Sequence[nn.Module]):
        super().__init__(modules, lambda _m, _inputs, out: out)
