"""``dfkd bench gpu-check`` (``make gpu-check``): the first command to run on a GPU machine.

One short epoch of every method of the ``fashion-mnist-resnet`` suite (Fashion-MNIST as 3x32x32, ResNet-34 ->
ResNet-18, each method's own recipe at batch 512), once in fp32 and once in bf16 autocast with channels_last, then
a table of student steps per second, synthetic images per second, peak memory and whether every loss stayed finite.
A method that crashes is a row with its error, and the check goes on to the next one.

It measures that the GPU path runs and what it costs, not accuracy: each run is ``ROUNDS`` rounds, and methods whose
round is a long inner optimisation (DeepInversion's 2,000 inversion steps) are capped at ``MAX_SYNTHESIS_STEPS``
steps per round. Without ``--teacher`` it trains a ResNet-34 for one epoch first. On one H100/H200 the whole check
is sized to take under eight minutes; ``--tiny`` shrinks everything so that the test suite runs it on a CPU (without
it, a machine without a CUDA GPU is refused). Runs already in the output folder are replaced only with ``--overwrite``.
"""

from __future__ import annotations

import logging
import traceback
from pathlib import Path

import torch

from dfkd.commands.bench import SUITES, capped_synthesis, suite_recipes, tiny_distill_overrides
from dfkd.config import load_config
from dfkd.engine.distill import distill
from dfkd.engine.rundir import check_run_dirs_free, read_summary
from dfkd.engine.supervised import train_teacher
from dfkd.errors import ConfigError, DfkdError, DivergedError
from dfkd.sysinfo import cpu_model

log = logging.getLogger("dfkd")

SUITE = "fashion-mnist-resnet"
PRECISIONS = (("fp32", False), ("bf16", True))  # (engine.precision, engine.channels_last)
ROUNDS = 4
# --tiny: one round; where bf16 is emulated (an AVX2-only CPU) a bf16 round of the ResNets takes about a minute
TINY_ROUNDS = 1
MAX_SYNTHESIS_STEPS = 50
TEACHER_EPOCHS = 1

TINY_TEACHER = ["train.batch_size=64", "data.val_size=64"]


def run_gpu_check(
    out: str | Path,
    teacher: str | None = None,
    tiny: bool = False,
    methods: list[str] | None = None,
    overwrite: bool = False,
) -> tuple[bool, str]:
    """Run the check into ``out``; return (every run finished with finite losses, the markdown table). Runs already
    in ``out`` are refused unless ``overwrite``; without ``tiny`` a machine without a CUDA GPU is refused."""
    if not tiny and not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else "no CUDA device visible"
        raise ConfigError(
            f"gpu-check measures a GPU but torch finds none here (torch {torch.__version__}, {build}): run it on a "
            "machine with an NVIDIA GPU and a CUDA build of torch, or add --tiny for the CPU-sized check"
        )
    root = Path(out)
    recipes = suite_recipes(SUITES[SUITE], methods)
    check_run_dirs_free(
        (_run_dir(root, recipe, precision) for recipe in recipes for precision, _ in PRECISIONS), overwrite
    )
    if teacher is None:
        teacher_dir = root / "teacher"
        if read_summary(teacher_dir) is None:
            log.info("gpu-check: training a ResNet-34 teacher for %d epoch", TEACHER_EPOCHS)
            overrides = [f"out={teacher_dir}", f"train.epochs={TEACHER_EPOCHS}", *(TINY_TEACHER if tiny else [])]
            train_teacher(load_config("train-teacher", SUITES[SUITE].teacher, overrides), overwrite=True)
        teacher = str(teacher_dir)
    rows = []
    for recipe in recipes:
        for precision, channels_last in PRECISIONS:
            rows.append(_check_one(recipe, precision, channels_last, teacher, root, tiny, overwrite))
    ok = all(row["finite"] for row in rows)
    return ok, format_check(rows, ok)


def _overrides(recipe: str, precision: str, channels_last: bool, teacher: str, run: Path, tiny: bool) -> list[str]:
    base = [
        f"teacher.weights={teacher}",
        f"out={run}",
        "train.epochs=1",
        f"train.rounds_per_epoch={TINY_ROUNDS if tiny else ROUNDS}",
        f"engine.precision={precision}",
        f"engine.channels_last={str(channels_last).lower()}",
        "engine.stop_on_collapse=false",
        "engine.sample_every=0",
        "eval.window_start=0",
    ]
    return tiny_distill_overrides(recipe, base) if tiny else capped_synthesis(recipe, base, MAX_SYNTHESIS_STEPS)


def _method(recipe: str) -> str:
    return recipe.split("/")[-1].split("-")[0]


def _run_dir(root: Path, recipe: str, precision: str) -> Path:
    return root / f"{_method(recipe)}-{precision}"


def _check_one(
    recipe: str, precision: str, channels_last: bool, teacher: str, root: Path, tiny: bool, overwrite: bool
) -> dict:
    method = _method(recipe)
    run = _run_dir(root, recipe, precision)
    row = {"method": method, "precision": precision + (" + channels_last" if channels_last else ""), "run": run}
    log.info("gpu-check: %s in %s", method, row["precision"])
    try:
        cfg = load_config("distill", recipe, _overrides(recipe, precision, channels_last, teacher, run, tiny))
        summary = distill(cfg, overwrite=overwrite)
    except DivergedError as exc:
        summary = read_summary(run) or {}
        row["error"] = str(exc).split(";")[0]
    except DfkdError as exc:
        return {**row, "finite": False, "error": str(exc)}
    except Exception as exc:  # the check reports a crash and goes on to the next method
        log.debug("%s", traceback.format_exc())
        return {**row, "finite": False, "error": f"{type(exc).__name__}: {exc}".splitlines()[0]}
    return {
        **row,
        "finite": summary.get("status") != "diverged" and "error" not in row,
        "steps_per_second": summary.get("student_steps_per_second"),
        "images_per_second": summary.get("images_per_second"),
        "peak_memory_bytes": summary.get("peak_memory_bytes"),
        "device": summary.get("device"),
    }


def format_check(rows: list[dict], ok: bool) -> str:
    header = ("method", "precision", "losses finite", "student steps/s", "images/s", "peak memory")
    lines = ["**dfkd gpu-check**", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        finite = "yes" if row["finite"] else f"**NO**: {row.get('error', 'a loss became non-finite')}"
        cells = (
            row["method"],
            row["precision"],
            finite,
            _fmt(row.get("steps_per_second"), ".2f"),
            _fmt(row.get("images_per_second"), ".0f"),
            _fmt(row["peak_memory_bytes"] / 2**30, ".2f") + " GiB" if row.get("peak_memory_bytes") else "-",
        )
        lines.append("| " + " | ".join(cells) + " |")
    devices = sorted({row["device"] for row in rows if row.get("device")})
    lines += ["", f"Device: {'; '.join(devices) or 'none finished'}; host CPU: {cpu_model()}."]
    lines.append("All runs finished with finite losses." if ok else "FAILED: see the rows marked NO.")
    return "\n".join(lines)


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)
