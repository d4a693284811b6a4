"""``dfkd bench``: run a suite of recipes against one teacher and tabulate the results.

A suite names a teacher recipe and the distillation recipes to compare; every run goes to ``OUT/<recipe>`` (with
``--seeds``, ``OUT/<recipe>/seed<N>``). A run that already finished is reused, an interrupted one is resumed, so
re-running the command completes a table rather than repeating it; a run made with other settings than the recipe
and overrides resolve to now is refused, never silently reused. The table (markdown) is printed and written to
``OUT/table.md``; a run that collapsed or diverged is marked in it, and with seeds every row is a mean ± std over the
seeds with the number of failed seeds beside it.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import yaml

from dfkd.config import build_config, load_config, read_yaml, recipe_names, to_dict
from dfkd.engine.distill import best_label, distill
from dfkd.engine.meters import format_seconds
from dfkd.engine.rundir import read_summary, scored_by
from dfkd.engine.supervised import train_teacher
from dfkd.errors import ConfigError, DivergedError, closest
from dfkd.images import plot_seed_curves
from dfkd.methods import METHODS
from dfkd.metrics import mean_std
from dfkd.sysinfo import cpu_model

log = logging.getLogger("dfkd")

# the teacher's predicted-class entropy on the synthetic batches (1 = every class equally often), logged by the methods
CLASS_ENTROPY = "synth/class_entropy"


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
    """The suite's recipe of every registered method that has one (variants such as ``dfad_original-*`` are not rows:
    they follow another code base's budget)."""
    available = set(recipe_names())
    prefix, suffix = suite.pattern.split("{method}")
    found = sorted(m for m in METHODS.names() if f"{prefix}{m}{suffix}" in available)
    for method in methods or []:
        if method not in found:
            raise ConfigError(f"the suite has no recipe for method '{method}'{closest(method, found)}")
    return [suite.pattern.format(method=m) for m in (methods or found)]


# what a run's result does not depend on: reusing it across edits of these is safe
NOT_SETTINGS = ("description", "expected")
# where a run ran and whether it drew a progress bar: a queue may resume a run on another GPU
NOT_SETTINGS_KEYS = ("engine.device", "engine.progress")

# Tiny sizes for every setting that drives a method's cost, where its configuration has it (unknown keys are
# errors): the whole path of a suite in seconds on a CPU (`bench gpu-check --tiny`, `bench cifar10 --tiny`).
TINY_METHOD = {
    "nz": 16,
    "ngf": 4,
    "synthesis_batch_size": 8,
    "bank_size": 64,
    "n_neg": 16,
    "memory_size": 64,
    "pool_size": 64,
    "head_dim": 8,
    "latent_dim": 8,
    "replay_batch_size": 4,
    "projection": "fixed",  # AdaDFKD: the tiny nets' feature widths differ (16-d teacher, 8-d student)
}
TINY_TRAIN = ["train.batch_size=8", "train.kd_steps=2", "eval.batch_size=256"]
TINY_SYNTHESIS_STEPS = 2


def capped_synthesis(recipe: str, overrides: list[str], cap: int) -> list[str]:
    """``overrides`` plus ``method.g_steps=cap`` where the recipe's synthesis round is longer (an inversion's
    thousands of steps)."""
    method = load_config("distill", recipe, overrides).method
    return [*overrides, f"method.g_steps={cap}"] if getattr(method, "g_steps", 0) > cap else list(overrides)


def tiny_distill_overrides(recipe: str, overrides: list[str]) -> list[str]:
    """``overrides`` plus the tiny sizes of :data:`TINY_METHOD` and :data:`TINY_TRAIN` that ``recipe`` has."""
    method = load_config("distill", recipe, overrides).method
    tiny = [f"method.{k}={v}" for k, v in TINY_METHOD.items() if hasattr(method, k)]
    return capped_synthesis(recipe, [*overrides, *TINY_TRAIN, *tiny], TINY_SYNTHESIS_STEPS)


def _flatten(data: object, prefix: str = "") -> dict:
    if isinstance(data, dict):
        out = {}
        for key, value in data.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: data}


def settings_changed(run: Path, cfg: object, kind: str = "distill") -> list[str]:
    """The settings on which the run in ``run`` (its config.yaml) and ``cfg`` differ, as ``key: old -> new``."""
    saved_file = run / "config.yaml"
    if not saved_file.is_file():
        return []
    saved, now = _flatten(read_yaml(saved_file)), _plain(cfg)
    # a setting added to dfkd after the run was made, at its default, is the behaviour the run had
    defaults = _plain(build_config(kind, {"method": {"name": cfg.method.name}} if kind == "distill" else {}))
    keys = sorted(
        k for k in saved.keys() | now.keys() if k.split(".")[0] not in NOT_SETTINGS and k not in NOT_SETTINGS_KEYS
    )
    changed = [k for k in keys if saved.get(k) != now.get(k) and not (k not in saved and now[k] == defaults.get(k))]
    return [f"{k}: {saved.get(k, '(unset)')} -> {now.get(k, '(unset)')}" for k in changed]


def _plain(cfg: object) -> dict:
    """A config as flat ``section.key`` -> YAML-plain value (tuples as lists, as config.yaml holds them)."""
    return _flatten(yaml.safe_load(yaml.safe_dump(to_dict(cfg))))


def _finished(path: Path) -> dict | None:
    """The run's summary, None while it has not finished; a damaged one is a one-line error."""
    return read_summary(path)


def run_suite(
    name: str,
    out: str | Path,
    methods: list[str] | None = None,
    teacher: str | None = None,
    overrides: list[str] | None = None,
    seeds: list[int] | None = None,
    budget: float | None = None,
) -> tuple[str, list[str]]:
    """Run (or complete) the suite ``name`` into ``out``; return the markdown table and the runs that failed
    (collapsed or diverged).

    Without ``seeds`` each recipe runs once (at its own ``engine.seed``) into ``OUT/<recipe>``; with seeds, each
    recipe runs once per seed into ``OUT/<recipe>/seed<N>`` and its row is the mean ± std over the seeds. With a
    ``budget`` (seconds) every run stops at that wall time and the suite is also a race (:mod:`dfkd.commands.race`).
    """
    if name not in SUITES:
        raise ConfigError(f"unknown bench suite '{name}'{closest(name, SUITES)}; suites: {', '.join(SUITES)}")
    suite, root = SUITES[name], Path(out)
    overrides = list(overrides or [])
    if budget is not None:
        if budget <= 0:
            raise ConfigError(f"--budget {budget:g}: give the race's wall-clock budget in seconds (> 0)")
        overrides.append(f"engine.time_limit={budget:g}")
    recipes = suite_recipes(suite, methods)
    if teacher is None:
        teacher_dir = root / "teacher"
        if _finished(teacher_dir) is None:
            log.info("bench: training the teacher (%s)", suite.teacher)
            resume = (teacher_dir / "ckpt" / "last.pt").is_file()
            train_teacher(load_config("train-teacher", suite.teacher, [f"out={teacher_dir}"]), resume=resume)
        teacher = str(teacher_dir)
    if not seeds:
        rows = []
        for recipe in recipes:
            summary = run_once(recipe, root / recipe.split("/")[-1], [f"teacher.weights={teacher}", *overrides])
            rows.append((recipe, summary))
        table = format_table(suite.description, rows)
        cells = [(recipe, [summary]) for recipe, summary in rows]
    else:
        cells = []
        for recipe in recipes:
            cell = root / recipe.split("/")[-1]
            summaries = run_seeds(recipe, cell, seeds, [f"teacher.weights={teacher}", *overrides])
            cells.append((recipe, summaries))
        table = format_seed_table(suite.description, cells)
    root.mkdir(parents=True, exist_ok=True)
    (root / "table.md").write_text(table + "\n")
    if budget is not None:
        from dfkd.commands.race import write_race

        table += "\n\n" + write_race(root, suite.description, cells, budget)
    failed = [s["run_dir"] for _, summaries in cells for s in summaries if s.get("status", "ok") != "ok"]
    return table, failed


def run_once(recipe: str, run: Path, overrides: list[str], kind: str = "distill") -> dict:
    """One distillation (or, with ``kind="train-teacher"``, one network trained on real data) into ``run``: reused
    when it finished, resumed when it was interrupted.

    A run that diverged has written its summary (status ``diverged``) and is reported, not retried. A run made with
    other settings (``settings_changed``) raises ConfigError: its folder is left as it is.
    """
    cfg = load_config(kind, recipe, [*overrides, f"out={run}"])
    changed = settings_changed(run, cfg, kind)
    if changed:
        shown = "; ".join(changed[:3]) + (f"; and {len(changed) - 3} more" if len(changed) > 3 else "")
        raise ConfigError(
            f"{run} holds a run made with other settings than {recipe} now gives ({shown}): delete that folder to "
            "run it again, or choose another output folder"
        )
    summary = _finished(run)
    if summary is None:
        log.info("bench: %s -> %s", recipe, run)
        last = (run / "ckpt" / "last.pt").is_file()
        try:
            # a folder without a checkpoint holds no result (a run that failed before its first epoch ended)
            train = distill if kind == "distill" else train_teacher
            summary = train(cfg, resume=last, overwrite=not last and run.exists())
        except DivergedError as exc:
            log.warning("bench: %s", exc)
            summary = _finished(run)
            if summary is None:
                raise
    return summary


def run_seeds(recipe: str, cell: Path, seeds: list[int], overrides: list[str]) -> list[dict]:
    """``recipe`` once per seed into ``cell/seed<N>``; writes ``cell/seeds.json`` and ``cell/accuracy.png``."""
    summaries = [run_once(recipe, cell / f"seed{seed}", [*overrides, f"engine.seed={seed}"]) for seed in seeds]
    aggregate = aggregate_seeds(summaries)
    cell.mkdir(parents=True, exist_ok=True)
    (cell / "seeds.json").write_text(json.dumps({"aggregate": aggregate, "runs": summaries}, indent=2) + "\n")
    curves = {f"seed {s.get('seed')}": _curve(s) for s in summaries}
    plot_seed_curves(cell / "accuracy.png", curves, title=f"{recipe}: {len(seeds)} seeds")
    return summaries


def _curve(summary: dict) -> list[float]:
    path = Path(summary["run_dir"]) / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [row.get("eval/top1", row.get("eval/agreement")) for row in rows]  # agreement: a data.name=none run


AGGREGATED = ("student_top1_best", "student_top1_last", "agreement_best", "agreement_last", "mu", "var")


def aggregate_seeds(summaries: list[dict]) -> dict:
    """Mean ± std over the seeds that did not fail of last and best top-1, agreement and the curve's μ/σ², and the
    failed seeds: a collapsed or diverged seed is counted and named, never averaged in."""
    statuses = [s.get("status", "ok") for s in summaries]
    ok = [s for s, status in zip(summaries, statuses) if status == "ok"]
    out: dict = {"seeds": [s.get("seed") for s in summaries], "n": len(summaries), "n_ok": len(ok)}
    for key in AGGREGATED:
        mean, std = mean_std([s.get(key) for s in ok])
        out[key] = {"mean": mean, "std": std}
    out["collapsed"] = statuses.count("collapsed")
    out["diverged"] = statuses.count("diverged")
    out["failed_seeds"] = [s.get("seed") for s, st in zip(summaries, statuses) if st != "ok"]
    return out


def result_columns(summaries: list[dict]) -> tuple[str, ...]:
    """The headline first (the last epoch), then the best epoch labelled by what chose it."""
    _, name = scored_by(summaries)
    splits = sorted({best_label(s.get("eval_split")) for s in summaries})
    return (f"last {name} %", f"best {name} % ({', '.join(splits)})", "agree % (last)", "μ", "σ²", "class entropy")


def _num(value, fmt: str = ".2f") -> str:
    return "-" if value is None else format(value, fmt)


def _pm(stat: dict) -> str:
    return "-" if stat["mean"] is None else f"{stat['mean']:.2f} ± {stat['std']:.2f}"


def last_epoch_metric(summary: dict, key: str) -> float | None:
    """``key`` in the last line of the run's metrics.jsonl (None where the run or the key is missing)."""
    path = Path(summary.get("run_dir") or "") / "metrics.jsonl"
    if not summary.get("run_dir") or not path.is_file():
        return None
    lines = path.read_text().splitlines()
    return json.loads(lines[-1]).get(key) if lines else None


def status_cell(summary: dict) -> str:
    status = summary.get("status", "ok")
    return status if status == "ok" else f"**{status.upper()}**"


def format_table(title: str, rows: list[tuple[str, dict]]) -> str:
    summaries = [s for _, s in rows]
    key, _ = scored_by(summaries)
    last, best, *_ = result_columns(summaries)
    header = (
        "method",
        "status",
        last,
        best,
        "μ",
        "σ²",
        "agree % (last)",
        "steps",
        "images",
        "img/s",
        "synth",
        "student",
        "total",
        "peak mem",
    )
    lines = [f"**{title}**", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for s in summaries:
        busy = s["synth_seconds"] + s["student_seconds"]
        cells = (
            s["method"],
            status_cell(s),
            _num(s[f"{key}_last"]),
            _num(s[f"{key}_best"]),
            _num(s["mu"]),
            _num(s["var"]),
            _num(s.get("agreement_last")),
            f"{s['student_steps']:,}",
            f"{s['images_synthesized']:,}",
            _num(s["images_synthesized"] / busy if busy else None, ".0f"),
            format_seconds(s["synth_seconds"]),
            format_seconds(s["student_seconds"]),
            format_seconds(s["total_seconds"]),
            f"{s['peak_memory_bytes'] / 2**30:.2f} GiB",
        )
        lines.append("| " + " | ".join(cells) + " |")
    lines += _footer(summaries)
    return "\n".join(lines)


def format_seed_table(title: str, cells: list[tuple[str, list[dict]]]) -> str:
    """One row per recipe (mean ± std over its seeds that did not fail; the failed ones counted and named), then
    every seed's own row."""
    every = [s for _, summaries in cells for s in summaries]
    key, _ = scored_by(every)
    columns = result_columns(every)
    header = ("method", "seeds", "failed", *columns, "img/s", "total/seed")
    lines = [f"**{title}**", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    # read once per run: the mean row and the per-seed rows both show it
    entropies = [[last_epoch_metric(s, CLASS_ENTROPY) for s in summaries] for _, summaries in cells]
    for (_recipe, summaries), cell_entropies in zip(cells, entropies):
        agg = aggregate_seeds(summaries)
        failed = agg["collapsed"] + agg["diverged"]
        failed_cell = f"**{failed}/{agg['n']}** (seeds {', '.join(map(str, agg['failed_seeds']))})" if failed else "0"
        ok = [s for s in summaries if s.get("status", "ok") == "ok"]
        total = mean_std([s["total_seconds"] for s in ok])[0]
        rate = mean_std([s.get("images_per_second") for s in ok])[0]
        entropy = mean_std([e for s, e in zip(summaries, cell_entropies) if s in ok])[0]
        row = (
            summaries[0]["method"],
            ",".join(str(s) for s in agg["seeds"]),
            failed_cell,
            _pm(agg[f"{key}_last"]),
            _pm(agg[f"{key}_best"]),
            _pm(agg["agreement_last"]),
            _pm(agg["mu"]),
            _pm(agg["var"]),
            _num(entropy),
            f"{rate:,.0f}" if rate is not None else "-",
            format_seconds(total) if total is not None else "-",
        )
        lines.append("| " + " | ".join(row) + " |")
    header = ("method", "seed", "status", *columns, "images", "total")
    lines += ["", "Per seed:", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for (_recipe, summaries), cell_entropies in zip(cells, entropies):
        for s, entropy in zip(summaries, cell_entropies):
            row = (
                s["method"],
                str(s.get("seed")),
                status_cell(s),
                _num(s[f"{key}_last"]),
                _num(s[f"{key}_best"]),
                _num(s.get("agreement_last")),
                _num(s["mu"]),
                _num(s["var"]),
                _num(entropy),
                f"{s['images_synthesized']:,}",
                format_seconds(s["total_seconds"]),
            )
            lines.append("| " + " | ".join(row) + " |")
    lines += _footer(every)
    return "\n".join(lines)


def _footer(summaries: list[dict]) -> list[str]:
    if not summaries:
        return []
    key, _ = scored_by(summaries)
    teacher = sorted({s["teacher_top1"] for s in summaries if s.get("teacher_top1") is not None})
    split = {s.get("eval_split", "test") for s in summaries}
    scored = (
        "Scored by agreement with the teacher on held-out synthetic images (there is no test set: `data.name=none`); "
        "an optimistic measure that compares runs of one teacher, not a test accuracy"
        if key == "agreement"
        else f"Teacher top-1: {', '.join(f'{t:.2f}%' for t in teacher) or '-'}"
    )
    return [
        "",
        f"{scored}; evaluated on: {', '.join(sorted(split))}; device: {summaries[0]['device']}; CPU: {cpu_model()}.",
        "",
        "Headline: the last epoch. The best epoch is the one the evaluation split chose (test-selected: optimistic, "
        "the papers' convention). μ and σ²: mean and variance of the curve over its window; mean ± std over the seeds "
        "that did not fail.",
        "",
        "Class entropy: the entropy of the teacher's predicted classes on the last epoch's synthetic batches over "
        "ln K (1 = every class equally often; far below 1 = the synthesis covers a few classes).",
    ]
