"""The accuracy-per-second race: every method of a suite under one wall-clock budget, compared on the clock.

``dfkd bench SUITE --seeds 0,1,2 --budget SECONDS`` runs each recipe of the suite once per seed with
``engine.time_limit`` set to the budget (a recipe whose schedule ends sooner simply finishes), then reads every run's
per-epoch ``eval/top1`` against its wall time (``time/total_seconds``: synthesis, student, evaluation, checkpoints)
and writes, beside the suite's table:

- ``race.md``: per method the time each seed took to first reach each accuracy threshold (mean over the seeds that
  reached it, and how many did) and the accuracy at fixed times;
- ``race.png``: test accuracy against wall time, one line per method (the mean over seeds of the last evaluated
  accuracy) and a band from the lowest to the highest seed.

The accuracy at a time is that of the last epoch evaluated by then (the student a user stopping there would hold),
not the best so far.
"""

from __future__ import annotations

import json
import textwrap
from collections.abc import Sequence
from pathlib import Path

from dfkd.engine.meters import format_seconds
from dfkd.engine.rundir import scored_by
from dfkd.images import pyplot
from dfkd.metrics import mean_std
from dfkd.sysinfo import cpu_model

THRESHOLDS = (70.0, 75.0, 80.0, 85.0)
CHECKPOINTS = (600.0, 1800.0)  # ten and thirty minutes, the questions

Curve = list[tuple[float, float]]  # (wall seconds at the end of an epoch, test top-1 of that epoch)


def read_curve(run_dir: str | Path, metric: str = "eval/top1") -> Curve:
    """(wall time, ``metric``) per evaluated epoch of a run, from its metrics.jsonl (``eval/agreement`` for a run
    without data)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [(float(r["time/total_seconds"]), float(r[metric])) for r in rows if metric in r]


def time_to(curve: Curve, threshold: float) -> float | None:
    """The wall time of the first epoch whose accuracy reaches ``threshold`` (None if none does)."""
    return next((t for t, acc in curve if acc >= threshold), None)


def accuracy_at(curve: Curve, seconds: float) -> float | None:
    """The accuracy of the last epoch evaluated by ``seconds`` (None before the first evaluation)."""
    earlier = [acc for t, acc in curve if t <= seconds]
    return earlier[-1] if earlier else None


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:g} min"


def format_race_table(
    curves: dict[str, list[Curve]],
    budget: float,
    thresholds: Sequence[float] = THRESHOLDS,
    checkpoints: Sequence[float] = CHECKPOINTS,
    score: str = "top-1",
) -> str:
    """Markdown: per method, time to each threshold (mean over the seeds that reached it, n/N reached) and the
    ``score`` (mean ± std over seeds) at each checkpoint time within the budget."""
    times = [c for c in checkpoints if c <= budget] or [budget]
    header = [
        "method",
        "seeds",
        *(f"time to {x:g} %" for x in thresholds),
        *(f"{score} at {_minutes(t)}" for t in times),
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method, seed_curves in curves.items():
        n = len(seed_curves)
        cells = [method, str(n)]
        for x in thresholds:
            reached = [t for t in (time_to(c, x) for c in seed_curves) if t is not None]
            if not reached:
                cells.append(f"- (0/{n})")
            else:
                cells.append(f"{format_seconds(mean_std(reached)[0])} ({len(reached)}/{n})")
        for t in times:
            values = [a for a in (accuracy_at(c, t) for c in seed_curves) if a is not None]
            if not values:
                cells.append("-")
            else:
                missing = f" ({len(values)}/{n} evaluated)" if len(values) < n else ""
                mean, std = mean_std(values)
                cells.append(f"{mean:.2f} ± {std:.2f}{missing}")
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Budget {format_seconds(budget)} of wall time per run (engine.time_limit; the epoch that passes it is "
        "finished); time to X %: the first epoch at or above X, mean over the seeds that reached it (n/N reached); "
        f"{score} at T: the last epoch evaluated by T, mean ± std over seeds. CPU: " + cpu_model() + ".",
    ]
    return "\n".join(lines)


def winner_at(curves: dict[str, list[Curve]], seconds: float) -> tuple[str, float] | None:
    """The method with the highest mean accuracy at ``seconds`` over seeds that all have an evaluation by then."""
    best: tuple[str, float] | None = None
    for method, seed_curves in curves.items():
        values = [accuracy_at(c, seconds) for c in seed_curves]
        if not values or any(v is None for v in values):
            continue
        mean = mean_std(values)[0]
        if best is None or mean > best[1]:
            best = (method, mean)
    return best


def plot_race(
    path: str | Path, curves: dict[str, list[Curve]], budget: float, title: str = "", score: str = "test top-1"
) -> None:
    """Test accuracy against wall time: per method the mean over seeds of the last evaluated accuracy and a band
    from the lowest to the highest seed, up to the method's last evaluation (the x axis ends at the budget, or
    sooner when every run finished sooner)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=100)
    try:
        finished = [t for cs in curves.values() for c in cs for t, _ in c[-1:]]
        end = min(budget, max(finished, default=budget))  # runs that all finished early need no empty budget
        grid = [i * end / 400 for i in range(401)]
        palette = plt.get_cmap("tab10").colors
        for i, (method, seed_curves) in enumerate(curves.items()):
            # ten colours, then the same colours dashed: no two methods share a line style
            style = {"color": palette[i % len(palette)], "linestyle": ("-", "--", ":")[i // len(palette) % 3]}
            last = max((c[-1][0] for c in seed_curves if c), default=0.0)
            xs, mean, low, high = [], [], [], []
            for t in [*(g for g in grid if g < last), last]:  # each line ends with its method's last evaluation
                values = [accuracy_at(c, t) for c in seed_curves]
                if not values or any(v is None for v in values):
                    continue
                xs.append(t / 60)
                mean.append(mean_std(values)[0])
                low.append(min(values))  # type: ignore[type-var]
                high.append(max(values))  # type: ignore[type-var]
            if xs:
                ax.plot(xs, mean, drawstyle="steps-post", linewidth=1.6, label=method, **style)
                ax.fill_between(xs, low, high, step="post", alpha=0.15, color=style["color"])
        for x in THRESHOLDS:
            ax.axhline(x, color="gray", linewidth=0.5, linestyle=":")
        if end >= budget:
            ax.axvline(budget / 60, color="gray", linewidth=0.8, linestyle="--")
        ax.set_xlabel("wall time (minutes)")
        ax.set_ylabel(f"{score} (%)")
        ax.set_title(textwrap.fill(title, 90), fontsize=9)
        ax.grid(alpha=0.3)
        if curves:
            ax.legend(loc="lower right", fontsize=7, ncol=2)
        fig.tight_layout()
        fig.savefig(path)
    finally:
        plt.close(fig)


def write_race(root: Path, title: str, cells: list[tuple[str, list[dict]]], budget: float) -> str:
    """race.md, race.png and race.json in ``root`` from the summaries of every recipe's seeds; returns the table."""
    every = [s for _, summaries in cells for s in summaries]
    key, score = scored_by(every)
    metric = "eval/agreement" if key == "agreement" else "eval/top1"
    curves = {summaries[0]["method"]: [read_curve(s["run_dir"], metric) for s in summaries] for _, summaries in cells}
    table = format_race_table(curves, budget, score=score)
    winners = [(t, winner_at(curves, t)) for t in CHECKPOINTS if t <= budget]
    notes = [f"Highest mean {score} at {_minutes(t)}: {w[0]} ({w[1]:.2f} %)." for t, w in winners if w is not None]
    if key == "agreement":
        notes.append(
            "Agreement: with the teacher, on held-out synthetic images (`data.name=none`: there is no test set)."
        )
    text = "\n".join([f"**Race: {title}**", "", table, *([""] + notes if notes else [])])
    root.mkdir(parents=True, exist_ok=True)
    (root / "race.md").write_text(text + "\n")
    (root / "race.json").write_text(json.dumps({"budget": budget, "curves": curves}, indent=1) + "\n")
    plot_race(
        root / "race.png",
        curves,
        budget,
        f"Race: {title}",
        "agreement on held-out synthetic images" if key == "agreement" else "test top-1",
    )
    return text
