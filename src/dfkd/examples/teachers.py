"""Teacher factories for ``teacher.arch=py:dfkd.examples.teachers:FUNCTION``: the pattern for your own.

A factory takes no arguments and returns an ``nn.Module``; it may attach a :class:`~dfkd.models.meta.TeacherMeta`
saying what the network expects (the engine then normalises with its mean/std and checks the data against it).
Weights come from ``teacher.weights=FILE`` or from the factory itself.
"""

from __future__ import annotations

from torch import nn

from dfkd.data import dataset_info
from dfkd.models import create_model
from dfkd.models.meta import TeacherMeta, attach_meta


def lenet5_bn_fashion() -> nn.Module:
    """The zoo's BN-LeNet-5 for Fashion-MNIST at 32x32 (what `dfkd train-teacher` trains), with its input facts."""
    info = dataset_info("fashion-mnist-32")
    net = create_model("lenet5_bn", info.num_classes, info.image_shape[0])
    meta = TeacherMeta(info.mean, info.std, info.image_shape, info.num_classes, info.classes, "dfkd.examples")
    return attach_meta(net, meta)
