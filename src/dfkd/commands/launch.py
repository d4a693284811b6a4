"""Where the cells of a table run: in this process, one per device from a queue, or as submitit jobs on a cluster.

- :func:`run_here`: one cell after the other in this process.
- :func:`run_queue`: ``--devices 0,1,...``: one worker per device, each taking the next cell whose teacher has
  finished, every cell in a fresh process (``engine.device=cuda:N``; ``cpu`` runs on the CPU). A cell that fails is
  recorded and the others go on; the cells that wait for a teacher that failed are skipped.
- :func:`submit`: ``--launcher slurm`` (or ``submitit-local``, the same path on this machine): the teachers as one
  job array, then per teacher the cells that wait for it, as an array that starts when the teacher's job has
  succeeded (slurm's ``afterok``; the local executor has no dependencies, so it waits for the teachers first). Each
  job is one cell; preempted or timed out, submitit requeues it and it resumes from its ``ckpt/last.pt``. Under
  ``tasks_per_node`` > 1 a job's tasks form one torch.distributed group, as torchrun's would.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import sys
import threading
import traceback
from pathlib import Path

from dfkd.commands.tables import Cell, Selection, check_data, plan_cells, record_result, run_cell, write_tables
from dfkd.engine.common import progress_bar
from dfkd.errors import ConfigError, DfkdError, closest

log = logging.getLogger("dfkd")

LAUNCHERS = ("slurm", "submitit-local")
SUBMITIT_CLUSTER = {"slurm": "slurm", "submitit-local": "local"}
OK, FAILED, SKIPPED = "ok", "failed", "skipped"


def _attempt(cell: Cell, root: Path, device: str | None) -> str:
    """Run one cell; a failure is recorded for the tables (OUT/errors) and reported, never raised."""
    try:
        summary = run_cell(cell, root, device)
    except DfkdError as exc:
        reason = str(exc)
    except Exception as exc:  # a crash of one cell must not stop the others
        log.debug("%s", traceback.format_exc())
        reason = f"{type(exc).__name__}: {exc}"
    else:
        record_result(root, cell, None)
        status = summary.get("status", "ok")
        return OK if status == "ok" else FAILED
    record_result(root, cell, reason)
    log.warning("cell %s failed: %s", cell.run, reason.splitlines()[0] if reason else "")
    return FAILED


def _skip(root: Path, cell: Cell) -> None:
    record_result(root, cell, f"not run: its teacher ({cell.needs}) failed")


def run_here(cells: list[Cell], root: str | Path) -> dict[str, str]:
    """Every cell in this process, in order; returns run -> ok / failed / skipped."""
    root, done = Path(root), {}
    for i, cell in enumerate(cells, 1):
        if cell.needs is not None and done.get(cell.needs, OK) != OK:
            _skip(root, cell)
            done[cell.run] = SKIPPED
            continue
        log.info("cell %d/%d: %s (%s)", i, len(cells), cell.run, cell.recipe)
        done[cell.run] = _attempt(cell, root, None)
    return done


def parse_devices(text: str) -> list[str]:
    """``0,1,3`` -> ``["cuda:0", "cuda:1", "cuda:3"]``; ``cpu`` entries run on the CPU (two workers: ``cpu,cpu``)."""
    devices = []
    for item in (part.strip() for part in text.split(",")):
        if item.isdigit():
            devices.append(f"cuda:{item}")
        elif item == "cpu" or (item.startswith("cuda:") and item[5:].isdigit()):
            devices.append(item)
        elif item:
            raise ConfigError(f"--devices: '{item}' is not a GPU index; give e.g. 0,1,2,3 (or cpu)")
    if not devices:
        raise ConfigError(f"--devices names no device: '{text}'; give e.g. 0,1")
    return devices


def _cell_process(cell: Cell, root: str, device: str, level: int) -> None:
    """The body of a queue's child process: its log goes to the run's log.txt; warnings also to the console."""
    logger = logging.getLogger("dfkd")
    if not logger.handlers:
        console = logging.StreamHandler(sys.stderr)
        console.setFormatter(logging.Formatter(f"%(asctime)s [{device}] %(message)s", datefmt="%H:%M:%S"))
        console.setLevel(max(level, logging.WARNING))
        logger.addHandler(console)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    status = _attempt(cell, Path(root), device)
    sys.exit(0 if status == OK else 1)


def run_queue(cells: list[Cell], root: str | Path, devices: list[str]) -> dict[str, str]:
    """The cells over ``devices``, one at a time on each, a teacher's cells after it; returns run -> status."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    context = multiprocessing.get_context("spawn")  # a fresh interpreter per cell: no CUDA state is inherited
    pending, done = list(cells), {}
    changed = threading.Condition()
    bar = progress_bar(len(cells), 0, True, "cells")
    level = logging.getLogger("dfkd").getEffectiveLevel()

    def next_cell() -> Cell | None:
        with changed:
            while pending:
                for cell in [c for c in pending if c.needs is not None and done.get(c.needs) in (FAILED, SKIPPED)]:
                    pending.remove(cell)
                    _skip(root, cell)
                    done[cell.run] = SKIPPED
                    bar.update(1)
                ready = next((c for c in pending if c.needs is None or done.get(c.needs) == OK), None)
                if ready is not None:
                    pending.remove(ready)
                    return ready
                if pending:
                    changed.wait()
            return None

    def worker(device: str) -> None:
        while (cell := next_cell()) is not None:
            log.info("queue: %s on %s", cell.run, device)
            process = context.Process(target=_cell_process, args=(cell, str(root), device, level), daemon=False)
            process.start()
            process.join()
            status = OK if process.exitcode == 0 else FAILED
            if process.exitcode not in (0, 1):  # killed (out of memory, a signal) before it could say why
                record_result(root, cell, f"the cell's process ended with exit code {process.exitcode}")
            log.info("queue: %s %s", cell.run, "finished" if status == OK else "FAILED")
            with changed:
                done[cell.run] = status
                bar.update(1)
                changed.notify_all()

    threads = [threading.Thread(target=worker, args=(device,), daemon=True) for device in devices]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    bar.close()
    return done


# --------------------------------------------------------------------------------------------------------------------
# submitit


def parse_job_options(items: list[str]) -> dict:
    """``["timeout_min=600", "slurm_partition=gpu"]`` -> submitit parameters (values parsed as YAML scalars)."""
    import yaml

    options = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--job '{item}' is not key=value (e.g. --job timeout_min=600 --job gpus_per_node=1)")
        options[key.strip()] = yaml.safe_load(value)
    return options


class CellJob:
    """One cell as a submitit job; requeued after preemption or a timeout, it resumes from its last checkpoint."""

    def __init__(self, cell: Cell, root: str):
        self.cell, self.root = cell, root

    def __call__(self) -> str:
        _join_distributed()
        logger = logging.getLogger("dfkd")
        if not logger.handlers:  # a job's stdout/stderr go to submitit's log files
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
            logger.addHandler(handler)
            logger.setLevel(logging.INFO)
            logger.propagate = False
        status = _attempt(self.cell, Path(self.root), None)
        if status != OK:
            raise RuntimeError(f"cell {self.cell.run} failed: see {Path(self.root) / 'errors'} and its run folder")
        return status

    def checkpoint(self, *args, **kwargs):
        import submitit

        return submitit.helpers.DelayedSubmission(CellJob(self.cell, self.root))


def _join_distributed() -> None:
    """With several tasks per job, export torchrun's variables (RANK, WORLD_SIZE, MASTER_ADDR, ...) so that the
    engine joins one process group, exactly as under torchrun."""
    import submitit

    try:
        env = submitit.JobEnvironment()
    except RuntimeError:  # not inside a submitit job (a job's function called directly)
        return
    if env.num_tasks > 1 and "WORLD_SIZE" not in os.environ:
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


def _executor(launcher: str, root: Path, options: dict):
    try:
        import submitit
    except ImportError:
        raise ConfigError(f"--launcher {launcher} needs submitit: pip install 'dfkd[slurm]'") from None
    executor = submitit.AutoExecutor(folder=str(root / "submitit" / "%j"), cluster=SUBMITIT_CLUSTER[launcher])
    try:
        executor.update_parameters(name="dfkd-bench", **options)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"--job: {exc}".splitlines()[0]) from None
    return executor


def submit(cells: list[Cell], root: str | Path, launcher: str, options: dict, wait: bool) -> int:
    """Submit the cells as jobs (``OUT/jobs.json`` lists them); with ``wait``, wait until they have ended. Returns
    the number of jobs."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    executor = _executor(launcher, root, options)
    first = [c for c in cells if c.needs is None]
    waiting: dict[str, list[Cell]] = {}
    for cell in cells:
        if cell.needs is not None:
            waiting.setdefault(cell.needs, []).append(cell)
    jobs = _submit_array(executor, first, root)
    by_run = dict(zip((c.run for c in first), jobs))
    for teacher, group in waiting.items():
        job = by_run.get(teacher)
        if launcher == "slurm" and job is not None:
            executor.update_parameters(slurm_additional_parameters={"dependency": f"afterok:{job.job_id}"})
        elif job is not None and _outcome(job) != OK:  # the local executor: no dependencies, so wait here
            for cell in group:
                _skip(root, cell)
            continue
        jobs += _submit_array(executor, group, root)
        by_run.update(zip((c.run for c in group), jobs[-len(group) :]))
    record = [{"run": run, "job_id": job.job_id} for run, job in by_run.items()]
    (root / "jobs.json").write_text(json.dumps({"launcher": launcher, "jobs": record}, indent=2) + "\n")
    log.info("submitted %d jobs (%s); their logs: %s", len(record), launcher, root / "submitit")
    if wait:
        outcomes = [_outcome(job) for job in by_run.values()]
        log.info("jobs: %d succeeded, %d failed", outcomes.count(OK), len(outcomes) - outcomes.count(OK))
    return len(record)


def _submit_array(executor, cells: list[Cell], root: Path) -> list:
    if not cells:
        return []
    with executor.batch():
        jobs = [executor.submit(CellJob(cell, str(root))) for cell in cells]
    return jobs


def _outcome(job) -> str:
    """Wait for a job; a failed job (its cell recorded why in OUT/errors) is FAILED, never an exception here."""
    try:
        job.result()
    except Exception as exc:  # submitit re-raises the job's failure: it is a result of the table, not ours
        log.warning("job %s failed: %s", job.job_id, str(exc).strip().splitlines()[-1] if str(exc).strip() else exc)
        return FAILED
    return OK


def run_table_suite(
    sel: Selection,
    out: str | Path,
    devices: list[str] | None = None,
    launcher: str | None = None,
    job_options: dict | None = None,
    wait: bool = False,
) -> tuple[str, list[str]]:
    """Run (or complete) the selection's cells into ``out`` here, over ``devices`` or through ``launcher``; write
    the tables and return their text and the runs that failed (a launcher without ``wait`` returns how to collect
    them instead, and no failure yet)."""
    if launcher is not None and launcher not in LAUNCHERS:
        raise ConfigError(
            f"unknown launcher '{launcher}'{closest(launcher, LAUNCHERS)}; launchers: slurm, submitit-local"
        )
    if launcher is not None and devices:
        raise ConfigError("--devices chooses GPUs on this machine; under --launcher the scheduler does: drop one")
    check_data(sel)
    cells = plan_cells(sel)
    root = Path(out)
    log.info("bench %s: %d cells into %s", sel.layout.suite, len(cells), root)
    if launcher is not None:
        jobs = submit(cells, root, launcher, job_options or {}, wait)
        if not wait:
            return (
                f"submitted {jobs} jobs with {launcher} (ids in {root / 'jobs.json'}); when they have ended, assemble "
                f"the tables with: dfkd bench {sel.layout.suite} --collect {root} (and the same --pairs, --methods, "
                "--seeds)"
            ), []
    if devices:
        run_queue(cells, root, devices)
    else:
        run_here(cells, root)
    return write_tables(sel, root)
