"""The collapse guard: its signals on hand-made logits, its status logic, and runs that collapse for real."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import TINY_DISTILL, NaNAfter, save_png, tiny_bench_args
from helpers import run_cli as run
from torch import nn

import dfkd
from dfkd import load_config
from dfkd.engine.guard import (
    MIN_STEPS,
    CollapseGuard,
    agreement_kappa,
    chance_agreement_percent,
    class_shares,
    collapse_reasons,
    teacher_is_informative,
)
from dfkd.errors import DivergedError
from dfkd.methods.cudfkd import spl_weight
from dfkd.metrics import agreement_percent, top1_percent
from dfkd.models import create_model

DEMO = "fashion-mnist/cudfkd-lenet5_bn-lenet5_half"


def one_hot_logits(classes: list[int], k: int = 10, scale: float = 5.0) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(classes), k).float() * scale


BALANCED = [i % 10 for i in range(100)]
LABELS = torch.tensor(BALANCED)  # the balanced teacher is right on every image


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
    assert collapse_reasons(75.0, student, teacher, labels=LABELS, student_loss=0.8) == []


def test_a_one_class_student_is_flagged_twice():
    teacher = one_hot_logits(BALANCED)
    student = one_hot_logits([7] * 100)
    reasons = collapse_reasons(10.0, student, teacher, labels=LABELS, student_loss=0.5)
    assert len(reasons) == 2
    assert "agreement with the teacher no better than chance (10.00% vs 10.00% by chance)" in reasons[0]
    assert "one class for 100.0%" in reasons[1]


def test_accuracy_signals_wait_for_the_student_to_have_trained():
    teacher = one_hot_logits(BALANCED)
    student = one_hot_logits([7] * 100)  # what a freshly initialised network often does
    assert collapse_reasons(10.0, student, teacher, LABELS, student_loss=2.0, student_steps=MIN_STEPS - 1) == []
    assert len(collapse_reasons(10.0, student, teacher, LABELS, student_loss=2.0, student_steps=MIN_STEPS)) == 2
    assert len(collapse_reasons(10.0, student, teacher, LABELS, student_loss=0.0, student_steps=1)) == 1


def test_zero_loss_for_a_whole_epoch_is_flagged_even_when_accuracy_looks_fine():
    teacher = one_hot_logits(BALANCED)
    reasons = collapse_reasons(100.0, teacher.clone(), teacher, labels=LABELS, student_loss=0.0)
    assert reasons == ["student loss 0 for the whole epoch (no gradient reaches the student)"]
    assert collapse_reasons(100.0, teacher.clone(), teacher, labels=LABELS, student_loss=1e-4) == []


def test_an_uninformative_teacher_does_not_make_its_student_collapsed():
    teacher = one_hot_logits([2] * 95 + [1] * 5)  # the teacher itself predicts one class
    student = one_hot_logits([2] * 100)
    assert collapse_reasons(95.0, student, teacher, labels=LABELS, student_loss=0.3) == []
    assert collapse_reasons(95.0, student, teacher, labels=None, student_loss=0.3) == []
    # a teacher whose answers ignore the labels: balanced, but right only by chance (10 %) on ten balanced classes
    guessing = one_hot_logits([(i // 10) % 10 for i in range(100)])
    independent = one_hot_logits([(i * 7) % 10 for i in range(100)])
    agreement = agreement_percent(independent, guessing)
    assert agreement_kappa(agreement, chance_agreement_percent(independent, guessing)) < 0.02
    assert collapse_reasons(agreement, independent, guessing, labels=LABELS, student_loss=0.3) == []
    assert len(collapse_reasons(agreement, independent, guessing, labels=None, student_loss=0.3)) == 1


def binary_logits(classes: list[int]) -> torch.Tensor:
    return one_hot_logits(classes, k=2)


def test_agreement_at_chance_is_judged_with_two_balanced_classes():
    teacher = binary_logits([i % 2 for i in range(100)])
    independent = binary_logits([(i // 2) % 2 for i in range(100)])  # 50 / 50, and half of each teacher class
    agreement = agreement_percent(independent, teacher)
    assert agreement == 50.0 and chance_agreement_percent(independent, teacher) == pytest.approx(50.0)
    reasons = collapse_reasons(agreement, independent, teacher, None, student_loss=0.7)
    assert len(reasons) == 1 and "chance (50.00% vs 50.00% by chance)" in reasons[0]
    inverted = binary_logits([1 - i % 2 for i in range(100)])  # always the other class: worse than chance
    assert "chance (0.00% vs 50.00% by chance)" in collapse_reasons(0.0, inverted, teacher, None, 0.7)[0]
    good = binary_logits([i % 2 if i % 10 else 1 - i % 2 for i in range(100)])  # 90 % agreement
    assert collapse_reasons(agreement_percent(good, teacher), good, teacher, None, student_loss=0.7) == []


@pytest.mark.parametrize(
    "teacher_classes, k",
    [
        ([0] * 70 + [1] * 30, 2),  # two classes, 70 / 30
        ([0] * 60 + [1 + i % 9 for i in range(40)], 10),  # ten classes, 60 % of the images in one
    ],
)
def test_agreement_at_chance_is_judged_on_skewed_sets(teacher_classes, k):
    teacher = one_hot_logits(teacher_classes, k)
    # the student has the teacher's class frequencies but ignores the image: it shuffles the teacher's answers
    shuffled = [teacher_classes[i] for i in torch.randperm(100, generator=torch.Generator().manual_seed(0))]
    student = one_hot_logits(shuffled, k)
    agreement = agreement_percent(student, teacher)
    chance = chance_agreement_percent(student, teacher)
    assert agreement_kappa(agreement, chance) < 0.02  # the premise: a student at chance
    labels = torch.tensor(teacher_classes)  # the teacher is right on every image
    reasons = collapse_reasons(agreement, student, teacher, labels, student_loss=0.7)
    assert len(reasons) == 1 and f"({agreement:.2f}% vs {chance:.2f}% by chance)" in reasons[0]
    # the same student copying the teacher is fine, however skewed the set
    assert collapse_reasons(100.0, teacher.clone(), teacher, labels, student_loss=0.7) == []


def right_on(percent: int) -> torch.Tensor:
    """Logits on 1,000 images of ten balanced classes (labels ``i % 10``), in equal shares per class, right on exactly
    ``percent`` % of them: each block of ten images is answered with its labels shifted by 0 (right) or 1..9."""
    shifts = [0 if block < percent else 1 + block % 9 for block in range(100)]
    return one_hot_logits([(i % 10 + shifts[i // 10]) % 10 for i in range(1000)])


THOUSAND_LABELS = torch.tensor([i % 10 for i in range(1000)])


def test_the_teachers_bars_one_class_under_90_percent_and_kappa_0_05():
    others = [1 + i % 9 for i in range(11)]
    assert not teacher_is_informative(one_hot_logits([0] * 90 + others[:10]), None)  # 90 % is not under 90 %
    assert teacher_is_informative(one_hot_logits([0] * 89 + others), None)
    # kappa 0.05 against the labels is about 1.5 x chance top-1 on ten balanced classes: 16 % informs, 14 % does not
    for percent, informative in ((16, True), (14, False)):
        teacher = right_on(percent)
        assert (
            top1_percent(teacher, THOUSAND_LABELS) == pytest.approx(percent) and class_shares(teacher, 10).max() == 0.1
        )
        assert teacher_is_informative(teacher, THOUSAND_LABELS) is informative, percent


def test_the_students_bars_kappa_0_02_and_one_class_from_90_percent():
    teacher = right_on(100)
    slow = right_on(19)  # agrees with the teacher on 19 % where chance is 10 %: kappa 0.1, learning, not collapsed
    agreement = agreement_percent(slow, teacher)
    assert agreement_kappa(agreement, chance_agreement_percent(slow, teacher)) == pytest.approx(0.1)
    assert collapse_reasons(agreement, slow, teacher, THOUSAND_LABELS, student_loss=0.5) == []
    teacher = one_hot_logits(BALANCED)
    for share, flagged in ((90, True), (89, False)):
        student = one_hot_logits([7] * share + [c for c in range(10) if c != 7] * 2)[:100]
        assert class_shares(student, 10)[7] == share / 100
        reasons = collapse_reasons(agreement_percent(student, teacher), student, teacher, LABELS, student_loss=0.5)
        assert any(r.startswith(f"the student predicts one class for {share}.0%") for r in reasons) is flagged


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
ABSURD = [
    "train.lr=3000",
    "train.momentum=0",
    "train.weight_decay=0",
    "train.epochs=4",
    # the reference's behaviour: no warm-up, no clipping, no floor on the self-paced weight
    "train.warmup_steps=0",
    "train.grad_clip=null",
    "method.spl_floor=0",
]


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


def test_a_run_that_collapses_then_diverges_keeps_its_collapsed_epochs(data_root, teacher_run, tmp_path):
    net = dfkd.create_model("lenet5_bn", 10, 1)
    net.load_state_dict(torch.load(teacher_run / "ckpt" / "last.pt", weights_only=True)["state_dict"])
    # the teacher answers the test set once, then 2 rounds x (1 + 2) forwards per epoch: it goes bad in epoch 4
    teacher = NaNAfter(net, calls=1 + 3 * 2 * 3 + 2)
    cfg = tiny(data_root, "null", tmp_path / "both", *ABSURD)
    with pytest.raises(DivergedError, match="in epoch 4"):
        dfkd.distill(cfg, teacher=teacher)
    summary = json.loads((tmp_path / "both" / "summary.json").read_text())
    assert summary["status"] == "diverged" and summary["collapsed_epochs"] == [2, 3]


def test_the_spl_floor_keeps_the_same_student_training(data_root, teacher_run, tmp_path):
    out = tmp_path / "floored"
    summary = dfkd.distill(tiny(data_root, teacher_run, out, *ABSURD, "train.lr=300", "method.spl_floor=0.05"))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(row["train/loss"] > 0 and row["train/spl_weight"] >= 0.05 for row in rows)  # never silenced
    assert summary["status"] == "ok" and summary["collapsed_epochs"] == []


# -- seeds: aggregation over known per-seed summaries, the table, the CLI ---------------------------------------------


def seed_summary(seed: int, best: float, last: float, status: str = "ok") -> dict:
    return {
        "method": "cudfkd",
        "seed": seed,
        "status": status,
        "student_top1_best": best,
        "student_top1_last": last,
        "agreement_best": last + 1.0,
        "agreement_last": last + 2.0,
        "eval_split": "test",
        "mu": last - 2.0,
        "var": 4.0 * seed,
        "images_synthesized": 1000,
        "total_seconds": 60.0 + seed,
        "teacher_top1": 90.0,
        "device": "cpu (CPU, 2 threads), fp32",
        "run_dir": f"/nonexistent/seed{seed}",
    }


def test_aggregate_seeds_by_hand():
    from dfkd.commands.bench import aggregate_seeds

    runs = [seed_summary(0, 80.0, 78.0), seed_summary(1, 82.0, 80.0), seed_summary(2, 10.0, 10.0, "collapsed")]
    agg = aggregate_seeds(runs)
    assert agg["seeds"] == [0, 1, 2] and agg["n"] == 3 and agg["n_ok"] == 2
    # the collapsed seed is counted and named, never averaged in: mean of 80 and 82, sample std sqrt(2)
    assert agg["student_top1_best"]["mean"] == pytest.approx(81.0)
    assert agg["student_top1_best"]["std"] == pytest.approx(2**0.5)
    assert agg["student_top1_last"]["mean"] == pytest.approx(79.0)
    assert agg["collapsed"] == 1 and agg["diverged"] == 0 and agg["failed_seeds"] == [2]
    single = aggregate_seeds([seed_summary(5, 70.0, 69.0)])
    assert single["student_top1_best"] == {"mean": 70.0, "std": 0.0}


def test_seed_table_marks_failed_seeds():
    from dfkd.commands.bench import format_seed_table

    runs = [seed_summary(0, 80.0, 78.0), seed_summary(1, 10.0, 10.0, "collapsed")]
    table = format_seed_table("title", [("fashion-mnist/cudfkd-lenet5_bn-lenet5_half", runs)])
    lines = table.splitlines()
    row = next(line for line in lines if line.startswith("| cudfkd | 0,1 |"))
    # the headline is the last epoch, of the seed that did not fail alone (one seed: std 0)
    assert "**1/2** (seeds 1) | 78.00 ± 0.00 | 80.00 ± 0.00 |" in row
    assert "| cudfkd | 1 | **COLLAPSED** | 10.00 | 10.00 |" in table
    assert "| cudfkd | 0 | ok | 78.00 | 80.00 |" in table
    header = next(line for line in lines if line.startswith("| method | seeds |"))
    assert "| last top-1 % | best top-1 % (test-selected) |" in header


def test_seed_table_shows_the_last_epochs_class_entropy(tmp_path):
    from dfkd.commands.bench import format_seed_table

    runs = []
    for seed, entropy in ((0, 0.9), (1, 0.5)):
        run = tmp_path / f"seed{seed}"
        run.mkdir()
        rows = [{"epoch": 1, "synth/class_entropy": 0.1}, {"epoch": 2, "synth/class_entropy": entropy}]
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        runs.append({**seed_summary(seed, 80.0, 78.0), "run_dir": str(run)})
    table = format_seed_table("title", [("fashion-mnist/cudfkd-lenet5_bn-lenet5_half", runs)])
    header = next(line for line in table.splitlines() if line.startswith("| method | seeds |")).split(" | ")
    row = next(line for line in table.splitlines() if line.startswith("| cudfkd | 0,1 |")).split(" | ")
    assert row[header.index("class entropy")] == "0.70"  # the mean of the last epochs, not of every epoch
    seed1 = next(line for line in table.splitlines() if line.startswith("| cudfkd | 1 |")).split(" | ")
    assert seed1[header.index("class entropy")] == "0.50"
    bare = format_seed_table("title", [("r", [seed_summary(0, 80.0, 78.0)])])  # no run folder: a dash, no error
    assert "| 78.00 ± 0.00 | 80.00 ± 0.00 |" in bare


def test_parse_seeds():
    from dfkd.commands.cli import parse_seeds
    from dfkd.errors import ConfigError

    assert parse_seeds("0,1,2") == [0, 1, 2]
    assert parse_seeds("0-4") == [0, 1, 2, 3, 4]
    assert parse_seeds("3, 0-1,3") == [3, 0, 1]
    with pytest.raises(ConfigError, match="--seeds takes integers"):
        parse_seeds("a,b")


def test_distill_seeds_runs_every_seed_and_reuses_them(capsys, data_root, teacher_run, tmp_path):
    from dfkd.commands.cli import main

    args = [
        "distill",
        "--config",
        DEMO,
        "--seeds",
        "0,1",
        f"data.root={data_root}",
        f"teacher.weights={teacher_run}",
        f"out={tmp_path / 'seeds'}",
        *TINY_DISTILL,
        "train.epochs=1",
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "seed 0: ok" in out and "seed 1: ok" in out and "over 2 seeds" in out and "failed seeds: 0/2" in out
    saved = json.loads((tmp_path / "seeds" / "seeds.json").read_text())
    assert [r["seed"] for r in saved["runs"]] == [0, 1] and (tmp_path / "seeds" / "accuracy.png").is_file()
    assert saved["aggregate"]["n"] == 2
    stamp = (tmp_path / "seeds" / "seed1" / "summary.json").stat().st_mtime
    assert main(args) == 0  # finished seeds are reused, not re-run
    assert (tmp_path / "seeds" / "seed1" / "summary.json").stat().st_mtime == stamp


def test_distill_seeds_that_diverge_are_reported_as_failed(capsys, data_root, teacher_run, tmp_path):
    from dfkd.commands.cli import main

    args = ["distill", "--config", DEMO, "--seeds", "0,1", f"data.root={data_root}", f"teacher.weights={teacher_run}",
            f"out={tmp_path / 's'}", *TINY_DISTILL, "train.epochs=2", "train.lr=1e30"]  # fmt: skip
    assert main(args) == 1
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    assert "seed 0: FAILED (diverged): train/loss became nan in epoch 1" in out and "seed 1: FAILED (diverged)" in out
    assert "failed seeds: 2/2 (0, 1); no seed finished without failing: no mean" in out


def test_seed_report_means_the_seeds_that_did_not_fail():
    from dfkd.commands.cli import seed_report

    # what a seed that diverged in its first epoch leaves: no evaluated epoch, so no score at all
    nothing = dict.fromkeys(("student_top1_best", "student_top1_last", "agreement_best", "agreement_last", "mu", "var"))
    diverged = {**seed_summary(1, 0.0, 0.0, "diverged"), **nothing, "status_reason": "train/loss became nan in epoch 1"}
    runs = [seed_summary(0, 80.0, 78.0), diverged, seed_summary(2, 84.0, 82.0)]
    lines, failed = seed_report(runs, "seeds.json")
    assert failed == 1
    assert lines[0] == "seed 0: ok, last 78.00%, best 80.00% (test-selected)"
    assert lines[1] == "seed 1: FAILED (diverged): train/loss became nan in epoch 1"
    # the two that did not fail: last 80 ± 2.83 (sample std of 78 and 82), best 82 ± 2.83
    assert lines[-1] == (
        "cudfkd over 3 seeds: failed seeds: 1/3 (1); over the 2 that did not fail: last 80.00 ± 2.83%, "
        "best 82.00 ± 2.83% (test-selected), agreement 82.00 ± 2.83% (last epoch); details in seeds.json"
    )


def test_bench_with_seeds_marks_a_collapsed_cell(capsys, data_root, teacher_run, tmp_path):
    from dfkd.commands.cli import main

    args = tiny_bench_args(teacher_run, tmp_path, data_root, "--seeds", "0,1", *ABSURD)
    assert main(args) == 1  # the table, and the exit status of a suite with failed runs
    out = capsys.readouterr().out
    assert "**2/2** (seeds 0, 1)" in out and out.count("**COLLAPSED**") == 2
    cell = tmp_path / "cudfkd-lenet5_bn-lenet5_half"
    assert "FAILED: 2 run(s) collapsed or diverged" in out and f"{cell / 'seed0'}, {cell / 'seed1'}" in out
    assert (cell / "seed0" / "summary.json").is_file()


def test_demo_failure_is_plain_and_exits_non_zero(capsys, data_root, monkeypatch, tmp_path):
    from dfkd.commands import demo
    from dfkd.commands.cli import main

    monkeypatch.setenv("DFKD_DATA", str(data_root))
    monkeypatch.setitem(demo.SMOKE, "teacher", [*demo.SMOKE["teacher"], "data.val_size=64", "train.batch_size=64"])
    monkeypatch.setitem(demo.SMOKE, "distill", [*demo.SMOKE["distill"], *TINY_DISTILL, *ABSURD])
    code = main(["demo", "--smoke", "--seed", "3", "--out", str(tmp_path / "demo")])
    out = capsys.readouterr().out
    assert code == 1
    assert out.startswith("DEMO FAILED (seed 3): the data-free student collapsed: student loss 0")
    assert "top-1 %" not in out  # no result table
    assert json.loads((tmp_path / "demo" / "cudfkd" / "summary.json").read_text())["status"] == "collapsed"


def test_demo_success_prints_the_three_rows(capsys, data_root, monkeypatch, tmp_path):
    from dfkd.commands import demo
    from dfkd.commands.cli import main

    monkeypatch.setenv("DFKD_DATA", str(data_root))
    monkeypatch.setitem(demo.SMOKE, "teacher", [*demo.SMOKE["teacher"], "data.val_size=64", "train.batch_size=64"])
    monkeypatch.setitem(demo.SMOKE, "distill", [*demo.SMOKE["distill"], *TINY_DISTILL, "engine.stop_on_collapse=false"])
    monkeypatch.setitem(demo.SMOKE, "reference", [*demo.SMOKE["reference"], "data.val_size=64", "train.batch_size=64"])
    code = main(["demo", "--smoke", "--seed", "2", "--out", str(tmp_path / "demo")])
    out = capsys.readouterr().out
    teacher = json.loads((tmp_path / "demo" / "teacher" / "summary.json").read_text())
    student = json.loads((tmp_path / "demo" / "cudfkd" / "summary.json").read_text())
    assert code == 0 and "seed 2" in out
    # the teacher row shows the weights the student learned from: the teacher run's final epoch
    assert f"{teacher['top1_last']:.2f}" in out and student["teacher_top1"] == pytest.approx(teacher["top1_last"])
    # the headline is the last epoch's; the epoch the test set picked is labelled beside it
    assert f"{student['student_top1_last']:.2f} (best {student['student_top1_best']:.2f}, test-selected)" in out
    assert "top-1 % (last epoch)" in out and f"on {student['agreement_last']:.2f}% of test images" in out


# -- the accuracy signals end to end: runs past MIN_STEPS on two classes and on skewed sets -------------------------


def brightness_teacher(num_classes: int) -> nn.Module:
    """tiny_cnn set by hand to tell images apart by their mean brightness: class c is the c-th of ``num_classes``
    equal bins of it. Its first layer keeps the local mean (normalised with mean 0.5, std 0.25) and its negative,
    the head picks the bin whose centre m_c is nearest: argmax_c m_c b - m_c^2 / 2."""
    net = create_model("tiny_cnn", num_classes, 3)
    conv1, bn1, _, _, conv2, bn2 = list(net.features)[:6]
    centres = torch.linspace(-2.0, 2.0, 2 * num_classes + 1)[1::2]
    with torch.no_grad():
        for p in net.parameters():
            p.zero_()
        for bn in (bn1, bn2):
            bn.weight.fill_(1.0)
        conv1.weight[0], conv1.weight[1] = 1.0 / 27, -1.0 / 27
        conv2.weight[0, 0], conv2.weight[1, 1] = 1.0 / 9, 1.0 / 9
        net.fc.weight[:, 0], net.fc.weight[:, 1] = 20.0 * centres, -20.0 * centres
        net.fc.bias.copy_(-20.0 * centres**2 / 2)
    return net.eval()


def test_the_brightness_teacher_sorts_images_by_brightness():
    level = torch.rand(200, 1, 1, 1, generator=torch.Generator().manual_seed(0))
    images = level.expand(200, 3, 16, 16)
    with torch.no_grad():
        predicted = brightness_teacher(2)((images - 0.5) / 0.25).argmax(1)
    assert torch.equal(predicted, (level.flatten() > 0.5).long())


# A student that never moves (learning rate 0) for 100 steps: what a starved or frozen student looks like to the guard.
STARVED = [
    "method.name=dfad",
    "method.nz=16",
    "method.ngf=4",
    "student.arch=tiny_cnn",
    "train.epochs=1",
    "train.rounds_per_epoch=2",
    f"train.kd_steps={MIN_STEPS // 2}",
    "train.batch_size=8",
    "train.lr=0",
    "eval.window_start=0",
    "engine.progress=false",
    "engine.device=cpu",
]
FACTS = ["data.image_shape=[3,16,16]", "data.mean=[0.5]", "data.std=[0.25]"]


@pytest.fixture
def one_thread():
    """Batches of 8 tiny images: one thread is faster than two fighting over them (and than the suite's two)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def brightness_teacher_file(tmp_path, num_classes: int):
    path = tmp_path / f"brightness{num_classes}.pt"
    torch.save({"state_dict": brightness_teacher(num_classes).state_dict(), "arch": "tiny_cnn"}, path)
    return path


def folder_args(tmp_path, num_classes: int, out, *extra: str) -> list[str]:
    """`dfkd distill` of a starved student of the brightness teacher, scored on the folder tmp_path/images."""
    teacher = brightness_teacher_file(tmp_path, num_classes)
    return ["distill", "teacher.arch=tiny_cnn", f"teacher.weights={teacher}", "data.name=folder",
            f"data.root={tmp_path / 'images'}", *FACTS, f"out={out}", *STARVED, *extra]  # fmt: skip


def assert_collapsed_run(code: int, out: str, err: str, run_dir, *signals: str) -> dict:
    """A run the guard failed: exit status 1, the FAILED line, the warning, and the signals in its summary."""
    summary = json.loads((run_dir / "summary.json").read_text())
    assert code == 1, err
    assert summary["status"] == "collapsed" and summary["collapsed_epochs"] == [1], summary["status_reason"]
    assert summary["student_steps"] >= MIN_STEPS  # judged: past the guard's minimum
    assert out.startswith("FAILED (collapsed): ") and "the student looks collapsed" in err
    for signal in signals:
        assert signal in summary["status_reason"]
    return summary


def test_a_starved_student_of_a_two_class_teacher_without_data_is_collapsed(capsys, tmp_path, one_thread):
    teacher = brightness_teacher_file(tmp_path, 2)
    out_dir = tmp_path / "binary"
    args = ["distill", "teacher.arch=tiny_cnn", f"teacher.weights={teacher}", "data.name=none", "data.num_classes=2",
            *FACTS, "data.heldout_size=32", "data.heldout_steps=3", f"out={out_dir}", *STARVED]  # fmt: skip
    code, out, err = run(capsys, *args)
    summary = assert_collapsed_run(code, out, err, out_dir, "agreement with the teacher no better than chance")
    assert summary["agreement_last"] < 50.0  # two classes: chance is about half


@pytest.mark.parametrize(
    "counts, signals",
    [
        ((9, 3), ["agreement with the teacher no better than chance"]),
        ((12, 4, 2, 2), ["agreement with the teacher no better than chance", "the student predicts one class"]),
    ],
)
def test_starved_students_on_skewed_image_folders_are_collapsed(capsys, tmp_path, one_thread, counts, signals):
    # the teacher puts 75 % (60 %) of the images in one class, as it should: the labels say so too
    rng = np.random.default_rng(0)
    for label, count in enumerate(counts):
        level = 255 * (label + 0.5) / len(counts)
        for i in range(count):
            save_png(tmp_path / "images" / str(label) / f"{i}.png", level + rng.integers(-10, 10, (16, 16, 3)))
    out_dir = tmp_path / "skewed"
    code, out, err = run(capsys, *folder_args(tmp_path, len(counts), out_dir))
    summary = assert_collapsed_run(code, out, err, out_dir, *signals)
    assert summary["teacher_top1"] == 100.0


def test_a_student_that_learns_a_skewed_two_class_folder_is_not_flagged(capsys, tmp_path, one_thread):
    for label, count in enumerate((9, 3)):
        for i in range(count):
            save_png(tmp_path / "images" / str(label) / f"{i}.png", np.full((16, 16, 3), 64 + 128 * label))
    code, _, err = run(capsys, *folder_args(tmp_path, 2, tmp_path / "run", "train.lr=0.1"))
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert code == 0 and summary["status"] == "ok" and summary["agreement_last"] == 100.0, err
