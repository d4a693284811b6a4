"""Every registered method, on tiny models: two rounds end to end, finite losses, a student that changes, state that
survives a checkpoint round trip, and the fixed return types of the interface."""

from __future__ import annotations

import copy
import dataclasses
import io

import pytest
import torch
from torch import nn

from dfkd.commands.bench import TINY_METHOD
from dfkd.data import DatasetInfo
from dfkd.engine.env import Env
from dfkd.methods import METHODS, Batch, Ctx, Progress
from dfkd.models import Normalized

INFO = DatasetInfo("tiny", 4, (3, 16, 16), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), tuple("abcd"), "16x16 test images")

# Keep every method tiny: gpu-check's tiny sizes, wherever a method's Config has them, and two synthesis steps.
TINY = {**TINY_METHOD, "g_steps": 2}


class TinyNet(nn.Module):
    """conv-BN-ReLU x2 + linear; BN layers so BN-statistics methods have something to match."""

    def __init__(self, width: int = 8):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.fc = nn.Linear(2 * width, INFO.num_classes)

    def forward(self, x):
        return self.fc(self.features(x))


def make_teacher() -> nn.Module:
    torch.manual_seed(123)
    net = TinyNet(8)
    net.train()
    with torch.no_grad():  # give the BN layers non-trivial running statistics
        for _ in range(3):
            net(torch.rand(16, 3, 16, 16) * 4 - 2)
    return Normalized(net, INFO.mean, INFO.std).eval().requires_grad_(False)


def tiny_config(name: str):
    cls = METHODS.get(name).Config
    fields = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in TINY.items() if k in fields})


def build(name: str, seed: int = 0):
    torch.manual_seed(seed)
    teacher = make_teacher()
    student = Normalized(TinyNet(4), INFO.mean, INFO.std)
    ctx = Ctx(teacher, student, INFO, Env(torch.device("cpu")), batch_size=8)
    return METHODS.get(name)(tiny_config(name), ctx), student


def run_rounds(method, student, rounds: int = 2, kd_steps: int = 2, start_round: int = 0):
    opt = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9)
    prog = Progress(0, 0, start_round * kd_steps, 2, 2, kd_steps)
    logs = []
    for r in range(start_round, start_round + rounds):
        prog.epoch, prog.round = divmod(r, 2)
        synth = method.synthesize(prog)
        assert isinstance(synth, dict) and all(isinstance(k, str) for k in synth)
        logs.append(synth)
        student.train()
        for _ in range(kd_steps):
            batch = method.next_batch(prog)
            assert isinstance(batch, Batch)
            assert batch.x.shape[1:] == INFO.image_shape
            assert batch.x.min() >= 0 and batch.x.max() <= 1
            out = method.student_loss(batch, student, prog)
            assert isinstance(out, dict) and "loss" in out and out["loss"].requires_grad
            opt.zero_grad()
            out["loss"].backward()
            opt.step()
            logs.append(out)
            prog.step += 1
    return logs


METHOD_NAMES = METHODS.names()


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_two_rounds_finite_and_student_changes(name):
    method, student = build(name)
    before = copy.deepcopy(student.state_dict())
    teacher_before = copy.deepcopy(method.ctx.teacher.state_dict())
    logs = run_rounds(method, student)
    for entry in logs:
        for key, value in entry.items():
            assert torch.isfinite(torch.as_tensor(value, dtype=torch.float64)).all(), (key, value)
    changed = [k for k, v in student.state_dict().items() if v.is_floating_point() and not torch.equal(v, before[k])]
    assert changed, "the student's weights did not change"
    assert all(torch.equal(v, teacher_before[k]) for k, v in method.ctx.teacher.state_dict().items()), "teacher moved"
    assert method.images_synthesized > 0
    preview = method.preview(4)
    # after two rounds every method has images to show: a generator's, or its pool's latest
    assert preview is not None and preview.shape == (4, *INFO.image_shape)
    assert preview.min() >= 0 and preview.max() <= 1
    method.close()


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_state_survives_a_checkpoint_round_trip(name):
    """Two rounds, save, continue two rounds == two rounds, save, load into a fresh method, continue two rounds."""
    method, student = build(name)
    run_rounds(method, student)
    buffer = io.BytesIO()
    torch.save(
        {
            "method": method.state_dict(),
            "extra": method.checkpoint_state(),
            "student": student.state_dict(),
            "rng": torch.get_rng_state(),
            "images": method.images_synthesized,
        },
        buffer,
    )
    run_rounds(method, student, start_round=2)
    expected = copy.deepcopy(student.state_dict())

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    fresh, fresh_student = build(name, seed=99)  # different init: everything must come from the checkpoint
    fresh.load_state_dict(saved["method"])
    fresh.load_checkpoint_state(saved["extra"])
    fresh.images_synthesized = saved["images"]
    fresh_student.load_state_dict(saved["student"])
    torch.set_rng_state(saved["rng"])
    run_rounds(fresh, fresh_student, start_round=2)
    for key, value in fresh_student.state_dict().items():
        assert torch.allclose(value.float(), expected[key].float(), atol=1e-5), key
    method.close()
    fresh.close()


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_every_tensor_a_method_hands_the_engine_lives_on_the_engine_device(name):
    """One round on the ``meta`` device, so a tensor made on the CPU by default (``torch.tensor(x)``) shows up as what
    it is on a GPU: a tensor on another device, which the engine's meters cannot stack with the others."""
    meta = torch.device("meta")
    torch.manual_seed(0)
    teacher, student = make_teacher().to(meta), Normalized(TinyNet(4), INFO.mean, INFO.std).to(meta)
    method = METHODS.get(name)(tiny_config(name), Ctx(teacher, student, INFO, Env(meta), batch_size=8)).to(meta)
    prog = Progress(0, 0, 0, 1, 1, 2)
    logged = dict(method.synthesize(prog))
    batch = method.next_batch(prog)
    logged.update(method.student_loss(batch, student, prog))
    assert batch.x.device == meta
    for key, value in logged.items():
        assert isinstance(value, (int, float)) or (torch.is_tensor(value) and value.device == meta), (key, value)
    method.close()


def test_best_iterate_keeps_the_lowest_loss_without_leaving_the_device():
    from dfkd.methods.base import BestIterate

    best = BestIterate()
    best.offer(torch.tensor(float("nan")), torch.zeros(2))  # the first offer is kept, whatever its loss
    assert torch.equal(best.values[0], torch.zeros(2))
    best = BestIterate()
    for loss, value in ((3.0, 1.0), (1.0, 2.0), (2.0, 3.0)):
        best.offer(torch.tensor(loss), torch.full((2,), value), torch.tensor([value]))
    assert best.loss.item() == 1.0 and torch.equal(best.values[0], torch.full((2,), 2.0))
    assert best.values[1].item() == 2.0
