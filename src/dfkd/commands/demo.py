"""``dfkd demo``: the whole story on Fashion-MNIST in about ten minutes on two CPU cores.

1. train a BatchNorm LeNet-5 teacher on the real training images;
2. distill a LeNet-5-half student from it with CuDFKD, without touching a training image;
3. train the same student on the real training images, for reference;
then print one table and where the pictures are. ``--seed N`` seeds all three runs (printed with the result).

The distillation runs with the collapse guard's early stop on: a student that collapses ends the demo with a plain
failure message and a non-zero exit status, never with a table that looks like a result.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from dfkd.config import load_config
from dfkd.engine.distill import best_label, distill
from dfkd.engine.meters import format_seconds
from dfkd.engine.supervised import train_teacher
from dfkd.errors import DivergedError

log = logging.getLogger("dfkd")

TEACHER_RECIPE = "teachers/fashion-mnist-32-lenet5_bn"
DISTILL_RECIPE = "demo/fashion-mnist-cudfkd"
REFERENCE_RECIPE = "teachers/fashion-mnist-32-lenet5_half"
# The smoke version only checks that the pipeline runs end to end.
SMOKE = {
    "teacher": ["train.epochs=1"],
    "distill": ["train.epochs=2", "train.rounds_per_epoch=4", "eval.window_start=0"],
    "reference": ["train.epochs=1"],
}


def run_demo(out: str | None = None, smoke: bool = False, seed: int = 0) -> tuple[bool, str]:
    """Run the three steps into ``out`` (default ``runs/demo-TIMESTAMP``).

    Returns ``(ok, text)``: the result table, or (``ok`` False) the failure of a student that collapsed.
    """
    root = Path(out) if out else Path("runs") / f"demo-{time.strftime('%Y%m%d-%H%M%S')}"
    started = time.perf_counter()
    extra = SMOKE if smoke else {"teacher": [], "distill": [], "reference": []}
    seeded = f"engine.seed={seed}"
    log.info("dfkd demo, seed %d, into %s", seed, root)

    log.info("[1/3] training the teacher on real Fashion-MNIST")
    teacher = train_teacher(
        load_config("train-teacher", TEACHER_RECIPE, [f"out={root / 'teacher'}", seeded, *extra["teacher"]])
    )
    log.info("[2/3] distilling the student with CuDFKD, without the training images")
    cfg = load_config(
        "distill",
        DISTILL_RECIPE,
        [
            f"out={root / 'cudfkd'}",
            f"teacher.weights={root / 'teacher'}",
            seeded,
            "engine.stop_on_collapse=true",
            *extra["distill"],
        ],
    )
    try:
        student = distill(cfg)
    except DivergedError as exc:
        return False, failure_text(seed, "diverged", str(exc), Path(cfg.out))
    if student.get("status", "ok") != "ok":
        return False, failure_text(seed, student["status"], student.get("status_reason"), Path(student["run_dir"]))
    log.info("[3/3] training the same student on real data, for reference")
    reference = train_teacher(
        load_config(
            "train-teacher", REFERENCE_RECIPE, [f"out={root / 'student-real-data'}", seeded, *extra["reference"]]
        )
    )
    return True, format_table(teacher, student, reference, time.perf_counter() - started, root, seed)


def failure_text(seed: int, status: str, reason: str | None, run: Path) -> str:
    return "\n".join(
        [
            f"DEMO FAILED (seed {seed}): the data-free student {status}: {reason}.",
            "No result is reported for this run. Its metrics, samples and accuracy curve are in "
            f"{run}; please report the seed and this message.",
        ]
    )


def format_table(teacher: dict, student: dict, reference: dict, seconds: float, root: Path, seed: int = 0) -> str:
    """The demo's result: every top-1 is the last epoch's; a student's best epoch, which the test set picked (what
    the papers report), is labelled beside it."""
    rows = [
        ("model", "data", "top-1 % (last epoch)", "wall time", "images synthesised"),
        (
            f"teacher {teacher['model']}",
            "real",
            f"{teacher['top1_last']:.2f}",  # its final weights are the teacher the student learns from
            format_seconds(teacher["total_seconds"]),
            "-",
        ),
        (
            f"student {student['student']} (CuDFKD)",
            "none (data-free)",
            _last_and_best(student["student_top1_last"], student["student_top1_best"], student.get("eval_split")),
            format_seconds(student["total_seconds"]),
            f"{student['images_synthesized']:,}",
        ),
        (
            f"student {reference['model']}",
            "real",
            _last_and_best(reference["top1_last"], reference["top1_best"], reference.get("eval_split")),
            format_seconds(reference["total_seconds"]),
            "-",
        ),
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    run = Path(student["run_dir"])
    samples = sorted((run / "samples").glob("epoch_*.png"))
    lines += [
        "",
        f"data-free student (last epoch) agrees with the teacher on {student['agreement_last']:.2f}% of test images; "
        f"seed {seed}; total demo time {format_seconds(seconds)}",
        f"synthetic samples: {samples[-1] if samples else run / 'samples'}",
        f"accuracy curve:    {run / 'accuracy.png'}",
        f"all runs:          {root}",
    ]
    return "\n".join(lines)


def _last_and_best(last: float, best: float, eval_split: str | None) -> str:
    return f"{last:.2f} (best {best:.2f}, {best_label(eval_split)})"
