"""The command line, as a user meets it: every bad input ends in one line on stderr and exit status 2."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch
from helpers import TINY_DISTILL, assert_one_line_error, tiny_bench_args
from helpers import run_cli as run

from dfkd.commands.cli import main
from dfkd.data import load_split
from dfkd.models import create_model

DEMO = "fashion-mnist/cudfkd-lenet5_bn-lenet5_half"


def distill_args(data_root, teacher_run, out, *extra):
    return [
        "distill",
        "--config",
        DEMO,
        f"data.root={data_root}",
        f"teacher.weights={teacher_run}",
        f"out={out}",
        *TINY_DISTILL,
        "train.epochs=1",
        *extra,
    ]


def test_help_and_list(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert "distill" in capsys.readouterr().out
    for what, expected in [
        ("methods", "cudfkd"),
        ("models", "wrn40_2"),
        ("datasets", "fashion-mnist-32x3"),
        ("recipes", "cifar10/cudfkd-resnet34-resnet18"),
    ]:
        code, out, _ = run(capsys, "list", what)
        assert code == 0 and expected in out


def test_end_to_end_train_distill_eval(capsys, data_root, teacher_run, tmp_path):
    code, out, err = run(capsys, *distill_args(data_root, teacher_run, tmp_path / "d"))
    assert code == 0, err
    assert "student top-1" in out and "epoch 1/1" in err
    s = json.loads((tmp_path / "d" / "summary.json").read_text())
    # the headline is the last epoch's; the best one, picked on the test set, is labelled beside it
    headline = f"student top-1 {s['student_top1_last']:.2f}% at the last epoch (best {s['student_top1_best']:.2f}%, "
    assert headline + "test-selected; teacher" in out
    code, out, err = run(
        capsys, "eval", "--weights", str(tmp_path / "d"), "--teacher", str(teacher_run), f"data.root={data_root}"
    )
    assert code == 0, err
    assert "top-1" in out and "agreement" in out
    summary = json.loads((tmp_path / "d" / "summary.json").read_text())
    assert f"top-1 {summary['student_top1_last']:.2f}%" in out


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["distill", "--config", "no/such-recipe"], "unknown recipe 'no/such-recipe'"),
        (
            ["distill", "--config", DEMO, "train.epoch=2"],
            "unknown config key 'train.epoch' (did you mean 'train.epochs'?)",
        ),
        (["distill", "--config", DEMO, "train.epochs=two"], "train.epochs: expected an integer, got 'two'"),
        (["distill", "--config", DEMO, "out=/tmp/x"], "teacher.weights is not set"),
        (
            ["train-teacher", "--config", "teachers/cifar10-resnet34", "data.root=/nonexistent"],
            "cifar-10-python.tar.gz",
        ),
        (["distill", "--resume", "/nonexistent/run"], "nothing to resume in /nonexistent/run"),
        (["eval", "--weights", "/nonexistent.pt", "data.name=fashion-mnist-32"], "/nonexistent.pt does not exist"),
        (["distill", "--config", DEMO, "--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_bad_input_is_one_line(capsys, argv, fragment):
    if argv[0] == "distill" and argv[1] == "--config" and "--bogus" in argv:
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
        assert fragment in capsys.readouterr().err
        return
    code, _, err = run(capsys, *argv)
    assert_one_line_error(code, err, fragment)


def test_missing_dataset_says_where_it_looked(capsys, tmp_path, teacher_run):
    code, _, err = run(
        capsys,
        "distill",
        "--config",
        DEMO,
        f"data.root={tmp_path}",
        "data.name=cifar10",
        f"teacher.weights={teacher_run}",
        f"out={tmp_path / 'o'}",
    )
    assert_one_line_error(code, err, str(tmp_path))
    assert "DFKD_DATA" in err and "Run `dfkd data get cifar10`" in err


def test_teacher_that_is_not_a_checkpoint(capsys, data_root, tmp_path):
    bogus = tmp_path / "teacher.pt"
    bogus.write_text("these are not weights\n")
    code, _, err = run(capsys, *distill_args(data_root, bogus, tmp_path / "o"))
    assert_one_line_error(code, err, str(bogus))
    assert not (tmp_path / "o").exists()  # nothing created for a run that could not start


def test_teacher_whose_shapes_do_not_fit(capsys, data_root, tmp_path):
    from dfkd import create_model

    wrong = tmp_path / "wide.pt"
    torch.save(create_model("lenet5", 10, 1).state_dict(), wrong)  # LeNet-5 weights for a BN-LeNet-5 teacher
    code, _, err = run(capsys, *distill_args(data_root, wrong, tmp_path / "o"))
    assert_one_line_error(code, err, "does not fit lenet5_bn")

    half = tmp_path / "half.pt"
    state = create_model("lenet5_bn", 10, 1).state_dict()
    state["features.0.weight"] = torch.zeros(3, 1, 5, 5)
    torch.save({"state_dict": state}, half)
    code, _, err = run(capsys, *distill_args(data_root, half, tmp_path / "o"))
    assert_one_line_error(code, err, "'features.0.weight'")
    assert "[3, 1, 5, 5]" in err and "[6, 1, 5, 5]" in err


def test_teacher_class_count_mismatch(capsys, data_root, tmp_path):
    from dfkd import create_model

    path = tmp_path / "c100.pt"
    torch.save({"model": create_model("lenet5_bn", 100, 1).state_dict()}, path)
    code, _, err = run(capsys, *distill_args(data_root, path, tmp_path / "o"))
    assert_one_line_error(code, err, "100 classes")
    assert "10" in err


def test_finished_run_is_protected(capsys, data_root, teacher_run, tmp_path):
    out = tmp_path / "done"
    assert run(capsys, *distill_args(data_root, teacher_run, out))[0] == 0
    before = (out / "summary.json").read_text()
    code, _, err = run(capsys, *distill_args(data_root, teacher_run, out))
    assert_one_line_error(code, err, "already holds a finished run: pass --resume to continue it, or --overwrite")
    assert (out / "summary.json").read_text() == before
    code, _, err = run(capsys, *distill_args(data_root, teacher_run, out), "--overwrite")
    assert code == 0, err
    code, _, err = run(capsys, "distill", "--resume", str(out))  # already complete: nothing left to do, still fine
    assert code == 0, err


def test_bad_teacher_with_overwrite_keeps_the_old_run(capsys, data_root, teacher_run, tmp_path):
    out = tmp_path / "keep"
    assert run(capsys, *distill_args(data_root, teacher_run, out))[0] == 0
    bogus = tmp_path / "bogus.pt"
    bogus.write_text("x")
    code, _, err = run(capsys, *distill_args(data_root, bogus, out), "--overwrite")
    assert_one_line_error(code, err, str(bogus))
    assert (out / "summary.json").is_file() and (out / "ckpt" / "best.pt").is_file()


def assert_one_line_failure(code: int, err: str, fragment: str) -> None:
    """A run that failed: exit status 1 and one ``dfkd: failed:`` line that says ``fragment``, no traceback."""
    assert code == 1, err
    lines = [line for line in err.splitlines() if line.startswith("dfkd: ")]
    assert len(lines) == 1 and lines[0].startswith("dfkd: failed: ") and fragment in lines[0], err
    assert "Traceback" not in err


def test_divergence_through_the_cli(capsys, data_root, teacher_run, tmp_path):
    code, _, err = run(capsys, *distill_args(data_root, teacher_run, tmp_path / "nan"), "train.lr=1e30")
    assert_one_line_failure(code, err, "training diverged")
    assert "--resume" in err
    summary = json.loads((tmp_path / "nan" / "summary.json").read_text())
    assert summary["status"] == "diverged" and summary["collapsed_epochs"] == []


def test_a_teacher_that_diverges_is_a_failed_run(capsys, data_root, tmp_path):
    code, _, err = run(
        capsys, "train-teacher", "--config", "teachers/fashion-mnist-32-lenet5_bn", f"data.root={data_root}",
        f"out={tmp_path / 't'}", "train.epochs=1", "train.lr=1e30", "data.val_size=64", "train.batch_size=64",
        "engine.progress=false",
    )  # fmt: skip
    assert_one_line_failure(code, err, "training diverged")


def exit_status(capsys, *argv) -> tuple[int, str]:
    """``dfkd ARGV``'s exit status as the shell sees it (argparse exits itself), and its stderr."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err


# every subcommand: a bad input (exit 2), and a run of it that reaches its work, interrupted there (exit 130)
COMMANDS = {
    "train-teacher": (
        ["--config", "no/such-recipe"],
        ["--config", "teachers/fashion-mnist-32-lenet5_bn"],
        "dfkd.engine.supervised.train_teacher",
    ),
    "distill": (["--config", DEMO, "train.epoch=2"], ["--config", DEMO], "dfkd.engine.distill.distill"),
    "eval": (["--weights", "/nonexistent.pt", "data.name=fashion-mnist-32"], ["--weights", "w.pt"],
             "dfkd.engine.evaluate.evaluate_weights"),  # fmt: skip
    "export": (["/nonexistent/run"], ["run"], "dfkd.engine.export.export_student"),
    "plot": (["/nonexistent/run"], ["run"], "dfkd.commands.plot.plot_run"),
    "list": (["everything"], ["methods"], "dfkd.methods.method_names"),
    "bench": (["no-such-suite"], ["fashion-mnist"], "dfkd.commands.bench.run_suite"),
    "demo": (["--seed", "three"], ["--smoke"], "dfkd.commands.demo.run_demo"),
    "data": (["get", "no-such-dataset"], ["get", "mnist"], "dfkd.data.get_dataset"),
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_exits_2_on_bad_input_and_130_when_interrupted(capsys, monkeypatch, command):
    bad, good, worker = COMMANDS[command]
    code, err = exit_status(capsys, command, *bad)
    assert code == 2 and err.startswith("dfkd: error: ") and "Traceback" not in err, err

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(worker, interrupted)
    code, err = exit_status(capsys, command, *good)
    assert code == 130 and err.startswith("dfkd: interrupted"), err


def test_console_script_prints_no_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "dfkd", "distill", "--config", DEMO, "train.epohcs=3"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == "dfkd: error: unknown config key 'train.epohcs' (did you mean 'train.epochs'?)"


def test_bench_throughput_reports_every_setting_it_ran(capsys, data_root, tmp_path):
    tiny = [o for o in TINY_DISTILL if not o.startswith("train.rounds_per_epoch=")]
    recipe = "fashion-mnist/cudfkd-lenet5_bn-lenet5_half"
    args = ["bench", "throughput", "--recipe", recipe, "--rounds", "2", "--settings", "fp32,bf16-cl"]
    code, out, err = run(capsys, *args, "--out", str(tmp_path), f"data.root={data_root}", *tiny)
    assert code == 0, err
    assert "| fp32 |" in out and "| bf16-cl |" in out and "Machine:" in out
    assert (tmp_path / "throughput.md").read_text().strip() == out.strip()
    numbers = json.loads((tmp_path / "throughput.json").read_text())
    assert list(numbers) == ["fp32", "bf16-cl"]
    for summary in numbers.values():
        assert summary["student_steps"] == 2 * 2 and summary["student_steps_per_second"] > 0
        assert 0 < summary["batch_seconds"] < summary["synth_seconds"]
    assert "bf16" in numbers["bf16-cl"]["device"] and "fp32" in numbers["fp32"]["device"]
    # where the memory goes: the data is the test split with the teacher's logits on it, the student carries its
    # SGD momentum (one buffer per parameter), the peak is never below the process before the loop
    images, labels = load_split("fashion-mnist-32", "test", str(data_root))
    n_params = sum(p.numel() for p in create_model("lenet5_half", 10, 1).parameters())
    for summary in numbers.values():
        mem = summary["memory"]
        assert mem["data_bytes"] == images.nbytes + labels.nbytes + len(labels) * 10 * 4
        assert mem["student_bytes"] >= 2 * 4 * n_params
        assert summary["peak_memory_bytes"] >= mem["loop_start_bytes"] > mem["data_bytes"] + mem["teacher_bytes"]
        assert mem["method_bytes"] > 0
    # a row in each table: speed, memory, arithmetic, peak
    assert "Where the memory goes" in out and out.count("| fp32 |") == 4
    # the same folder again: refused unless --overwrite, the earlier runs intact
    before = (tmp_path / "fp32" / "ckpt" / "last.pt").read_bytes()
    code, _, err = run(capsys, *args, "--out", str(tmp_path), f"data.root={data_root}", *tiny)
    assert_one_line_error(code, err, f"{tmp_path / 'fp32'} (and 1 more) already holds a run: pass --overwrite")
    assert (tmp_path / "fp32" / "ckpt" / "last.pt").read_bytes() == before
    args[-1] = "fp32"
    code, _, err = run(capsys, *args, "--out", str(tmp_path), f"data.root={data_root}", *tiny, "--overwrite")
    assert code == 0, err
    assert (tmp_path / "fp32" / "ckpt" / "last.pt").read_bytes() != before
    code, _, err = run(capsys, "bench", "throughput", "--settings", "fp16")
    assert_one_line_error(code, err, "unknown setting 'fp16'")
    code, _, err = run(capsys, "bench", "throughput", "--out", str(tmp_path), "train.epochs=3")
    assert_one_line_error(code, err, "sets train.epochs itself")
    code, _, err = run(capsys, "bench", "fashion-mnist", "--rounds", "3")
    assert_one_line_error(code, err, "belong to `dfkd bench throughput`")


def test_bench_runs_a_suite_and_reuses_finished_runs(capsys, data_root, teacher_run, tmp_path):
    args = tiny_bench_args(teacher_run, tmp_path, data_root, "train.epochs=1")
    code, out, err = run(capsys, *args)
    assert code == 0, err
    assert "| cudfkd |" in out and (tmp_path / "table.md").read_text().strip() == out.strip()
    stamp = (tmp_path / "cudfkd-lenet5_bn-lenet5_half" / "summary.json").stat().st_mtime
    code, out2, _ = run(capsys, *args)
    assert code == 0 and out2 == out
    assert (tmp_path / "cudfkd-lenet5_bn-lenet5_half" / "summary.json").stat().st_mtime == stamp
    # the same folder under other settings is refused, not reused as if it were their result
    code, _, err = run(capsys, *tiny_bench_args(teacher_run, tmp_path, data_root, "train.epochs=1", "method.oh=0.5"))
    assert_one_line_error(code, err, "other settings than fashion-mnist/cudfkd-lenet5_bn-lenet5_half now gives")
    assert "method.oh: 1.0 -> 0.5" in err
    assert (tmp_path / "cudfkd-lenet5_bn-lenet5_half" / "summary.json").stat().st_mtime == stamp
    # a setting the run's config.yaml predates is no change while it keeps its default (dfkd gained it later)
    saved = tmp_path / "cudfkd-lenet5_bn-lenet5_half" / "config.yaml"
    text = saved.read_text()
    saved.write_text(text.replace("  stop_on_collapse: false\n", ""))
    code, out3, _ = run(capsys, *args)
    assert code == 0 and out3 == out
    code, _, err = run(capsys, *args, "engine.stop_on_collapse=true")
    assert_one_line_error(code, err, "engine.stop_on_collapse: (unset) -> True")
    code, _, err = run(capsys, "bench", "fashion-mnist", "--methods", "cudfkdd", "--teacher", str(teacher_run))
    assert_one_line_error(code, err, "no recipe for method 'cudfkdd' (did you mean 'cudfkd'?)")


def test_bench_with_a_budget_is_a_race_with_a_table_and_a_plot(capsys, data_root, teacher_run, tmp_path):
    # a budget shorter than one epoch: every run stops after its first epoch, finished (not failed)
    args = tiny_bench_args(teacher_run, tmp_path, data_root, "train.epochs=3")
    code, out, err = run(capsys, *args, "--seeds", "0,1", "--budget", "0.01")
    assert code == 0, err
    assert "**Race:" in out and "time to 85 %" in out and "| cudfkd | 2 |" in out
    for seed in (0, 1):
        summary = json.loads((tmp_path / "cudfkd-lenet5_bn-lenet5_half" / f"seed{seed}" / "summary.json").read_text())
        assert summary["status"] == "ok" and summary["stopped_at_time_limit"] and summary["epochs"] == 1
    assert (tmp_path / "race.png").stat().st_size > 0 and (tmp_path / "race.md").read_text().strip() in out
    race = json.loads((tmp_path / "race.json").read_text())
    assert race["budget"] == 0.01 and [len(c) for c in race["curves"]["cudfkd"]] == [1, 1]
    code, _, err = run(capsys, *args, "--budget", "0")
    assert_one_line_error(code, err, "give the race's wall-clock budget in seconds")


def test_a_suite_without_data_tabulates_and_races_agreement(capsys, data_root, teacher_run, tmp_path):
    # data.name=none: no test set; the table and the race say they measure agreement, and nothing formats a None
    args = tiny_bench_args(teacher_run, tmp_path, data_root, "train.epochs=2", "data.name=none", "data.heldout_size=64")
    code, out, err = run(capsys, *args, "--seeds", "0,1", "--budget", "1000")
    assert code == 0, err
    header = next(line for line in out.splitlines() if line.startswith("| method | seeds |")).split(" | ")
    row = next(line for line in out.splitlines() if line.startswith("| cudfkd | 0,1 |")).split(" | ")
    assert header[3:5] == ["last agreement %", "best agreement % (chosen on held-out synthetic images)"]
    assert re.fullmatch(r"\d+\.\d\d ± \d+\.\d\d", row[3]) and "Scored by agreement with the teacher" in out
    race = json.loads((tmp_path / "race.json").read_text())
    assert [len(c) for c in race["curves"]["cudfkd"]] == [2, 2]  # the agreement curve, an epoch each
    assert "agreement at 10 min" in (tmp_path / "race.md").read_text()
