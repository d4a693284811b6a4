"""``dfkd bench``: run a suite of recipes against one teacher and tabulate the results.

A suite names a teacher recipe and the distillation recipes to compare; every run goes to ``OUT/<recipe>``. A run
that already finished is reused, an interrupted one is resumed, so re-running the command completes a table rather
than repeating it. The table (markdown) is printed and written to ``OUT/table.md``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from dfkd.config import load_config, recipe_names
from dfkd.engine.distill import distill
from dfkd.engine.meters import format_seconds
from dfkd.engine.supervised import train_teacher
from dfkd.errors import ConfigError, closest

log = logging.getLogger("dfkd")


@dataclass(frozen=True)
class Suite:
    description: str
    teacher: str  # a train-teacher recipe
    pattern: str  # distillation recipes: "<dir>/<method>-<teacher>-<student>" with {method}


SUITES = {
    "fashion-mnist": Suite(
        "Fashion-MNIST (32x32), BN-LeNet-5 -> LeNet-5-half, every method on the same student-step budget",
        "teachers/fashion-mnist-32-lenet5_bn",
        "fashion-mnist/{method}-lenet5_bn-lenet5_half",
    ),
    "fashion-mnist-resnet": Suite(
        "Fashion-MNIST as 3x32x32, ResNet-34 -> ResNet-18, every method (GPU-sized)",
        "teachers/fashion-mnist-32x3-resnet34",
        "fashion-mnist/{method}-resnet34-resnet18",
    ),
}


def suite_recipes(suite: Suite, methods: list[str] | None) -> list[str]:
    available = set(recipe_names())
    prefix, suffix = suite.pattern.split("{method}")
    found = sorted(
        name[len(prefix) : -len(suffix)] for name in available if name.startswith(prefix) and name.endswith(suffix)
    )
    for method in methods or []:
        if method not in found:
            raise ConfigError(f"the suite has no recipe for method '{method}'{closest(method, found)}")
    return [suite.pattern.format(method=m) for m in (methods or found)]


def _finished(path: Path) -> dict | None:
    summary = path / "summary.json"
    return json.loads(summary.read_text()) if summary.is_file() else None


def run_suite(
    name: str,
    out: str | Path,
    methods: list[str] | None = None,
    teacher: str | None = None,
    overrides: list[str] | None = None,
) -> str:
    """Run (or complete) the suite ``name`` into ``out``; return the markdown table."""
    if name not in SUITES:
        raise ConfigError(f"unknown bench suite '{name}'{closest(name, SUITES)}; suites: {', '.join(SUITES)}")
    suite, root = SUITES[name], Path(out)
    overrides = list(overrides or [])
    if teacher is None:
        teacher_dir = root / "teacher"
        if _finished(teacher_dir) is None:
            log.info("bench: training the teacher (%s)", suite.teacher)
            resume = (teacher_dir / "ckpt" / "last.pt").is_file()
            train_teacher(load_config("train-teacher", suite.teacher, [f"out={teacher_dir}"]), resume=resume)
        teacher = str(teacher_dir)
    rows = []
    for recipe in suite_recipes(suite, methods):
        run = root / recipe.split("/")[-1]
        summary = _finished(run)
        if summary is None:
            log.info("bench: %s", recipe)
            cfg = load_config("distill", recipe, [f"teacher.weights={teacher}", f"out={run}", *overrides])
            summary = distill(cfg, resume=(run / "ckpt" / "last.pt").is_file())
        rows.append((recipe, summary))
    table = format_table(suite.description, rows)
    (root / "table.md").write_text(table + "\n")
    return table


def _num(value, fmt: str = ".2f") -> str:
    return "-" if value is None else format(value, fmt)


def format_table(title: str, rows: list[tuple[str, dict]]) -> str:
    header = (
        "method",
        "best %",
        "last %",
        "μ",
        "σ²",
        "agree %",
        "steps",
        "images",
        "img/s",
        "synth",
        "student",
        "total",
        "peak mem",
    )
    lines = [f"**{title}**", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for _recipe, s in rows:
        busy = s["synth_seconds"] + s["student_seconds"]
        cells = (
            s["method"],
            _num(s["student_top1_best"]),
            _num(s["student_top1_last"]),
            _num(s["mu"]),
            _num(s["var"]),
            _num(s["agreement"]),
            f"{s['student_steps']:,}",
            f"{s['images_synthesized']:,}",
            _num(s["images_synthesized"] / busy if busy else None, ".0f"),
            format_seconds(s["synth_seconds"]),
            format_seconds(s["student_seconds"]),
            format_seconds(s["total_seconds"]),
            f"{s['peak_memory_bytes'] / 2**30:.2f} GiB",
        )
        lines.append("| " + " | ".join(cells) + " |")
    teacher = {s["teacher_top1"] for _, s in rows}
    if rows:
        lines += [
            "",
            f"Teacher top-1: {', '.join(f'{t:.2f}%' for t in sorted(teacher))}; device: {rows[0][1]['device']}.",
        ]
    return "\n".join(lines)
