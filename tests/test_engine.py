"""End to end on tiny data: train a teacher, distill, evaluate, resume, diverge."""

from __future__ import annotations

import json
import math
import time

import pytest
import torch
from helpers import TINY_DISTILL, NaNAfter, interrupted_after
from torch import nn

import dfkd
from dfkd import load_config
from dfkd.engine import rundir as rundir_module
from dfkd.engine.supervised import check_validation_slice
from dfkd.errors import ConfigError, DfkdError, DivergedError

DEMO = "fashion-mnist/cudfkd-lenet5_bn-lenet5_half"


def distill_cfg(data_root, teacher_run, out, *extra):
    return load_config(
        "distill",
        DEMO,
        [f"data.root={data_root}", f"teacher.weights={teacher_run}", f"out={out}", *TINY_DISTILL, *extra],
    )


def test_distill_writes_a_complete_run_dir(data_root, teacher_run, tmp_path):
    out = tmp_path / "run"
    summary = dfkd.distill(distill_cfg(data_root, teacher_run, out, "train.epochs=2"))
    for name in (
        "config.yaml",
        "metrics.jsonl",
        "summary.json",
        "ckpt/last.pt",
        "ckpt/best.pt",
        "accuracy.png",
        "samples/epoch_002.png",
        "log.txt",
    ):
        assert (out / name).is_file(), name
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert {
        "eval/top1",
        "eval/agreement",
        "eval/prob_loyalty",
        "eval/prob_loyalty_reference",
        "train/loss",
        "synth/loss_g",
        "synth/class_entropy",
        "time/synth_seconds",
        "time/batch_seconds",
    } <= set(rows[0])
    required = {
        "method",
        "teacher_top1",
        "student_top1_best",
        "student_top1_last",
        "agreement_best",
        "agreement_last",
        "prob_loyalty_best",
        "prob_loyalty_last",
        "mu",
        "var",
        "synth_seconds",
        "student_seconds",
        "total_seconds",
        "images_synthesized",
        "peak_memory_bytes",
    }
    assert required <= set(summary)
    assert summary == json.loads((out / "summary.json").read_text())
    assert 0 < summary["batch_seconds"] < summary["synth_seconds"]  # student batches are part of synthesis time
    assert summary["method"] == "cudfkd" and summary["student_steps"] == 2 * 2 * 2
    # 2 epochs x 2 rounds x (1 generator batch of 32 + 2 student batches of 32)
    assert summary["images_synthesized"] == 2 * 2 * (32 + 2 * 32)
    assert summary["synth_seconds"] > 0 and summary["student_seconds"] > 0 and summary["peak_memory_bytes"] > 0
    assert summary["student_top1_best"] == max(r["eval/top1"] for r in rows)
    assert summary["mu"] == pytest.approx(sum(r["eval/top1"] for r in rows) / 2)
    best_row = rows[summary["best_epoch"] - 1]
    assert summary["agreement_best"] == best_row["eval/agreement"]
    assert summary["agreement_last"] == rows[-1]["eval/agreement"]
    assert summary["prob_loyalty_best"] == best_row["eval/prob_loyalty"]
    assert isinstance(summary["images_synthesized"], int)
    # the logged rate is the one each epoch trained at: epoch 1 at train.lr, epoch 2 at the cosine's midpoint
    lr = load_config("distill", DEMO, []).train.lr
    assert [r["lr"] for r in rows] == pytest.approx([lr, lr * 0.5])
    ckpt = torch.load(out / "ckpt" / "last.pt", weights_only=True)
    assert ckpt["arch"] == "lenet5_half" and ckpt["epoch"] == 2
    # the distilled student is an ordinary checkpoint for `dfkd eval`
    result = dfkd.evaluate_weights(
        load_config("eval", None, [f"model.weights={out}", f"teacher.weights={teacher_run}", f"data.root={data_root}"])
    )
    assert result["arch"] == "lenet5_half" and result["dataset"] == "fashion-mnist-32"
    assert result["weights"].endswith("last.pt")  # the final weights, never the epoch the test set chose
    assert result["top1"] == pytest.approx(summary["student_top1_last"])


def test_runs_repeat_with_the_same_seed(data_root, teacher_run, tmp_path):
    a = dfkd.distill(distill_cfg(data_root, teacher_run, tmp_path / "a", "train.epochs=1"))
    b = dfkd.distill(distill_cfg(data_root, teacher_run, tmp_path / "b", "train.epochs=1"))
    c = dfkd.distill(distill_cfg(data_root, teacher_run, tmp_path / "c", "train.epochs=1", "engine.seed=1"))
    assert a["student_top1_last"] == b["student_top1_last"]
    sa = torch.load(tmp_path / "a" / "ckpt" / "last.pt", weights_only=True)["state_dict"]
    sb = torch.load(tmp_path / "b" / "ckpt" / "last.pt", weights_only=True)["state_dict"]
    sc = torch.load(tmp_path / "c" / "ckpt" / "last.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    # every logged loss and score repeats too (the times do not), and another seed's do not
    curves = [_metrics(tmp_path / name) for name in "abc"]
    assert curves[0] == curves[1] and curves[0] != curves[2]
    assert (a["seed"], c["seed"]) == (0, 1)


def test_total_time_counts_checkpoints_and_pictures(data_root, teacher_run, tmp_path, monkeypatch):
    slow = rundir_module.RunDir.save_checkpoint

    def save_slowly(self, *args, **kwargs):
        time.sleep(0.5)
        slow(self, *args, **kwargs)

    monkeypatch.setattr(rundir_module.RunDir, "save_checkpoint", save_slowly)
    summary = dfkd.distill(distill_cfg(data_root, teacher_run, tmp_path / "run", "train.epochs=2"))
    booked = summary["synth_seconds"] + summary["student_seconds"] + summary["eval_seconds"]
    assert summary["total_seconds"] >= booked + 2 * 0.5


def _metrics(path):
    rows = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]


def test_resume_reproduces_an_uninterrupted_run(data_root, teacher_run, tmp_path):
    full = tmp_path / "full"
    dfkd.distill(distill_cfg(data_root, teacher_run, full, "train.epochs=4"))

    cut = tmp_path / "cut"
    with interrupted_after(2), pytest.raises(KeyboardInterrupt):
        dfkd.distill(distill_cfg(data_root, teacher_run, cut, "train.epochs=4"))
    assert not (cut / "summary.json").exists() and len(_metrics(cut)) == 2

    with pytest.raises(DfkdError, match="already holds an unfinished run: pass --resume"):
        dfkd.distill(distill_cfg(data_root, teacher_run, cut, "train.epochs=4"))
    dfkd.distill(distill_cfg(data_root, teacher_run, cut, "train.epochs=4"), resume=True)
    assert _metrics(cut) == _metrics(full)
    a = torch.load(full / "ckpt" / "last.pt", weights_only=True)
    b = torch.load(cut / "ckpt" / "last.pt", weights_only=True)
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    assert all(torch.equal(a["method"][k], b["method"][k]) for k in a["method"])


def test_divergence_stops_and_keeps_the_last_good_checkpoint(data_root, teacher_run, tmp_path):
    net = dfkd.create_model("lenet5_bn", 10, 1)
    net.load_state_dict(torch.load(teacher_run / "ckpt" / "best.pt", weights_only=True)["state_dict"])
    # the teacher runs 1 (test-set) + per epoch 2 rounds x (1 + 2) forwards + 1 eval pass: sour in epoch 2
    out = tmp_path / "nan"
    cfg = distill_cfg(data_root, teacher_run, out, "train.epochs=3", "teacher.weights=null")
    teacher = NaNAfter(net, calls=1 + 2 * 3 + 2)
    with pytest.raises(DivergedError, match=r"diverged: .* in epoch 2; .*last good checkpoint: epoch 1"):
        dfkd.distill(cfg, teacher=teacher)
    # the failed run leaves the caller's teacher as it found it: no hooks of the method stay behind
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in teacher.modules())
    assert torch.load(out / "ckpt" / "last.pt", weights_only=True)["epoch"] == 1
    assert len(_metrics(out)) == 1
    # the run is recorded as what it is: a diverged run, never one that looks finished and fine
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "diverged" and "in epoch 2" in summary["status_reason"]
    assert summary["epochs"] == 1 and summary["student_top1_last"] == _metrics(out)[0]["eval/top1"]


def test_any_module_can_be_the_teacher(data_root, teacher_run, tmp_path):
    net = dfkd.create_model("lenet5_bn", 10, 1)
    net.load_state_dict(torch.load(teacher_run / "ckpt" / "best.pt", weights_only=True)["state_dict"])

    class MyTeacher(nn.Module):  # a user's own module, not from the zoo
        def __init__(self):
            super().__init__()
            self.body = net

        def forward(self, x):
            return self.body(x)

    cfg = distill_cfg(data_root, teacher_run, tmp_path / "own", "train.epochs=1", "teacher.weights=null")
    summary = dfkd.distill(cfg, teacher=MyTeacher())
    assert summary["teacher"] == "MyTeacher" and summary["teacher_top1"] > 50


def test_teacher_training_resumes(data_root, tmp_path):
    base = ["teachers/fashion-mnist-32-lenet5_half"]
    over = [
        f"data.root={data_root}",
        f"out={tmp_path / 't'}",
        "train.epochs=2",
        "train.batch_size=64",
        "engine.progress=false",
        "data.val_size=64",
    ]
    full = dfkd.train_teacher(load_config("train-teacher", base[0], over))
    over[1] = f"out={tmp_path / 'u'}"
    with interrupted_after(1), pytest.raises(KeyboardInterrupt):
        dfkd.train_teacher(load_config("train-teacher", base[0], over))
    resumed = dfkd.train_teacher(load_config("train-teacher", base[0], over), resume=True)
    assert resumed["top1_last"] == full["top1_last"] and resumed["epochs"] == 2


def test_bf16_autocast_runs_on_cpu(data_root, teacher_run, tmp_path):
    student = dfkd.create_model("lenet5_half", 10, 1)
    dtypes = []  # of the student's training forwards: bf16 where autocast ran them
    student.register_forward_hook(lambda module, args, out: dtypes.append(out.dtype) if module.training else None)
    summary = dfkd.distill(
        distill_cfg(
            data_root,
            teacher_run,
            tmp_path / "bf16",
            "train.epochs=1",
            "engine.precision=bf16",
            "engine.channels_last=true",
        ),
        student=student,
    )
    assert summary["device"].endswith("bf16") and summary["status"] == "ok"
    assert dtypes and set(dtypes) == {torch.bfloat16}
    (row,) = _metrics(tmp_path / "bf16")
    losses = {k: v for k, v in row.items() if k.startswith(("train/", "synth/"))}
    assert "train/loss" in losses and all(isinstance(v, float) and math.isfinite(v) for v in losses.values()), losses
    assert 0 <= summary["student_top1_last"] <= 100


def test_a_compiled_run_trains_and_keeps_the_checkpoint_keys(data_root, teacher_run, tmp_path):
    import torch._dynamo

    plain = dfkd.distill(distill_cfg(data_root, teacher_run, tmp_path / "plain", "train.epochs=1"))
    torch._dynamo.utils.counters.clear()
    compiled = dfkd.distill(
        distill_cfg(data_root, teacher_run, tmp_path / "c", "train.epochs=1", "engine.compile=true")
    )
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # it did compile
    checkpoints = {name: torch.load(tmp_path / name / "ckpt/last.pt", weights_only=True) for name in ("plain", "c")}
    # community checkpoints and `dfkd eval` load a compiled run's weights by the same names
    assert checkpoints["plain"]["state_dict"].keys() == checkpoints["c"]["state_dict"].keys()
    assert checkpoints["plain"]["method"].keys() == checkpoints["c"]["method"].keys()
    assert compiled["status"] == "ok" and compiled["student_steps"] == plain["student_steps"]


def test_compile_without_a_compiler_is_a_config_error(monkeypatch):
    from dfkd.engine import env as env_module

    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(env_module.shutil, "which", lambda name: None)
    with pytest.raises(DfkdError, match="engine.compile=true on a CPU needs a C\\+\\+ compiler"):
        env_module.setup_env("cpu", compile=True)


def test_synthesis_warmup_epochs_synthesise_without_training_the_student(data_root, teacher_run, tmp_path):
    out = tmp_path / "run"
    summary = dfkd.distill(
        distill_cfg(data_root, teacher_run, out, "train.epochs=1", "train.synthesis_warmup_epochs=2")
    )
    rows = _metrics(out)
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert [r.get("synthesis_warmup", False) for r in rows] == [True, True, False]
    assert [r["step"] for r in rows] == [0, 0, 4]  # student steps only after the warm-up
    assert all("synth/loss_g" in r for r in rows) and "train/loss" not in rows[0] and "train/loss" in rows[2]
    # the untrained student is evaluated but is neither the best student nor in the accuracy curve
    assert summary["best_epoch"] == 3 and summary["synthesis_warmup_epochs"] == 2 and summary["epochs"] == 3
    assert rows[0]["eval/top1"] == rows[1]["eval/top1"]  # no student step moved it
    ckpt = torch.load(out / "ckpt" / "last.pt", weights_only=True)
    assert ckpt["scheduler"]["last_epoch"] == 1  # the schedule steps in distillation epochs only


def test_a_validation_slice_the_teacher_trained_on_is_refused(data_root, teacher_run, tmp_path, caplog):
    # the teacher held out 64 training images (data.val_size=64): a slice of 128 holds 64 images it trained on
    out = tmp_path / "val"
    with pytest.raises(ConfigError) as refused:
        dfkd.distill(distill_cfg(data_root, teacher_run, out, "eval.split=val", "data.val_size=128"))
    message = str(refused.value)
    assert "\n" not in message and "data.val_size=128" in message and "data.val_size=64 or less" in message
    assert str(teacher_run) in message and not out.exists()  # refused before anything was written

    def warnings_for(weights, val_size: int) -> list[str]:
        caplog.clear()
        cfg = distill_cfg(data_root, weights, out, "eval.split=val", f"data.val_size={val_size}")
        check_validation_slice(cfg.data, cfg.eval.split, cfg.teacher.weights)
        return [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]

    with caplog.at_level("WARNING", logger="dfkd"):
        assert warnings_for(teacher_run, 64) == [] and warnings_for(teacher_run, 32) == []  # inside its held-out part
        bare = tmp_path / "bare.pt"  # a state dict alone, as a zoo teacher comes: it does not say what it trained on
        torch.save(torch.load(teacher_run / "ckpt" / "last.pt", weights_only=True)["state_dict"], bare)
        (warning,) = warnings_for(bare, 64)
        assert "does not record which images it trained on" in warning and "data.val_size=64" in warning


@pytest.mark.parametrize(("split", "where"), [("test", "test"), ("val", "validation")])
def test_the_first_log_line_names_the_split_the_teacher_was_scored_on(data_root, teacher_run, tmp_path, split, where):
    from dfkd.engine.distill import _evaluation_text

    cfg = distill_cfg(data_root, teacher_run, tmp_path / "run", f"eval.split={split}", "data.val_size=64")
    assert _evaluation_text(cfg, torch.zeros(5, 4), 91.0) == f"teacher top-1 91.00% on 5 {where} images"
