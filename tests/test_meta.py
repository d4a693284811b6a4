"""A teacher's own metadata survives the wrappers the engine puts around it."""

from torch import nn

from dfkd.models import Normalized, create_model
from dfkd.models.meta import TeacherMeta, attach_meta, teacher_meta


def test_meta_is_found_through_the_normalising_wrapper_and_absent_meta_is_empty():
    meta = TeacherMeta(mean=(0.5,), std=(0.25,), input_shape=(1, 28, 28), num_classes=10, source="py:pkg:make")
    net = attach_meta(create_model("lenet5", 10, 1), meta)
    assert teacher_meta(Normalized(net, (0.5,), (0.25,))) is meta
    assert teacher_meta(nn.Linear(2, 2)) == TeacherMeta()
