"""Logging where people look (metrics.csv, TensorBoard events) and `dfkd plot`, on tiny runs."""

from __future__ import annotations

import csv
import json
import math
import shutil
import sys

import pytest
import torch
import yaml
from helpers import TINY_DISTILL, assert_one_line_error, run_cli

import dfkd
from dfkd import load_config
from dfkd.commands.bench import TINY_METHOD
from dfkd.engine import rundir as rundir_module
from dfkd.errors import DataError, DfkdError

DEMO = "fashion-mnist/cudfkd-lenet5_bn-lenet5_half"
POOL = "fashion-mnist/deepinv-lenet5_bn-lenet5_half"


TINY_RUN = [o for o in TINY_DISTILL if not o.startswith("method.")]  # the method's own sizes differ


def distill_cfg(recipe, data_root, teacher_run, out, *extra):
    return load_config(
        "distill", recipe, [f"data.root={data_root}", f"teacher.weights={teacher_run}", f"out={out}", *TINY_RUN, *extra]
    )


def jsonl_rows(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def assert_csv_matches_jsonl(run):
    rows = jsonl_rows(run)
    with open(run / "metrics.csv", newline="") as f:
        reader = csv.DictReader(f)
        table = list(reader)
    assert reader.fieldnames == list(dict.fromkeys(k for row in rows for k in row))
    assert len(table) == len(rows)
    for row, line in zip(rows, table):
        for key, cell in line.items():
            value = row.get(key)
            if value is None:
                assert cell == ""
            elif isinstance(value, bool):
                assert cell == str(value).lower()
            elif isinstance(value, str):
                assert cell == value
            else:
                assert float(cell) == pytest.approx(value, rel=1e-12), key
    return rows, reader.fieldnames


def tensorboard_events(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    return events


def points(events, tag):
    return [(e.step, e.value) for e in events.Scalars(tag)]


@pytest.fixture(scope="module")
def generator_run(data_root, teacher_run, tmp_path_factory):
    """CuDFKD with a synthesis warm-up epoch (its row has other columns) and TensorBoard, interrupted while saving
    its last epoch (after that epoch's events were written), with a stray line of a lost epoch in metrics.jsonl,
    then resumed."""
    pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed")
    out = tmp_path_factory.mktemp("logplot") / "cudfkd"
    over = ["method.nz=16", "method.ngf=4", "train.epochs=1", "train.synthesis_warmup_epochs=1", "log.tensorboard=true"]
    original = rundir_module.RunDir.save_checkpoint

    def stop_at_last_epoch(self, state, is_best):
        if state["epoch"] == 2:
            raise KeyboardInterrupt
        original(self, state, is_best)

    rundir_module.RunDir.save_checkpoint = stop_at_last_epoch
    try:
        with pytest.raises(KeyboardInterrupt):
            dfkd.distill(distill_cfg(DEMO, data_root, teacher_run, out, *over))
    finally:
        rundir_module.RunDir.save_checkpoint = original
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"epoch": 2, "lost_epoch_only": 1.0}) + "\n")
    dfkd.distill(distill_cfg(DEMO, data_root, teacher_run, out, *over), resume=True)
    return out


def test_csv_beside_metrics_for_every_run(teacher_run, generator_run):
    rows, _ = assert_csv_matches_jsonl(teacher_run)
    assert [r["epoch"] for r in rows] == [1, 2]
    # a resumed run: the rows of the checkpoint's history and the redone epoch, never the lost epoch's line;
    # columns that only later rows have (the student's loss after the synthesis warm-up) are there
    rows, columns = assert_csv_matches_jsonl(generator_run)
    assert [r["epoch"] for r in rows] == [1, 2]
    assert "lost_epoch_only" not in columns
    assert rows[0].get("synthesis_warmup") is True and "train/loss" not in rows[0]
    assert {"synthesis_warmup", "train/loss", "eval/top1", "time/synth_seconds"} <= set(columns)


def test_tensorboard_has_every_metric_once_per_epoch_and_the_sample_grids(generator_run):
    rows = jsonl_rows(generator_run)
    events = tensorboard_events(generator_run)
    # the interrupted process logged epoch 2 before its checkpoint failed; the resume purged it: one point per epoch
    assert points(events, "eval/top1") == [(r["epoch"], pytest.approx(r["eval/top1"])) for r in rows]
    assert points(events, "step") == [(r["epoch"], r["step"]) for r in rows]
    loss = points(events, "train/loss")
    assert loss == [(r["epoch"], pytest.approx(r["train/loss"])) for r in rows if "train/loss" in r]
    numeric = {k for r in rows for k, v in r.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    assert numeric - {"epoch"} <= set(events.Tags()["scalars"])
    # the timing split: each epoch's share of the cumulative timers
    synth = [r["time/synth_seconds"] for r in rows]
    shares = [v for _, v in points(events, "epoch_time/synth_seconds")]
    assert shares == pytest.approx([synth[0], synth[1] - synth[0]], rel=1e-5)
    assert [e.step for e in events.Images("samples")] == [1, 2]


def test_train_teacher_writes_tensorboard(data_root, tmp_path):
    pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed")
    out = tmp_path / "teacher"
    cfg = load_config(
        "train-teacher",
        "teachers/fashion-mnist-32-lenet5_half",
        [f"data.root={data_root}", f"out={out}", "train.epochs=1", "data.val_size=64", "engine.progress=false"],
    )
    cfg.log.tensorboard = True
    dfkd.train_teacher(cfg)
    events = tensorboard_events(out)
    assert points(events, "eval/top1") == [(1, pytest.approx(jsonl_rows(out)[0]["eval/top1"]))]
    assert {"train/loss", "epoch_time/train_seconds"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Images("train_batch")] == [1]
    assert_csv_matches_jsonl(out)


def test_missing_tensorboard_is_one_line_before_anything_is_written(
    capsys, monkeypatch, data_root, teacher_run, tmp_path
):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if not installed
    out = tmp_path / "run"
    argv = ["distill", "--config", DEMO, f"data.root={data_root}", f"teacher.weights={teacher_run}", f"out={out}"]
    code, _, err = run_cli(capsys, *argv, *TINY_DISTILL, "train.epochs=1", "log.tensorboard=true")
    assert_one_line_error(code, err, "pip install 'dfkd[tensorboard]'")
    assert not out.exists()
    code, _, err = run_cli(
        capsys,
        "train-teacher",
        "--config",
        "teachers/fashion-mnist-32-lenet5_half",
        f"data.root={data_root}",
        f"out={tmp_path / 't'}",
        "log.tensorboard=true",
    )
    assert_one_line_error(code, err, "pip install 'dfkd[tensorboard]'")
    assert not (tmp_path / "t").exists()


def check_plot(run, numbers, real, synthetic):
    for name in ("tsne.png", "class_hist.png", "plot.json"):
        assert (run / "plots" / name).stat().st_size > 0, name
    assert json.loads((run / "plots" / "plot.json").read_text()) == numbers
    counts = torch.tensor(numbers["class_counts"], dtype=torch.float64)
    assert len(counts) == numbers["num_classes"] == 10 and len(numbers["classes"]) == 10
    assert counts.sum() == numbers["synthetic_images"] == synthetic and numbers["real_images"] == real
    p = counts[counts > 0] / synthetic
    assert numbers["class_entropy"] == pytest.approx(float(-(p * p.log()).sum()), abs=1e-12)
    assert 0 <= numbers["class_entropy"] <= math.log(10) + 1e-12


def test_plot_a_generator_run(capsys, generator_run):
    pytest.importorskip("sklearn", reason="the plot extra (scikit-learn) is not installed")
    code, out, err = run_cli(capsys, "plot", generator_run, "--real", 40, "--synthetic", 30)
    assert code == 0, err
    numbers = json.loads((generator_run / "plots" / "plot.json").read_text())
    check_plot(generator_run, numbers, real=40, synthetic=30)
    assert numbers["method"] == "cudfkd" and numbers["epoch"] == 2 and not numbers["synthesis_round_run"]
    assert "30 synthetic images against 40 real test images" in out and "plots/tsne.png" in out


@pytest.fixture(scope="module")
def pool_run(data_root, teacher_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("logplot") / "deepinv"
    tiny = [f"method.{k}={TINY_METHOD[k]}" for k in ("synthesis_batch_size", "pool_size")]
    over = ["train.epochs=1", "train.batch_size=8", "method.g_steps=2", *tiny]
    dfkd.distill(distill_cfg(POOL, data_root, teacher_run, out, *over))
    return out


def test_plot_a_pool_run_from_its_saved_pool(pool_run):
    pytest.importorskip("sklearn", reason="the plot extra (scikit-learn) is not installed")
    from dfkd.commands.plot import plot_run

    numbers = plot_run(pool_run, real=20, synthetic=12, which="best")
    check_plot(pool_run, numbers, real=20, synthetic=12)
    assert numbers["method"] == "deepinv" and numbers["checkpoint"].endswith("best.pt")
    assert numbers["epoch"] == json.loads((pool_run / "summary.json").read_text())["best_epoch"]
    assert not numbers["synthesis_round_run"]  # drawn from the pool the checkpoint holds


def test_plot_without_a_test_set_draws_synthetic_images_only(monkeypatch, pool_run):
    pytest.importorskip("sklearn", reason="the plot extra (scikit-learn) is not installed")
    from dfkd.commands import plot

    def no_files(*args, **kwargs):
        raise DataError("fashion-mnist test files not found")

    monkeypatch.setattr(plot, "load_split", no_files)
    numbers = plot.plot_run(pool_run, real=20, synthetic=8)
    check_plot(pool_run, numbers, real=0, synthetic=8)
    assert numbers["real_source"] is None and "fashion-mnist-32" in numbers["real_missing_reason"]


def test_a_method_without_images_synthesises_one_round_first():
    from dfkd.commands.plot import draw_synthetic
    from dfkd.methods import Batch, Progress

    class EmptyPool:
        name = "empty"
        images = None

        def preview(self, n):
            return self.images

        def synthesize(self, prog):
            self.images = torch.rand(5, 1, 4, 4)

        def next_batch(self, prog):
            return Batch(x=self.images)

    x, synthesised = draw_synthetic(EmptyPool(), Progress(0, 0, 0, 1, 1, 1), 12)
    assert synthesised and x.shape == (12, 1, 4, 4)


def test_plot_errors_are_one_line(capsys, monkeypatch, tmp_path, teacher_run, pool_run):
    code, _, err = run_cli(capsys, "plot", tmp_path / "nowhere")
    assert_one_line_error(code, err, "is not a directory")
    code, _, err = run_cli(capsys, "plot", tmp_path)
    assert_one_line_error(code, err, "holds no config.yaml")
    code, _, err = run_cli(capsys, "plot", teacher_run)
    assert_one_line_error(code, err, "is not a distillation run")
    code, _, err = run_cli(capsys, "plot", pool_run, "--synthetic", 0)
    assert_one_line_error(code, err, "--synthetic >= 1")

    copy = tmp_path / "copy"
    shutil.copytree(pool_run, copy, ignore=shutil.ignore_patterns("plots"))
    (copy / "ckpt" / "best.pt").unlink()
    code, _, err = run_cli(capsys, "plot", copy, "--which", "best")
    assert_one_line_error(code, err, "has no best checkpoint yet")
    config = yaml.safe_load((copy / "config.yaml").read_text())
    config["teacher"]["weights"] = None
    (copy / "config.yaml").write_text(yaml.safe_dump(config))
    code, _, err = run_cli(capsys, "plot", copy)
    assert_one_line_error(code, err, "teacher=MODULE")

    monkeypatch.setitem(sys.modules, "sklearn.manifold", None)
    code, _, err = run_cli(capsys, "plot", pool_run)
    assert_one_line_error(code, err, "pip install 'dfkd[plot]'")


def test_log_section_is_checked():
    assert load_config("distill", DEMO).log.tensorboard is False
    with pytest.raises(DfkdError, match="unknown config key 'log.tensorbaord'"):
        load_config("distill", DEMO, ["log.tensorbaord=true"])
