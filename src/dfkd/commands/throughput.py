"""``dfkd bench throughput``: how fast a recipe runs on this machine, in fp32 and in each fast setting.

Runs ``rounds`` rounds (one epoch) of a recipe once per setting and reports, per setting: student steps per second,
synthetic images per second, the split of the time into the generator step (the method's synthesis round), student
batch generation, the student step and evaluation, the wall time and the peak memory of the run, with the CPU model
and its relevant instruction sets (AVX2, AVX-512, AVX512-BF16, AMX). Speeds are comparable only within one table:
every row is measured in the same process, one after the other.

The arithmetic beneath makes them comparable across machines: each run counts the FLOPs of one synthesis round, one
student batch and one student step (``engine.count_flops``: an untimed pass before the loop that leaves the run as
it was) and times a matrix product and a convolution in the same process, on the same threads and in the setting's
precision and memory format; the table gives the GFLOP/s each part achieved and their fraction of that peak.

It measures speed, not accuracy: without ``--teacher`` the teacher is the recipe's architecture at its random
initialisation (the same for every setting), which costs exactly what a trained one does.
"""

from __future__ import annotations

import json
import logging
import platform
from pathlib import Path

import torch

from dfkd.config import load_config
from dfkd.data.datafree import resolve_dataset_info
from dfkd.engine.distill import distill
from dfkd.engine.flops import CONV_SHAPE, ENOUGH_SECONDS, MATMUL_MAX, PARTS
from dfkd.engine.meters import format_seconds
from dfkd.engine.rundir import check_run_dirs_free
from dfkd.errors import ConfigError, closest
from dfkd.models import create_model
from dfkd.sysinfo import cpu_model

log = logging.getLogger("dfkd")

# name -> (engine.precision, engine.channels_last, engine.compile)
SETTINGS = {
    "fp32": ("fp32", False, False),
    "fp32-cl": ("fp32", True, False),
    "bf16": ("bf16", False, False),
    "bf16-cl": ("bf16", True, False),
    "fp32-compile": ("fp32", False, True),
    "bf16-cl-compile": ("bf16", True, True),
}
DEFAULT_SETTINGS = ["fp32", "fp32-cl", "bf16", "bf16-cl"]  # compiling takes minutes: only when asked for
# the settings a throughput run makes itself, and where the user chooses them instead of a key=value override
OWN_KEYS = {
    "train.epochs": "one epoch of --rounds rounds",
    "train.rounds_per_epoch": "choose it with --rounds",
    "engine.precision": "choose it with --settings",
    "engine.channels_last": "choose it with --settings",
    "engine.compile": "choose it with --settings",
    "engine.count_flops": "it always counts",
    "out": "choose the folder with --out",
}
DEFAULT_RECIPE = "demo/fashion-mnist-cudfkd"
DEFAULT_ROUNDS = 8


def parse_settings(text: str | None) -> list[str]:
    """``"fp32,bf16"`` -> the named settings, checked (default: those without compile, fp32 first)."""
    if not text:
        return list(DEFAULT_SETTINGS)
    names = [name.strip() for name in text.split(",") if name.strip()]
    for name in names:
        if name not in SETTINGS:
            raise ConfigError(f"unknown setting '{name}'{closest(name, SETTINGS)}; settings: {', '.join(SETTINGS)}")
    return names


def run_throughput(
    out: str | Path,
    recipe: str = DEFAULT_RECIPE,
    settings: list[str] | None = None,
    rounds: int = DEFAULT_ROUNDS,
    teacher: str | None = None,
    overrides: list[str] | None = None,
    overwrite: bool = False,
) -> str:
    """Run ``recipe`` for ``rounds`` rounds per setting into ``out/<setting>``; return the markdown table (also
    written to ``out/throughput.md``, the numbers to ``out/throughput.json``). Runs already in ``out/<setting>`` are
    refused unless ``overwrite``."""
    if rounds < 1:
        raise ConfigError(f"--rounds {rounds}: give at least one round")
    for item in overrides or []:
        key = item.partition("=")[0]
        if key in OWN_KEYS:
            raise ConfigError(f"bench throughput sets {key} itself: {OWN_KEYS[key]}")
    root = Path(out)
    settings = settings or DEFAULT_SETTINGS
    check_run_dirs_free((root / name for name in settings), overwrite)
    rows = []
    for name in settings:
        precision, channels_last, compiled = SETTINGS[name]
        cfg = load_config(
            "distill",
            recipe,
            [
                *(overrides or []),
                "train.epochs=1",
                f"train.rounds_per_epoch={rounds}",
                f"engine.precision={precision}",
                f"engine.channels_last={str(channels_last).lower()}",
                f"engine.compile={str(compiled).lower()}",
                "engine.count_flops=true",
                f"out={root / name}",
            ],
        )
        module = None
        if teacher:
            cfg.teacher.weights = teacher
        else:
            info = resolve_dataset_info(cfg.data)  # a registered dataset, or data.name=none with its data keys
            torch.manual_seed(0)  # the same untrained teacher for every setting
            module = create_model(cfg.teacher.arch, info.num_classes, info.image_shape[0])
        log.info("throughput: %s, %s, %d rounds", recipe, name, rounds)
        rows.append((name, distill(cfg, teacher=module, overwrite=overwrite)))
    table = format_throughput(recipe, rounds, rows)
    root.mkdir(parents=True, exist_ok=True)
    (root / "throughput.md").write_text(table + "\n")
    (root / "throughput.json").write_text(json.dumps({name: summary for name, summary in rows}, indent=2) + "\n")
    return table


def format_throughput(recipe: str, rounds: int, rows: list[tuple[str, dict]]) -> str:
    """The table: one row per setting, speeds also as a ratio to the first row."""
    first = rows[0][1].get("student_steps_per_second") or 0.0
    lines = [
        f"### Throughput of {recipe}, {rounds} rounds per setting",
        "",
        f"Machine: {cpu_model()}; torch {torch.__version__}; {rows[0][1].get('device', '')}; "
        f"Python {platform.python_version()}.",
        "",
        "| setting | student steps/s | x first row | images/s | generator step | student batches | student step "
        "| evaluation | wall | peak memory |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, s in rows:
        rate = s.get("student_steps_per_second") or 0.0
        batch = s.get("batch_seconds", 0.0)
        generator = s["synth_seconds"] - batch
        lines.append(
            f"| {name} | {rate:.2f} | {rate / first if first else 0:.2f} | {s.get('images_per_second') or 0:.0f} "
            f"| {format_seconds(generator)} | {format_seconds(batch)} | {format_seconds(s['student_seconds'])} "
            f"| {format_seconds(s['eval_seconds'])} | {format_seconds(s['total_seconds'])} "
            f"| {s['peak_memory_bytes'] / 2**30:.2f} GiB |"
        )
    lines += [
        "",
        "Student steps/s and images/s count the training time only (generator step + student batches + student step); "
        "the wall time adds set-up, evaluation, checkpoints and pictures. Peak memory: CUDA max allocated on a GPU, "
        "the run's peak RSS on CPU.",
        "",
        *format_memory(rows),
        "",
        *format_arithmetic(rows),
    ]
    return "\n".join(lines)


def _rate(row: dict, with_share: bool = True) -> str:
    rate, share = row.get("gflops_per_second"), row.get("of_conv_peak")
    if rate is None:
        return "-"
    return f"{rate:.2f} ({share:.0%})" if with_share and share is not None else f"{rate:.2f}"


def _share(value: float | None) -> str:
    return f"{value:.0%}" if value is not None else "-"


def format_arithmetic(rows: list[tuple[str, dict]]) -> list[str]:
    """Per setting: the GFLOP of one item of each part, the GFLOP/s each part and the whole loop achieved (with their
    share of the conv peak), and the loop's share of the matmul and conv peaks; then the peaks themselves."""
    lines = [
        "### Arithmetic",
        "",
        "FLOPs as torch's FlopCounterMode counts them (matrix products and convolutions, forward and backward; "
        "element-wise work counts zero), of one item each, in an untimed pass before the loop that leaves the run as "
        "it was: a *synthesis round* (all its generator steps), a *student batch* (generating it), a *student step* "
        "(the method's loss with the teacher's forward, backward, optimiser step). GFLOP/s = FLOPs of one item x how "
        "many the run did / the part's time above; *loop* = all of them over the three parts' time. In brackets: the "
        "share of this machine's conv peak (below).",
        "",
        "| setting | GFLOP: synthesis round | student batch | student step | GFLOP/s: generator step "
        "| student batches | student step | loop | loop / conv peak | loop / matmul peak |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    peaks = []
    for name, s in rows:
        flops, rates, peak = s.get("flops"), s.get("arithmetic"), s.get("peak") or {}
        if not flops or not rates:
            lines.append(f"| {name} |" + " - |" * 9)
            continue
        cells = [f"{flops[part] / 1e9:.3g}" for part in PARTS]
        cells += [_rate(rates[part]) for part in PARTS]
        loop = rates["loop"]
        cells += [_rate(loop, with_share=False), _share(loop["of_conv_peak"]), _share(loop["of_matmul_peak"])]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
        if peak:
            peaks.append(
                f"| {name} | {peak['threads']} | {peak['matmul_gflops_per_second']:.1f} ({peak['matmul_size']}^3) "
                f"| {peak['conv_gflops_per_second']:.1f} (batch {peak['conv_batch']}) |"
            )
    if peaks:
        lines += [
            "",
            f"Peak of this machine ({cpu_model()}), measured in this process before each setting's loop, on its "
            f"threads and in its precision and memory format, best of 3 calls after a warm-up: a square matrix "
            f"product (sides grown up to {MATMUL_MAX} until one call takes {ENOUGH_SECONDS:g} s) and a 3x3 "
            f"{CONV_SHAPE[1]}->{CONV_SHAPE[1]} convolution on {CONV_SHAPE[2]}x{CONV_SHAPE[3]} images (batch grown up "
            f"to {CONV_SHAPE[0]} likewise), forward.",
            "",
            "| setting | threads | matmul GFLOP/s | conv GFLOP/s |",
            "|---|---|---|---|",
            *peaks,
        ]
    return lines


def _mib(value: float | None) -> str:
    return f"{value / 2**20:.1f}" if value is not None else "-"


def format_memory(rows: list[tuple[str, dict]]) -> list[str]:
    """Where each setting's peak memory goes, in MiB: the process before the training loop (of which the data, the
    networks and the method's state), and what the loop adds on top (activations, generated batches, gradients)."""
    lines = [
        "Where the memory goes (MiB): *before the loop* is the whole process when training starts (interpreter, "
        "libraries, data, networks); *the loop adds* is the peak minus that (activations, generated batches, "
        "gradients, optimiser states); teacher/student/method count their tensors (student with its optimiser "
        "state; method: generators, pools, banks and their optimisers, at the end of the run).",
        "",
        "| setting | peak | before the loop | the loop adds | data | teacher | student | method |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, s in rows:
        mem = s.get("memory") or {}
        start, peak = mem.get("loop_start_bytes"), s.get("peak_memory_bytes")
        added = peak - start if peak is not None and start is not None else None
        cells = [peak, start, added] + [
            mem.get(k) for k in ("data_bytes", "teacher_bytes", "student_bytes", "method_bytes")
        ]
        lines.append(f"| {name} | " + " | ".join(_mib(c) for c in cells) + " |")
    return lines
