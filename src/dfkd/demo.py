"""``dfkd demo``: the whole story on Fashion-MNIST in about ten minutes on two CPU cores.

1. train a BatchNorm LeNet-5 teacher on the real training images;
2. distill a LeNet-5-half student from it with CuDFKD, without touching a training image;
3. train the same student on the real training images, for reference;
then print one table and where the pictures are.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from dfkd.config import load_config
from dfkd.engine.distill import distill
from dfkd.engine.meters import format_seconds
from dfkd.engine.supervised import train_teacher

log = logging.getLogger("dfkd")

TEACHER_RECIPE = "teachers/fashion-mnist-32-lenet5_bn"
DISTILL_RECIPE = "fashion-mnist/cudfkd-lenet5_bn-lenet5_half"
REFERENCE_RECIPE = "teachers/fashion-mnist-32-lenet5_half"
# The smoke version only checks that the pipeline runs end to end.
SMOKE = {
    "teacher": ["train.epochs=1"],
    "distill": ["train.epochs=2", "train.rounds_per_epoch=4", "eval.window_start=0"],
    "reference": ["train.epochs=1"],
}


def run_demo(out: str | None = None, smoke: bool = False) -> str:
    """Run the three steps into ``out`` (default ``runs/demo-TIMESTAMP``) and return the result table."""
    root = Path(out) if out else Path("runs") / f"demo-{time.strftime('%Y%m%d-%H%M%S')}"
    started = time.perf_counter()
    extra = SMOKE if smoke else {"teacher": [], "distill": [], "reference": []}

    log.info("[1/3] training the teacher on real Fashion-MNIST")
    teacher = train_teacher(
        load_config("train-teacher", TEACHER_RECIPE, [f"out={root / 'teacher'}", *extra["teacher"]])
    )
    log.info("[2/3] distilling the student with CuDFKD, without the training images")
    cfg = load_config(
        "distill", DISTILL_RECIPE, [f"out={root / 'cudfkd'}", f"teacher.weights={root / 'teacher'}", *extra["distill"]]
    )
    student = distill(cfg)
    log.info("[3/3] training the same student on real data, for reference")
    reference = train_teacher(
        load_config("train-teacher", REFERENCE_RECIPE, [f"out={root / 'student-real-data'}", *extra["reference"]])
    )
    return format_table(teacher, student, reference, time.perf_counter() - started, root)


def format_table(teacher: dict, student: dict, reference: dict, seconds: float, root: Path) -> str:
    rows = [
        ("model", "data", "top-1 %", "wall time", "images synthesised"),
        (
            f"teacher {teacher['model']}",
            "real",
            f"{teacher['top1_best']:.2f}",
            format_seconds(teacher["total_seconds"]),
            "-",
        ),
        (
            f"student {student['student']} (CuDFKD)",
            "none (data-free)",
            f"{student['student_top1_best']:.2f} (last {student['student_top1_last']:.2f})",
            format_seconds(student["total_seconds"]),
            f"{student['images_synthesized']:,}",
        ),
        (
            f"student {reference['model']}",
            "real",
            f"{reference['top1_best']:.2f}",
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
        f"data-free student agrees with the teacher on {student['agreement']:.2f}% of the test images; "
        f"total demo time {format_seconds(seconds)}",
        f"synthetic samples: {samples[-1] if samples else run / 'samples'}",
        f"accuracy curve:    {run / 'accuracy.png'}",
        f"all runs:          {root}",
    ]
    return "\n".join(lines)
