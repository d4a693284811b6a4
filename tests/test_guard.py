"""The collapse guard: its signals on hand-made logits, its status logic, and runs that collapse for real."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import TINY_DISTILL

import dfkd
from dfkd import load_config
from dfkd.engine.guard import (
    MIN_STEPS,
    CollapseGuard,
    agreement_kappa,
    chance_agreement_percent,
    class_shares,
    collapse_reasons,
)
from dfkd.methods.cudfkd import spl_weight

DEMO = "fashion-mnist/cudfkd-lenet5_bn-lenet5_half"


def one_hot_logits(classes: list[int], k: int = 10, scale: float = 5.0) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(classes), k).float() * scale


BALANCED = [i % 10 for i in range(100)]


def test_class_shares_and_chance_agreement_by_hand():
    teacher = one_hot_logits(BALANCED)  # 10 % each
    constant = one_hot_logits([3] * 100)
    assert class_shares(constant, 10)[3] == 1.0
    # a constant student agrees with a balanced teacher on exactly the 10 % of class 3, which is its chance level
    assert chance_agreement_percent(constant, teacher) == pytest.approx(10.0)
    assert agreement_kappa(10.0, 10.0) == 0.0 and agreement_kappa(100.0, 10.0) == 1.0
    assert agreement_kappa(55.0, 10.0) == pytest.approx(0.5)


def test_a_healthy_student_raises_no_signal():
    teacher = one_hot_logits(BALANCED)
    student = one_hot_logits([c if i % 4 else (c + 1) % 10 for i, c in enumerate(BALANCED)])  # 75 % agreement
    assert collapse_reasons(75.0, student, teacher, teacher_top1=90.0, student_loss=0.8) == []


def test_a_one_class_student_is_flagged_twice():
    teacher = one_hot_logits(BALANCED)
    student = one_hot_logits([7] * 100)
    reasons = collapse_reasons(10.0, student, teacher, teacher_top1=90.0, student_loss=0.5)
    assert len(reasons) == 2
    assert "agreement with the teacher at chance (10.00% vs 10.00% by chance)" in reasons[0]
    assert "one class for 100.0%" in reasons[1]


def test_accuracy_signals_wait_for_the_student_to_have_trained():
    teacher = one_hot_logits(BALANCED)
    student = one_hot_logits([7] * 100)  # what a freshly initialised network often does
    assert collapse_reasons(10.0, student, teacher, 90.0, student_loss=2.0, student_steps=MIN_STEPS - 1) == []
    assert len(collapse_reasons(10.0, student, teacher, 90.0, student_loss=2.0, student_steps=MIN_STEPS)) == 2
    assert len(collapse_reasons(10.0, student, teacher, 90.0, student_loss=0.0, student_steps=1)) == 1


def test_zero_loss_for_a_whole_epoch_is_flagged_even_when_accuracy_looks_fine():
    teacher = one_hot_logits(BALANCED)
    reasons = collapse_reasons(100.0, teacher.clone(), teacher, teacher_top1=90.0, student_loss=0.0)
    assert reasons == ["student loss 0 for the whole epoch (no gradient reaches the student)"]
    assert collapse_reasons(100.0, teacher.clone(), teacher, teacher_top1=90.0, student_loss=1e-6) == []


def test_an_uninformative_teacher_does_not_make_its_student_collapsed():
    teacher = one_hot_logits([2] * 95 + [1] * 5)  # the teacher itself predicts one class
    student = one_hot_logits([2] * 100)
    assert collapse_reasons(95.0, student, teacher, teacher_top1=10.0, student_loss=0.3) == []


def test_guard_status_and_patience():
    guard = CollapseGuard(stop=True, patience=2)
    guard.update(1, ["x"])
    assert not guard.should_stop and guard.status(1)[0] == "collapsed"
    guard.update(2, [])
    assert guard.status(2) == ("ok", None) and guard.streak == 0  # recovered: the run is judged by its end
    guard.update(3, ["a"])
    guard.update(4, ["b"])
    assert guard.should_stop
    guard.stopped_early = True
    status, reason = guard.status(4)
    assert status == "collapsed" and reason == "b (stopped early at epoch 4)"
    restored = CollapseGuard()
    restored.load_state_dict(guard.state_dict())
    assert restored.flagged == guard.flagged and restored.streak == 2 and restored.stopped_early
    assert not CollapseGuard(stop=False, patience=1).should_stop


def test_spl_floor_keeps_a_diverged_loss_from_being_silenced():
    huge = torch.tensor([18869.0, 2.0])
    reference = spl_weight(huge, 2.0, "log")
    assert reference[0] == 0.0  # the reference: a blown-up student never gets a gradient again
    floored = spl_weight(huge, 2.0, "log", floor=0.05)
    assert floored[0] == pytest.approx(0.05) and floored[1] == pytest.approx(reference[1])
    assert spl_weight(huge, 2.0, "hard", floor=0.1).tolist() == pytest.approx([0.1, 0.1])
    assert spl_weight(huge, 2.0, "none", floor=0.1).tolist() == [1.0, 1.0]


def tiny(data_root, teacher_run, out, *extra):
    return load_config(
        "distill",
        DEMO,
        [f"data.root={data_root}", f"teacher.weights={teacher_run}", f"out={out}", *TINY_DISTILL, *extra],
    )


# A student learning rate no recipe would use: the first steps blow the student's logits up, the log self-paced
# weight of the resulting loss (KL x T^2 in the millions) is exactly 0, and the student never trains again.
ABSURD = ["train.lr=300", "train.momentum=0", "train.weight_decay=0", "train.epochs=4"]


def test_a_cudfkd_student_that_blows_up_ends_as_collapsed(data_root, teacher_run, tmp_path):
    out = tmp_path / "blown"
    summary = dfkd.distill(tiny(data_root, teacher_run, out, *ABSURD))
    assert summary["status"] == "collapsed", summary
    assert "at epoch 4" in summary["status_reason"]
    assert summary["collapsed_epochs"][-1] == 4
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["train/spl_weight"] < 1e-6 and rows[-1]["train/difficulty"] > 100  # the freeze, as logged
    assert json.loads((out / "summary.json").read_text())["status"] == "collapsed"
    assert len(rows) == 4  # without stop_on_collapse the run goes to its end


def test_stop_on_collapse_ends_the_run_early(data_root, teacher_run, tmp_path):
    out = tmp_path / "stopped"
    summary = dfkd.distill(
        tiny(data_root, teacher_run, out, *ABSURD, "engine.stop_on_collapse=true", "engine.collapse_patience=2")
    )
    # the first epoch still has the steps before the blow-up; from the second on the loss is exactly 0
    assert summary["status"] == "collapsed" and "stopped early at epoch 3" in summary["status_reason"]
    assert summary["collapsed_epochs"] == [2, 3] and summary["epochs"] == 3 and (out / "ckpt" / "last.pt").is_file()


def test_the_spl_floor_keeps_the_same_student_training(data_root, teacher_run, tmp_path):
    out = tmp_path / "floored"
    summary = dfkd.distill(tiny(data_root, teacher_run, out, *ABSURD, "method.spl_floor=0.05"))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(row["train/loss"] > 0 and row["train/spl_weight"] >= 0.05 for row in rows)  # never silenced
    assert summary["status"] == "ok" and summary["collapsed_epochs"] == []
