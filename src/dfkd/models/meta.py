"""What a teacher knows about its own input: normalisation, image shape, classes.

Teachers from other libraries carry it (timm's ``pretrained_cfg``, torchvision's weight enums, a dfkd export card);
a loader attaches it to the network it returns as ``net.dfkd_meta`` and the engine reads it back with
:func:`teacher_meta`, so a run can take mean/std, input size and class count from the teacher instead of the config.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class TeacherMeta:
    """Facts a teacher's source states about it; None where the source says nothing.

    Attributes:
        mean: per-channel mean of the [0, 1] images it was trained on.
        std: per-channel std, same convention.
        input_shape: ``(C, H, W)`` of the images it expects.
        num_classes: number of logits.
        classes: class names, index = logit.
        source: where it came from, for messages and the export card (e.g. ``"timm:resnet18"``).
    """

    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    input_shape: tuple[int, int, int] | None = None
    num_classes: int | None = None
    classes: tuple[str, ...] | None = None
    source: str = ""


def attach_meta(net: nn.Module, meta: TeacherMeta) -> nn.Module:
    """Record ``meta`` on ``net`` (as ``net.dfkd_meta``) and return ``net``."""
    net.dfkd_meta = meta
    return net


def teacher_meta(net: nn.Module) -> TeacherMeta:
    """The :class:`TeacherMeta` recorded on ``net`` (or on the network a wrapper holds), else an empty one."""
    seen = net
    while isinstance(seen, nn.Module):
        meta = getattr(seen, "dfkd_meta", None)
        if isinstance(meta, TeacherMeta):
            return meta
        seen = getattr(seen, "net", None) or getattr(seen, "module", None)
    return TeacherMeta()


__all__ = ["TeacherMeta", "attach_meta", "teacher_meta"]
