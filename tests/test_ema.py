"""The student's weight average (train.ema_decay): the arithmetic, passivity, checkpoints and resume."""

from __future__ import annotations

import pytest
import torch
from helpers import interrupted_after
from test_engine import _metrics, distill_cfg
from torch import nn

import dfkd
from dfkd.engine.ema import StudentEMA, ema_new_weight
from dfkd.errors import ConfigError


def test_bias_corrected_weights():
    assert ema_new_weight(1, 0.999) == 1.0  # the first update copies the student
    assert ema_new_weight(2, 0.5) == pytest.approx(0.5 / 0.75)
    assert ema_new_weight(100_000, 0.999) == pytest.approx(0.001)  # then the plain 1 - decay


def test_average_by_hand():
    net = nn.Sequential(nn.Linear(1, 1, bias=False), nn.BatchNorm1d(1))
    with torch.no_grad():
        net[0].weight.fill_(1.0)
    ema = StudentEMA(net, 0.5)
    with torch.no_grad():
        net[0].weight.fill_(3.0)
        net[1].running_mean.fill_(2.0)
        net[1].num_batches_tracked.fill_(7)
    ema.update(net)  # the first update copies
    assert ema.module[0].weight.item() == 3.0
    assert ema.module[1].running_mean.item() == 2.0  # float buffers are averaged too
    assert ema.module[1].num_batches_tracked.item() == 7  # integer buffers are copied
    with torch.no_grad():
        net[0].weight.fill_(5.0)
        net[1].running_mean.fill_(4.0)
    ema.update(net)  # (0.5 * 3 + 5) / 1.5 and (0.5 * 2 + 4) / 1.5: the initial 1.0 never counts
    assert ema.module[0].weight.item() == pytest.approx(6.5 / 1.5)
    assert ema.module[1].running_mean.item() == pytest.approx(5.0 / 1.5)
    assert not ema.module[0].weight.requires_grad and not ema.module.training


def test_the_average_is_passive_and_is_what_the_run_evaluates(data_root, teacher_run, tmp_path):
    plain = dfkd.distill(distill_cfg(data_root, teacher_run, tmp_path / "plain", "train.epochs=2"))
    averaged = dfkd.distill(
        distill_cfg(data_root, teacher_run, tmp_path / "ema", "train.epochs=2", "train.ema_decay=0.9")
    )
    a = torch.load(tmp_path / "plain" / "ckpt" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "ema" / "ckpt" / "last.pt", weights_only=True)
    # the live student of the averaged run is bit for bit the student of the plain run
    assert all(torch.equal(a["state_dict"][k], b["live_state_dict"][k]) for k in a["state_dict"])
    assert not all(torch.equal(b["state_dict"][k], b["live_state_dict"][k]) for k in a["state_dict"])
    assert b["ema_updates"] == averaged["student_steps"] == plain["student_steps"]
    rows_plain, rows_ema = _metrics(tmp_path / "plain"), _metrics(tmp_path / "ema")
    assert [r["eval/top1"] for r in rows_plain] == [r["eval/top1_live"] for r in rows_ema]
    assert averaged["student_top1_last"] == rows_ema[-1]["eval/top1"]
    # `dfkd eval` of the run's directory scores the averaged weights it evaluated
    result = dfkd.evaluate_weights(
        dfkd.load_config("eval", None, [f"model.weights={tmp_path / 'ema'}", f"data.root={data_root}"])
    )
    assert result["top1"] == pytest.approx(b["top1"]) == pytest.approx(averaged["student_top1_last"])


def test_resume_with_the_average_reproduces_the_uninterrupted_run(data_root, teacher_run, tmp_path):
    args = ("train.epochs=3", "train.ema_decay=0.9")
    dfkd.distill(distill_cfg(data_root, teacher_run, tmp_path / "full", *args))
    with interrupted_after(1), pytest.raises(KeyboardInterrupt):
        dfkd.distill(distill_cfg(data_root, teacher_run, tmp_path / "cut", *args))
    with pytest.raises(ConfigError, match="written with train.ema_decay"):
        dfkd.distill(distill_cfg(data_root, teacher_run, tmp_path / "cut", "train.epochs=3"), resume=True)
    dfkd.distill(distill_cfg(data_root, teacher_run, tmp_path / "cut", *args), resume=True)
    assert _metrics(tmp_path / "cut") == _metrics(tmp_path / "full")
    a = torch.load(tmp_path / "full" / "ckpt" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "cut" / "ckpt" / "last.pt", weights_only=True)
    for key in ("state_dict", "live_state_dict"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key])


def test_a_decay_outside_its_range_is_a_config_error(data_root, teacher_run, tmp_path):
    with pytest.raises(ConfigError, match=r"train.ema_decay=1.0: give a decay in \[0, 1\)"):
        dfkd.distill(distill_cfg(data_root, teacher_run, tmp_path / "bad", "train.ema_decay=1.0"))
    assert not (tmp_path / "bad" / "summary.json").exists()
