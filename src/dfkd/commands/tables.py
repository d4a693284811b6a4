"""``dfkd bench cifar10|cifar100``: the CuDFKD paper's result and cost tables, regenerated cell by cell.

The layout of each table (its columns: teacher -> student pairs; its rows: the methods, the teacher and the student
trained on real data; the published cost table) is data, ``recipes/tables/<suite>.yaml``. A table is run as a list
of *cells*, each one run folder under ``OUT``:

- ``teachers/<arch>``: a teacher trained on real data by its recipe ``teachers/<dataset>-<arch>`` (one per
  architecture, shared by the pairs that use it), unless ``--teachers DIR`` names the CMI model zoo's files
  (``DIR/<dataset>_<arch>.pth``, loaded strictly);
- ``scratch/<arch>/seed<N>``: the student's architecture trained on real data (the S. Scratch row);
- ``<pair>/<method>/seed<N>``: a distillation by the recipe ``<dataset>/<method>-<pair>``, which waits for its
  pair's teacher.

A cell that finished is reused, an interrupted one resumes from its ``ckpt/last.pt``, a cell made with other
settings is refused (:func:`dfkd.commands.bench.run_once`). The tables are assembled from whatever cells have finished:
``table.md`` (the headline, last epoch, and the paper's convention, best epoch chosen on the test set, beside the
published number), ``cost.md`` and ``table.json``. A collapsed, diverged or crashed seed is marked and never
averaged in. Where the cells run (here, one per device, or as a submitit job array) is :mod:`dfkd.commands.launch`.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from dfkd.commands.bench import run_once, settings_changed, tiny_distill_overrides
from dfkd.config import TABLES_DIR, find_recipe, load_config, read_yaml, recipe_names, recipe_root
from dfkd.data import DATASETS, candidate_roots, dataset_info
from dfkd.engine.distill import distill
from dfkd.engine.env import setup_env
from dfkd.engine.meters import format_seconds
from dfkd.engine.rundir import read_summary
from dfkd.errors import STATUS_OK, ConfigError, DfkdError, closest
from dfkd.metrics import mean_std
from dfkd.models import create_model
from dfkd.sysinfo import cpu_model

log = logging.getLogger("dfkd")

TABLE_SUITES = ("cifar10", "cifar100")
DEFAULT_SEEDS = (0, 1, 2)
# both CIFARs: 50,000 training and 10,000 test images (what a plan's epoch and evaluation cost is scaled to)
SPLIT_SIZES = {"cifar10": (50_000, 10_000), "cifar100": (50_000, 10_000)}
TEACHER_ROW, STUDENT_ROW = "teacher", "student"

# --tiny: the whole path on a CPU in seconds: two-layer networks, one short epoch, one round
TINY_ARCH = "tiny_cnn"
TINY_TEACHER = ["train.epochs=1", "train.batch_size=64", f"model.arch={TINY_ARCH}", "eval.batch_size=256"]
TINY_DISTILL = [
    f"teacher.arch={TINY_ARCH}",
    f"student.arch={TINY_ARCH}",
    "train.epochs=1",
    "train.rounds_per_epoch=1",
    "train.synthesis_warmup_epochs=0",
]


@dataclass(frozen=True)
class Pair:
    name: str  # e.g. resnet34-resnet18, the recipes' suffix
    label: str
    teacher: str
    student: str


@dataclass(frozen=True)
class Row:
    key: str  # a method name, or "teacher" / "student" for the scratch rows
    label: str
    extra: bool = False  # beyond the paper's rows
    published: dict = field(default_factory=dict)  # pair -> number, for a cell no recipe can follow


@dataclass(frozen=True)
class Layout:
    suite: str
    description: str
    source: str
    dataset: str
    pairs: tuple[Pair, ...]
    rows: tuple[Row, ...]
    cost: dict  # the published cost table: pair, batch_size, device, source, rows

    def pair(self, name: str) -> Pair:
        return next(p for p in self.pairs if p.name == name)


def load_layout(suite: str) -> Layout:
    """The table layout ``recipes/tables/<suite>.yaml``."""
    if suite not in TABLE_SUITES:
        raise ConfigError(f"unknown table suite '{suite}'{closest(suite, TABLE_SUITES)}")
    data = read_yaml(recipe_root() / TABLES_DIR / f"{suite}.yaml")
    rows = []
    for extra, items in ((False, data["rows"]), (True, data.get("extra_rows") or [])):
        for item in items:
            key = item.get("method") or {"teacher": TEACHER_ROW, "student": STUDENT_ROW}[item["kind"]]
            rows.append(Row(key, item["label"], extra, dict(item.get("published") or {})))
    return Layout(
        suite,
        data["description"],
        data["source"],
        data["dataset"],
        tuple(Pair(p["name"], p["label"], p["teacher"], p["student"]) for p in data["pairs"]),
        tuple(rows),
        dict(data.get("cost") or {}),
    )


def recipe_for(layout: Layout, method: str, pair: str) -> str | None:
    """The shipped distillation recipe of a cell, or None where dfkd has none."""
    name = f"{layout.dataset}/{method}-{pair}"
    return name if name in _recipes() else None


def _recipes() -> set[str]:
    return set(recipe_names())


def teacher_recipe(layout: Layout, arch: str) -> str:
    return f"teachers/{layout.dataset}-{arch}"


def zoo_file(layout: Layout, arch: str) -> str:
    """The CMI model zoo's file name of a teacher, e.g. ``cifar10_resnet34.pth``."""
    return f"{layout.dataset}_{arch}.pth"


# --------------------------------------------------------------------------------------------------------------------
# Cells


@dataclass(frozen=True)
class Cell:
    """One run of a table: a teacher, a student trained on real data, or a distillation (one seed)."""

    kind: str  # "teacher" | "scratch" | "distill"
    run: str  # the run folder, relative to OUT
    recipe: str
    overrides: tuple[str, ...] = ()
    needs: str | None = None  # the teacher cell (its run) this one waits for
    row: str = ""
    pair: str | None = None
    arch: str | None = None
    seed: int | None = None

    @property
    def supervised(self) -> bool:
        return self.kind != "distill"


@dataclass(frozen=True)
class Selection:
    """What a table run covers: its layout, pairs, rows and seeds, and where the teachers come from."""

    layout: Layout
    pairs: tuple[Pair, ...]
    rows: tuple[Row, ...]
    seeds: tuple[int, ...]
    teachers: str | None = None  # a CMI-zoo folder, or None: the suite trains them
    tiny: bool = False
    overrides: tuple[str, ...] = ()


def select(
    suite: str,
    pairs: list[str] | None = None,
    methods: list[str] | None = None,
    seeds: list[int] | None = None,
    teachers: str | None = None,
    tiny: bool = False,
    overrides: list[str] | None = None,
) -> Selection:
    """Check the user's choices against the layout (one-line errors naming the closest valid name)."""
    layout = load_layout(suite)
    by_name = {p.name: p for p in layout.pairs}
    for name in pairs or []:
        if name not in by_name:
            raise ConfigError(f"{suite} has no pair '{name}'{closest(name, by_name)}; pairs: {', '.join(by_name)}")
    keys = {r.key: r for r in layout.rows}
    for key in methods or []:
        if key not in keys:
            raise ConfigError(
                f"{suite} has no row '{key}'{closest(key, keys)}; rows: {', '.join(keys)} (teacher and student are "
                "the networks trained on real data)"
            )
    if teachers is not None:
        folder = Path(teachers).expanduser()
        if not folder.is_dir():
            raise ConfigError(f"--teachers {teachers}: no such folder; give the folder of the teachers' .pth files")
        chosen = [by_name[n] for n in pairs] if pairs else list(layout.pairs)
        missing = sorted({zoo_file(layout, p.teacher) for p in chosen} - {f.name for f in folder.iterdir()})
        if missing:
            raise ConfigError(
                f"--teachers {teachers} lacks {', '.join(missing)}: the CMI model zoo's names "
                f"(<dataset>_<arch>.pth); leave --teachers out to train them"
            )
        teachers = str(folder)
    return Selection(
        layout,
        tuple(by_name[n] for n in pairs) if pairs else layout.pairs,
        # the layout's order; the teacher's row whenever the teachers are used at all
        tuple(r for r in layout.rows if r.key in methods or r.key == TEACHER_ROW) if methods else layout.rows,
        tuple(seeds) if seeds else DEFAULT_SEEDS,
        teachers,
        tiny,
        tuple(overrides or ()),
    )


def check_data(sel: Selection) -> None:
    """Fail before any cell starts when the dataset's files are missing (the error says how to fetch them)."""
    cfg = load_config("train-teacher", teacher_recipe(sel.layout, sel.pairs[0].teacher), supervised_overrides(sel))
    spec = DATASETS.get(sel.layout.dataset)
    for split in ("train", "test"):
        spec.locate(split, candidate_roots(cfg.data.root))


def supervised_overrides(sel: Selection) -> list[str]:
    """The user's overrides that also apply to the networks trained on real data: where the data is, the engine."""
    return [o for o in sel.overrides if o.split("=")[0].split(".")[0] in SHARED_SECTIONS]


SHARED_SECTIONS = ("data", "engine")


def plan_cells(sel: Selection) -> list[Cell]:
    """Every cell of the selection, teachers first (the distillations wait for them)."""
    layout, keys = sel.layout, {r.key for r in sel.rows}
    cells: list[Cell] = []
    teacher_runs: dict[str, str] = {}
    for arch in dict.fromkeys(p.teacher for p in sel.pairs):
        if sel.teachers is not None:
            teacher_runs[arch] = str(Path(sel.teachers) / zoo_file(layout, arch))
            continue
        run = f"teachers/{arch}"
        teacher_runs[arch] = run
        extra = [*(TINY_TEACHER if sel.tiny else []), *supervised_overrides(sel)]
        cells.append(Cell("teacher", run, teacher_recipe(layout, arch), tuple(extra), row=TEACHER_ROW, arch=arch))
    if STUDENT_ROW in keys:
        for arch in dict.fromkeys(p.student for p in sel.pairs):
            for seed in sel.seeds:
                extra = [*(TINY_TEACHER if sel.tiny else []), *supervised_overrides(sel), f"engine.seed={seed}"]
                cells.append(
                    Cell(
                        "scratch",
                        f"scratch/{arch}/seed{seed}",
                        teacher_recipe(layout, arch),
                        tuple(extra),
                        row=STUDENT_ROW,
                        arch=arch,
                        seed=seed,
                    )
                )
    for row in sel.rows:
        if row.key in (TEACHER_ROW, STUDENT_ROW):
            continue
        for pair in sel.pairs:
            recipe = recipe_for(layout, row.key, pair.name)
            if recipe is None:
                continue
            # a zoo teacher is a file named now; a trained one is a run of OUT, named when the cell runs
            zoo = [f"teacher.weights={teacher_runs[pair.teacher]}"] if sel.teachers is not None else []
            needs = None if zoo else teacher_runs[pair.teacher]
            for seed in sel.seeds:
                extra = [*sel.overrides, *zoo, f"engine.seed={seed}"]
                if sel.tiny:
                    extra = tiny_distill_overrides(recipe, [*TINY_DISTILL, *extra])
                cells.append(
                    Cell(
                        "distill",
                        f"{pair.name}/{row.key}/seed{seed}",
                        recipe,
                        tuple(extra),
                        needs,
                        row.key,
                        pair.name,
                        pair.student,
                        seed,
                    )
                )
    return cells


def run_cell(cell: Cell, root: str | Path, device: str | None = None) -> dict:
    """Run (or reuse, or resume) one cell into ``root/cell.run``; return its summary.

    ``device`` (e.g. ``cuda:1``) is where a queue put it; it is not a setting (a cell finished on another GPU is
    reused). Raises what the run raises; a run that diverged returns its summary (status ``diverged``).
    """
    root = Path(root)
    run = root / cell.run
    extra = [f"engine.device={device}"] if device else []
    if cell.supervised:
        return run_once(cell.recipe, run, [*cell.overrides, *extra], "train-teacher")
    return run_once(cell.recipe, run, [*cell.overrides, *_teacher_override(cell, root), *extra])


def _teacher_override(cell: Cell, root: Path) -> list[str]:
    """A distillation's teacher: its teacher cell's run, or the zoo file already in its overrides."""
    if cell.needs is None:
        return []
    return [f"teacher.weights={root / cell.needs}"]


ERRORS = "errors"  # OUT/errors/<run with / as __>.txt: why a cell crashed (removed when it later succeeds)


def error_file(root: Path, cell: Cell) -> Path:
    return root / ERRORS / (cell.run.replace("/", "__") + ".txt")


def record_result(root: Path, cell: Cell, error: str | None) -> None:
    """Keep a crashed cell's one-line reason for the tables; forget it once the cell succeeded."""
    path = error_file(root, cell)
    if error is None:
        path.unlink(missing_ok=True)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(error.strip().splitlines()[0] + "\n")


def cell_result(root: Path, cell: Cell) -> dict:
    """The state of a cell in OUT: ``{"state": "done", "summary": ...}``, ``error`` (with its reason), ``missing``."""
    try:
        summary = read_summary(root / cell.run)
    except DfkdError as exc:  # a damaged summary.json: the cell is reported, the table still assembled
        return {"state": "error", "reason": str(exc)}
    if summary is not None:
        return {"state": "done", "summary": summary}
    path = error_file(root, cell)
    if path.is_file():
        return {"state": "error", "reason": path.read_text().strip()}
    return {"state": "missing"}


# --------------------------------------------------------------------------------------------------------------------
# The tables


def _status(summary: dict) -> str:
    return summary.get("status", STATUS_OK)


def _score(summary: dict, which: str) -> float | None:
    """A run's test top-1 at its last epoch or its best (test-selected) epoch, distillation or supervised."""
    key = {"last": ("student_top1_last", "top1_last"), "best": ("student_top1_best", "top1_best")}[which]
    return summary.get(key[0], summary.get(key[1]))


@dataclass
class CellStats:
    """A table cell: its seeds' results, the failed ones apart, the published number."""

    row: str
    pair: str
    recipe: str | None
    published: float | None
    runs: list[dict] = field(default_factory=list)  # per seed: seed, state, status, scores, costs
    note: str = ""

    @property
    def ok(self) -> list[dict]:
        return [r for r in self.runs if r["state"] == "done" and r["status"] == STATUS_OK]

    @property
    def failed(self) -> list[dict]:
        return [r for r in self.runs if r["state"] == "error" or (r["state"] == "done" and r["status"] != STATUS_OK)]

    def stat(self, key: str) -> tuple[float | None, float | None]:
        return mean_std([r.get(key) for r in self.ok])

    def to_json(self) -> dict:
        out = asdict(self)
        out["aggregate"] = {k: dict(zip(("mean", "std"), self.stat(k))) for k in RUN_NUMBERS}
        out["seeds_ok"], out["seeds_failed"] = len(self.ok), len(self.failed)
        return out


RUN_NUMBERS = ("last", "best", "mu", "var", "teacher_top1", "total_seconds", "peak_memory_bytes", "images", "steps")


def _run_record(cell: Cell, result: dict) -> dict:
    record = {"seed": cell.seed, "run": cell.run, "state": result["state"]}
    if result["state"] == "error":
        return {**record, "status": "error", "reason": result["reason"]}
    if result["state"] == "missing":
        return {**record, "status": "not run"}
    s = result["summary"]
    return {
        **record,
        "status": _status(s),
        "reason": s.get("status_reason"),
        "last": _score(s, "last"),
        "best": _score(s, "best"),
        "mu": s.get("mu"),
        "var": s.get("var"),
        "teacher_top1": s.get("teacher_top1"),
        "total_seconds": s.get("total_seconds"),
        "peak_memory_bytes": s.get("peak_memory_bytes"),
        "images": s.get("images_synthesized"),
        "steps": s.get("student_steps"),
        "device": s.get("device"),
    }


def _expected(recipe: str) -> float | None:
    return (read_yaml(find_recipe(recipe)).get("expected") or {}).get("top1")


def collect(sel: Selection, root: str | Path) -> dict:
    """Every cell of the selection as it stands in ``root`` (finished, failed or not run), grouped as the table."""
    root = Path(root)
    cells = plan_cells(sel)
    by_place: dict[tuple[str, str], CellStats] = {}
    layout = sel.layout
    for row in sel.rows:
        for pair in sel.pairs:
            if row.key == TEACHER_ROW:
                recipe = teacher_recipe(layout, pair.teacher) if sel.teachers is None else None
                published = _expected(teacher_recipe(layout, pair.teacher))
            elif row.key == STUDENT_ROW:
                recipe = teacher_recipe(layout, pair.student)
                published = _expected(recipe)
            else:
                recipe = recipe_for(layout, row.key, pair.name)
                published = _expected(recipe) if recipe else row.published.get(pair.name)
            by_place[(row.key, pair.name)] = CellStats(row.key, pair.name, recipe, published)
    for cell in cells:
        record = _run_record(cell, cell_result(root, cell))
        if cell.kind == "teacher":
            for pair in sel.pairs:
                if pair.teacher == cell.arch and (TEACHER_ROW, pair.name) in by_place:
                    by_place[(TEACHER_ROW, pair.name)].runs.append(record)
        elif cell.kind == "scratch":
            for pair in sel.pairs:
                if pair.student == cell.arch and (STUDENT_ROW, pair.name) in by_place:
                    by_place[(STUDENT_ROW, pair.name)].runs.append(record)
        else:
            by_place[(cell.row, cell.pair)].runs.append(record)
    if sel.teachers is not None:  # a zoo teacher: its accuracy as the distillations measured it on the test set
        for pair in sel.pairs:
            stats = by_place.get((TEACHER_ROW, pair.name))
            measured = [r for (key, name), c in by_place.items() if name == pair.name for r in c.ok]
            if stats is not None and measured:
                top1 = measured[0]["teacher_top1"]
                stats.runs.append(
                    {
                        "seed": None,
                        "run": zoo_file(layout, pair.teacher),
                        "state": "done",
                        "status": STATUS_OK,
                        "last": top1,
                        "best": top1,
                    }
                )
                stats.note = "the zoo's file, as the distillations measured it"
    return {
        "suite": layout.suite,
        "dataset": layout.dataset,
        "description": layout.description,
        "source": layout.source,
        "seeds": list(sel.seeds),
        "pairs": [asdict(p) for p in sel.pairs],
        "rows": [{"key": r.key, "label": r.label, "extra": r.extra} for r in sel.rows],
        "cells": [c.to_json() for c in by_place.values()],
        "cost": _cost_rows(sel, by_place),
        "machine": cpu_model(),
        "tiny": sel.tiny,
    }


def _cost_rows(sel: Selection, by_place: dict) -> dict:
    """The cost table: the paper's methods on its cost pair, then any other method run there, with what the paper
    published beside."""
    cost = sel.layout.cost
    pair = cost.get("pair")
    published = {r["method"]: r for r in cost.get("rows") or []}
    rows = []
    order = [r.key for r in sel.rows if r.key not in (TEACHER_ROW, STUDENT_ROW)]
    for key in sorted(order, key=lambda k: (k not in published, order.index(k))):
        stats = by_place.get((key, pair))
        if stats is None or (not stats.runs and key not in published):
            continue
        rows.append({"method": key, "cell": stats.to_json(), "published": published.get(key)})
    return {
        "pair": pair,
        "batch_size": cost.get("batch_size"),
        "device": cost.get("device"),
        "source": cost.get("source"),
        "rows": rows,
    }


def _pm(mean: float | None, std: float | None, fmt: str = ".2f", n: int = 2) -> str:
    """``mean ± std``; one number alone where there is one run (its std says nothing)."""
    if mean is None:
        return "-"
    return f"{mean:{fmt}}" if n == 1 else f"{mean:{fmt}} ± {std:{fmt}}"


def _failed_note(cell: dict) -> str:
    runs = cell["runs"]
    failed = [r for r in runs if r["status"] not in (STATUS_OK, "not run")]
    if not failed:
        return ""
    kinds = sorted({r["status"] for r in failed})
    return f" **{len(failed)}/{len(runs)} {'/'.join(kinds)}**"


def _headline_cell(cell: dict) -> str:
    if cell["recipe"] is None and not cell["runs"]:
        return "no recipe"
    agg = cell["aggregate"]["last"]
    if cell["seeds_ok"] == 0:
        done = [r for r in cell["runs"] if r["status"] != "not run"]
        return ("**FAILED**" + _failed_note(cell)) if done else "not run"
    n = f" ({cell['seeds_ok']})" if cell["seeds_ok"] != len(cell["runs"]) else ""
    return _pm(agg["mean"], agg["std"], n=cell["seeds_ok"]) + n + _failed_note(cell)


def _paper_cell(cell: dict) -> str:
    paper = cell["published"]
    paper_text = "-" if paper is None else f"{paper:.2f}"
    if cell["recipe"] is None and not cell["runs"]:
        return f"no recipe / {paper_text}"
    agg = cell["aggregate"]["best"]
    if agg["mean"] is None:
        return f"- / {paper_text}"
    delta = "" if paper is None else f" ({agg['mean'] - paper:+.2f})"
    return f"{_pm(agg['mean'], agg['std'], n=cell['seeds_ok'])} / {paper_text}{delta}"


def _grid(result: dict, render) -> list[str]:
    pairs = result["pairs"]
    cells = {(c["row"], c["pair"]): c for c in result["cells"]}
    lines = ["| method | " + " | ".join(p["label"] for p in pairs) + " |", "|---|" + "---|" * len(pairs)]
    for row in result["rows"]:
        label = row["label"] + (" *" if row["extra"] else "")
        lines.append(f"| {label} | " + " | ".join(render(cells[(row["key"], p["name"])]) for p in pairs) + " |")
    return lines


def format_tables(result: dict) -> str:
    """table.md: the headline grid (last epoch) and the paper's convention (best epoch) beside its numbers."""
    seeds = ",".join(map(str, result["seeds"]))
    lines = [
        f"## {result['description']}" + (" (--tiny: a test of the path, not a result)" if result["tiny"] else ""),
        "",
        f"Student top-1 (%) on the test set at the **last epoch**, mean ± std over the seeds that finished "
        f"(seeds {seeds}; the count in brackets where it is not all of them). A seed that collapsed, diverged or "
        "crashed is marked in bold and not averaged in.",
        "",
        *_grid(result, _headline_cell),
        "",
        "### As the paper reports it: best epoch (chosen on the test set) / published (difference)",
        "",
        "The best epoch is selected by its test accuracy, the papers' convention: an optimistic number, shown to "
        f"compare with the published one ({result['source']}).",
        "",
        *_grid(result, _paper_cell),
        "",
        "`*` a method beyond the paper's table. T. Scratch: the teacher trained on real data (one run per "
        "architecture); S. Scratch: the student's architecture trained on real data. "
        f"Machine: {result['machine']}.",
    ]
    return "\n".join(lines)


def _gib(value: float | None) -> str:
    return "-" if value is None else f"{value / 2**30:.2f} GiB"


def _hours(value: float | None) -> str:
    """Seconds as hours, or as minutes and seconds below an hour."""
    if value is None:
        return "-"
    return f"{value / 3600:.2f} h" if value >= 3600 else format_seconds(value)


def format_cost(result: dict) -> str:
    """cost.md: the paper's cost table (one pair) with ours beside it."""
    cost = result["cost"]
    if not cost["rows"]:
        return f"No cell of the cost table's pair ({cost['pair']}) was selected."
    header = (
        "method",
        "seeds",
        "μ",
        "σ²",
        "best",
        "last",
        "peak memory",
        "wall time",
        "images",
        "student steps",
        "paper μ / σ² / best / memory / time",
    )
    lines = [
        f"## Cost on {cost['pair']} ({result['dataset']})",
        "",
        "μ and σ² are the mean and variance of the test accuracy curve over the recipe's window of epochs "
        "(the paper's stability measure); each number is a mean over the seeds that finished. Peak memory is the "
        "CUDA peak on a GPU and the process's peak RSS on a CPU. The paper measured at batch "
        f"{cost['batch_size']} on one {cost['device']} ({cost['source']}).",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for row in cost["rows"]:
        cell, paper = row["cell"], row["published"] or {}
        agg = cell["aggregate"]
        published = " / ".join(
            "-" if paper.get(k) is None else fmt.format(paper[k])
            for k, fmt in (
                ("mu", "{:.1f}"),
                ("var", "{:.2f}"),
                ("best", "{:.1f}"),
                ("gpu_memory_gb", "{:.2f} GB"),
                ("hours", "{:.2f} h"),
            )
        )
        images, steps = agg["images"]["mean"], agg["steps"]["mean"]
        lines.append(
            "| "
            + " | ".join(
                (
                    row["method"],
                    f"{cell['seeds_ok']}/{len(cell['runs'])}" + _failed_note(cell),
                    _pm(agg["mu"]["mean"], agg["mu"]["std"], n=cell["seeds_ok"]),
                    _pm(agg["var"]["mean"], agg["var"]["std"], n=cell["seeds_ok"]),
                    _pm(agg["best"]["mean"], agg["best"]["std"], n=cell["seeds_ok"]),
                    _pm(agg["last"]["mean"], agg["last"]["std"], n=cell["seeds_ok"]),
                    _gib(agg["peak_memory_bytes"]["mean"]),
                    _hours(agg["total_seconds"]["mean"]),
                    "-" if images is None else f"{images:,.0f}",
                    "-" if steps is None else f"{steps:,.0f}",
                    published if paper else "-",
                )
            )
            + " |"
        )
    used = sorted({r["device"] for row in cost["rows"] for r in row["cell"]["runs"] if r.get("device")})
    lines += ["", f"Ran on: {'; '.join(used) or 'nothing yet'}; host CPU: {result['machine']}."]
    return "\n".join(lines)


def write_tables(sel: Selection, root: str | Path) -> tuple[str, list[str]]:
    """Assemble table.md, cost.md and table.json in ``root`` from the cells there; return the tables' text and the
    runs that failed (collapsed, diverged, crashed or skipped)."""
    root = Path(root)
    result = collect(sel, root)
    root.mkdir(parents=True, exist_ok=True)
    table, cost = format_tables(result), format_cost(result)
    (root / "table.md").write_text(table + "\n")
    (root / "cost.md").write_text(cost + "\n")
    (root / "table.json").write_text(json.dumps(result, indent=2) + "\n")
    failed = sorted({r["run"] for c in result["cells"] for r in c["runs"] if r["status"] not in (STATUS_OK, "not run")})
    return table + "\n\n" + cost, failed


# --------------------------------------------------------------------------------------------------------------------
# The plan: what the cells are, and what they would cost on this machine


PLAN_ROUNDS = 1
PLAN_SYNTHESIS_STEPS = 2  # generator / inversion steps per timed round
PLAN_STUDENT_STEPS = 2  # student steps per timed round
PLAN_HELDOUT = 500  # images the timed evaluation scores (scaled to the test set's size)
PLAN_SUPERVISED_STEPS = 3


def _plan_overrides(recipe: str, info, rounds: int, extra: list[str], batch: int | None) -> tuple[list[str], dict]:
    """Settings of a timed run of ``recipe``: one synthesis-only epoch (the images a synthesis step makes), then one
    epoch of ``rounds`` rounds of a few synthesis and student steps, on the dataset's shape without its files, at
    the recipe's batch sizes or at most ``batch``."""
    cfg = load_config("distill", recipe, extra)
    t, method = cfg.train, cfg.method
    g_full = int(getattr(method, "g_steps", 1) or 1)
    synthesis_batch = getattr(method, "synthesis_batch_size", None) or t.batch_size
    counts = {
        "epochs": t.epochs,
        "warmup_epochs": t.synthesis_warmup_epochs,
        "rounds": t.rounds_per_epoch,
        "g_steps": g_full,
        "kd_steps": t.kd_steps,
        "g_timed": min(g_full, PLAN_SYNTHESIS_STEPS),
        "kd_timed": min(t.kd_steps, PLAN_STUDENT_STEPS),
        "batch": t.batch_size,
        "batch_timed": min(t.batch_size, batch or t.batch_size),
        "synthesis_batch": synthesis_batch,
        "synthesis_batch_timed": min(synthesis_batch, batch or synthesis_batch),
    }
    overrides = [
        *extra,
        "data.name=none",
        f"data.num_classes={info.num_classes}",
        f"data.image_shape=[{','.join(map(str, info.image_shape))}]",
        f"data.mean=[{','.join(map(str, info.mean))}]",
        f"data.std=[{','.join(map(str, info.std))}]",
        f"data.heldout_size={PLAN_HELDOUT}",
        "data.heldout_steps=0",
        "train.epochs=1",
        "train.synthesis_warmup_epochs=1",
        f"train.rounds_per_epoch={rounds}",
        f"train.kd_steps={counts['kd_timed']}",
        f"train.batch_size={counts['batch_timed']}",
        "engine.sample_every=0",
        "engine.stop_on_collapse=false",
        "eval.window_start=0",
    ]
    if hasattr(method, "g_steps"):
        overrides.append(f"method.g_steps={counts['g_timed']}")
    if hasattr(method, "synthesis_batch_size"):
        overrides.append(f"method.synthesis_batch_size={counts['synthesis_batch_timed']}")
    return overrides, counts


def time_distill(
    recipe: str, info, run: Path, rounds: int, extra: list[str], test_images: int, batch: int | None = None
) -> dict:
    """Per-unit costs of ``recipe`` from a short timed run (teacher at its random initialisation, which costs what a
    trained one does), and the whole recipe's totals extrapolated from them. A timed run at a smaller batch than the
    recipe's is scaled linearly to it. ``run`` is the plan's own folder: a timing made with other settings is
    replaced, one made with these is reused."""
    overrides, n = _plan_overrides(recipe, info, rounds, extra, batch)
    cfg = load_config("distill", recipe, [*overrides, f"out={run}", "teacher.weights=null"])
    summary = read_summary(run)
    if summary is None or settings_changed(run, cfg):
        torch.manual_seed(0)
        teacher = create_model(cfg.teacher.arch, info.num_classes, info.image_shape[0])
        summary = distill(cfg, teacher=teacher, overwrite=run.exists())
    warm, timed = (json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()[:2])
    g_steps, kd_steps = rounds * n["g_timed"], rounds * n["kd_timed"]
    synthesis_scale = n["synthesis_batch"] / n["synthesis_batch_timed"]
    student_scale = n["batch"] / n["batch_timed"]

    def spent(key: str) -> float:
        return timed[f"time/{key}"] - warm[f"time/{key}"]

    per_synthesis_step = warm["images_synthesized"] / g_steps * synthesis_scale  # the synthesis-only epoch
    per_student_step = (timed["images_synthesized"] - 2 * warm["images_synthesized"]) / kd_steps * student_scale
    generator = (spent("synth_seconds") - spent("batch_seconds")) / g_steps * synthesis_scale
    student_batch = spent("batch_seconds") / kd_steps * student_scale
    student = spent("student_seconds") / kd_steps * student_scale
    evaluation = spent("eval_seconds") * test_images / PLAN_HELDOUT
    epochs = n["epochs"] + n["warmup_epochs"]
    synthesis_steps = epochs * n["rounds"] * n["g_steps"]
    student_steps = n["epochs"] * n["rounds"] * n["kd_steps"]
    seconds = synthesis_steps * generator + student_steps * (student_batch + student) + epochs * evaluation
    return {
        "student_steps": student_steps,
        "synthesis_steps": synthesis_steps,
        "images": round(synthesis_steps * per_synthesis_step + student_steps * max(per_student_step, 0.0)),
        "seconds": seconds,
        "per_unit": {
            "synthesis_step": generator,
            "student_batch": student_batch,
            "student_step": student,
            "evaluation": evaluation,
        },
        "timed_batch": n["batch_timed"],
        "device": summary["device"],
    }


def time_supervised(
    recipe: str, info, train_images: int, test_images: int, extra: list[str], batch: int | None = None
) -> dict:
    """Per-step cost of training ``recipe``'s network on real data: forward, backward and an SGD step on a random
    batch of the recipe's size or at most ``batch``, scaled linearly to the recipe's (the data is on the device and
    augmented there: not counted), and an evaluation."""
    cfg = load_config("train-teacher", recipe, extra)
    timed_batch = min(cfg.train.batch_size, batch or cfg.train.batch_size)
    env = setup_env(cfg.engine.device, "fp32", cfg.engine.channels_last, cfg.engine.threads)
    torch.manual_seed(0)
    net = env.prepare(create_model(cfg.model.arch, info.num_classes, info.image_shape[0]))
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    x = env.images(torch.rand(timed_batch, *info.image_shape, device=env.device))
    y = torch.randint(0, info.num_classes, (timed_batch,), device=env.device)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.step()

    step()  # the first step allocates and picks kernels
    _sync(env.device)
    tick = time.perf_counter()
    for _ in range(PLAN_SUPERVISED_STEPS):
        step()
    _sync(env.device)
    per_step = (time.perf_counter() - tick) / PLAN_SUPERVISED_STEPS * cfg.train.batch_size / timed_batch
    net.eval()
    with torch.no_grad():
        batch = env.images(torch.rand(min(cfg.eval.batch_size, test_images), *info.image_shape, device=env.device))
        tick = time.perf_counter()
        net(batch)
        _sync(env.device)
        evaluation = (time.perf_counter() - tick) * test_images / batch.shape[0]
    steps_per_epoch = math.ceil((train_images - cfg.data.val_size) / cfg.train.batch_size)
    steps = cfg.train.epochs * steps_per_epoch
    return {
        "student_steps": steps,
        "synthesis_steps": 0,
        "images": 0,
        "seconds": steps * per_step + cfg.train.epochs * evaluation,
        "per_unit": {"step": per_step, "evaluation": evaluation},
        "timed_batch": timed_batch,
        "device": str(env.device),
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_plan(sel: Selection, root: str | Path, rounds: int = PLAN_ROUNDS, batch: int | None = None) -> dict:
    """Time each distinct recipe of the selection once on this machine (at most at ``batch``, scaled linearly to
    the recipe's batch) and estimate every cell's hours."""
    if rounds < 1:
        raise ConfigError(f"--rounds {rounds}: give at least one round")
    if batch is not None and batch < 1:
        raise ConfigError(f"--plan-batch {batch}: give a batch size of 1 or more")
    root = Path(root)
    info = dataset_info(sel.layout.dataset)
    train_images, test_images = SPLIT_SIZES[sel.layout.dataset]
    cells = plan_cells(sel)
    timings: dict[str, dict] = {}
    for cell in cells:
        if cell.recipe in timings:
            continue
        log.info("plan: timing %s", cell.recipe)
        base = [o for o in cell.overrides if not o.startswith(("engine.seed=", "teacher.weights="))]
        if cell.supervised:
            timings[cell.recipe] = time_supervised(cell.recipe, info, train_images, test_images, base, batch)
        else:
            run = root / "plan" / cell.recipe.split("/")[-1]
            timings[cell.recipe] = time_distill(cell.recipe, info, run, rounds, base, test_images, batch)
    published = {r["method"]: r.get("hours") for r in sel.layout.cost.get("rows") or []}
    rows = []
    for cell in cells:
        t = timings[cell.recipe]
        paper_hours = published.get(cell.row) if cell.pair == sel.layout.cost.get("pair") else None
        rows.append(
            {
                **asdict(cell),
                **{k: t[k] for k in ("student_steps", "synthesis_steps", "images", "seconds")},
                "device": t["device"],
                "paper_hours": paper_hours,
            }
        )
    plan = {
        "suite": sel.layout.suite,
        "machine": cpu_model(),
        "rounds_timed": rounds,
        "batch_timed": batch,
        "cells": rows,
        "timings": timings,
        "total_seconds": sum(r["seconds"] for r in rows),
    }
    root.mkdir(parents=True, exist_ok=True)
    (root / "plan.json").write_text(json.dumps(plan, indent=2) + "\n")
    text = format_plan(plan)
    (root / "plan.md").write_text(text + "\n")
    return plan


def format_plan(plan: dict) -> str:
    header = ("cell", "recipe", "student steps", "synthesis steps", "images", "estimate", "paper (GPU)")
    lines = [
        f"## Plan of `dfkd bench {plan['suite']}`: {len(plan['cells'])} cells",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for r in plan["cells"]:
        lines.append(
            f"| {r['run']} | {r['recipe']} | {r['student_steps']:,} | {r['synthesis_steps']:,} | {r['images']:,} "
            f"| {_hours(r['seconds'])} | {_hours(None if r['paper_hours'] is None else r['paper_hours'] * 3600)} |"
        )
    devices = sorted({r["device"] for r in plan["cells"]})
    lines += [
        "",
        f"Total: {_hours(plan['total_seconds'])} of device time ({format_seconds(plan['total_seconds'])}) on "
        f"{', '.join(devices)}; host CPU: {plan['machine']}.",
        "",
        f"Estimated from {plan['rounds_timed']} timed round(s) per recipe ({PLAN_SYNTHESIS_STEPS} synthesis and "
        f"{PLAN_STUDENT_STEPS} student steps each, after one synthesis-only epoch), the teacher at its random "
        "initialisation, and one evaluation scaled to the test set; checkpoints and sample grids are not counted. "
        "Teachers and scratch students: from timed training steps on random batches. "
        + (
            f"Timed at batches of at most {plan['batch_timed']} and scaled linearly to each recipe's (close on a "
            "CPU; on a GPU a small batch underuses it, so the estimate errs high). "
            if plan.get("batch_timed")
            else ""
        )
        + "Paper: the published wall time of the cost table's cells.",
    ]
    return "\n".join(lines)
