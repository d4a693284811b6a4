"""`dfkd bench cifar10|cifar100`: the paper's tables as cells, run here, over a queue of devices, through submitit."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from helpers import assert_one_line_error, interrupted_after, make_cifar_like
from helpers import run_cli as run

from dfkd.commands.launch import CellJob, parse_devices, parse_job_options
from dfkd.commands.tables import (
    TABLE_SUITES,
    collect,
    format_tables,
    load_layout,
    plan_cells,
    run_cell,
    select,
    write_tables,
)
from dfkd.config import recipe_names
from dfkd.data import download as dl

TINY_RUN = ["engine.progress=false", "engine.device=cpu", "engine.sample_every=0"]


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cifar")
    make_cifar_like(root, "cifar10")
    make_cifar_like(root, "cifar100")
    return root


def table_rows(text: str, heading: str) -> dict[str, list[str]]:
    """The markdown grid after ``heading`` as {first cell: the other cells}."""
    lines = text[text.index(heading) :].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| method"))
    rows = {}
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = cells[1:]
    return rows


def fake_run(root: Path, run: str, status: str = "ok", last: float = 90.0, best: float = 91.0, **extra) -> None:
    """A finished distillation's summary.json, as the engine writes it."""
    folder = root / run
    folder.mkdir(parents=True, exist_ok=True)
    summary = {
        "status": status,
        "student_top1_last": last,
        "student_top1_best": best,
        "mu": None if best is None else best - 1.0,
        "var": 2.0,
        "teacher_top1": 95.0,
        "total_seconds": 3600.0,
        "peak_memory_bytes": 2**30,
        "images_synthesized": 1000,
        "student_steps": 100,
        "device": "cpu",
        **extra,
    }
    (folder / "summary.json").write_text(json.dumps(summary))


def test_each_layout_names_pairs_and_rows_that_dfkd_has():
    recipes = set(recipe_names())
    for suite in TABLE_SUITES:
        layout = load_layout(suite)
        assert layout.dataset == suite and layout.pairs and layout.cost["pair"] in {p.name for p in layout.pairs}
        for pair in layout.pairs:
            assert pair.name == f"{pair.teacher}-{pair.student}"
            for arch in (pair.teacher, pair.student):  # T. Scratch and S. Scratch come from the teacher recipes
                assert f"teachers/{suite}-{arch}" in recipes
        keys = [row.key for row in layout.rows]
        assert keys[:2] == ["teacher", "student"] and "cudfkd" in keys and len(keys) == len(set(keys))
    assert "wrn40_2-wrn16_1" not in {p.name for p in load_layout("cifar100").pairs}  # the paper has no such column
    assert not any(name.startswith("tables/") for name in recipes)  # layouts are not recipes


def test_cells_train_one_teacher_per_architecture_and_every_seed_waits_for_it():
    sel = select("cifar10", seeds=[0, 1])
    cells = plan_cells(sel)
    teachers = [c for c in cells if c.kind == "teacher"]
    # wrn40_2 teaches three pairs and is trained once
    assert sorted(c.arch for c in teachers) == ["resnet34", "vgg11", "wrn40_2"]
    assert max(cells.index(c) for c in teachers) < min(cells.index(c) for c in cells if c.kind != "teacher")
    distill = [c for c in cells if c.kind == "distill"]
    for cell in distill:
        assert cell.needs == f"teachers/{sel.layout.pair(cell.pair).teacher}"
        assert cell.recipe == f"cifar10/{cell.row}-{cell.pair}" and f"engine.seed={cell.seed}" in cell.overrides
    cudfkd = [c for c in distill if c.row == "cudfkd" and c.pair == "resnet34-resnet18"]
    assert [c.run for c in cudfkd] == ["resnet34-resnet18/cudfkd/seed0", "resnet34-resnet18/cudfkd/seed1"]
    scratch = [c.run for c in cells if c.kind == "scratch"]
    # resnet18 is the student of two pairs: trained once per seed
    assert scratch.count("scratch/resnet18/seed0") == 1 and "scratch/wrn16_1/seed1" in scratch
    # a cell exists exactly where a recipe does
    assert {(c.row, c.pair) for c in distill} == {
        (row.key, pair.name)
        for row in sel.rows
        for pair in sel.pairs
        if f"cifar10/{row.key}-{pair.name}" in set(recipe_names())
    }


def test_selection_keeps_the_layouts_order_and_the_teachers_row():
    sel = select("cifar10", pairs=["wrn40_2-wrn16_1"], methods=["cudfkd", "dafl"])
    assert [r.key for r in sel.rows] == ["teacher", "dafl", "cudfkd"]
    assert [p.name for p in sel.pairs] == ["wrn40_2-wrn16_1"]


def test_zoo_teachers_replace_the_teacher_cells(tmp_path):
    (tmp_path / "cifar10_resnet34.pth").write_bytes(b"")
    sel = select("cifar10", pairs=["resnet34-resnet18"], methods=["cudfkd"], seeds=[3], teachers=str(tmp_path))
    cells = plan_cells(sel)
    assert [c.kind for c in cells] == ["distill"]
    assert cells[0].needs is None and f"teacher.weights={tmp_path / 'cifar10_resnet34.pth'}" in cells[0].overrides


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["--pairs", "resnet34-resnet19"], "did you mean 'resnet34-resnet18'"),
        (["--methods", "cudfkdd"], "did you mean 'cudfkd'"),
        (["--teachers", "/nonexistent/zoo"], "no such folder"),
        (["--devices", "0,x"], "'x' is not a GPU index"),
        (["--job", "timeout_min"], "is not key=value"),
        (["--wait"], "--wait belongs to --launcher"),
        (["--teacher", "runs/t"], "not --teacher"),
        (["--launcher", "slurm", "--devices", "0"], "drop one"),
    ],
)
def test_bad_table_options_are_one_line_errors(capsys, tmp_path, cifar_root, argv, fragment):
    code, _, err = run(capsys, "bench", "cifar10", "--out", tmp_path / "b", *argv, f"data.root={cifar_root}")
    assert_one_line_error(code, err, fragment)
    assert not (tmp_path / "b").exists()


def test_a_missing_zoo_file_and_a_missing_dataset_are_named(capsys, tmp_path):
    (tmp_path / "zoo").mkdir()
    code, _, err = run(capsys, "bench", "cifar10", "--teachers", tmp_path / "zoo", "--pairs", "vgg11-resnet18")
    assert_one_line_error(code, err, "lacks cifar10_vgg11.pth")
    code, _, err = run(capsys, "bench", "cifar100", "--out", tmp_path / "b", f"data.root={tmp_path / 'empty'}")
    assert_one_line_error(code, err, "cifar100 train batches not found")
    assert not (tmp_path / "b").exists()


def test_other_suites_refuse_the_table_flags(capsys, tmp_path):
    code, _, err = run(capsys, "bench", "fashion-mnist", "--pairs", "x", "--out", tmp_path)
    assert_one_line_error(code, err, "--pairs belong to the table suites")


def test_failed_seeds_are_marked_and_never_averaged_in(tmp_path):
    pairs, methods = ["resnet34-resnet18", "vgg11-resnet18"], ["cudfkd", "dafl", "nayer"]
    sel = select("cifar10", pairs=pairs, methods=methods, seeds=[0, 1, 2])
    fake_run(tmp_path, "resnet34-resnet18/cudfkd/seed0", last=90.0, best=94.0)
    fake_run(tmp_path, "resnet34-resnet18/cudfkd/seed1", last=92.0, best=96.0)
    fake_run(tmp_path, "resnet34-resnet18/cudfkd/seed2", status="collapsed", last=10.0, best=11.0)
    for seed in range(3):  # every DAFL seed on VGG-11 diverged
        fake_run(tmp_path, f"vgg11-resnet18/dafl/seed{seed}", status="diverged", last=None, best=None)
    (tmp_path / "errors").mkdir()
    (tmp_path / "errors" / "resnet34-resnet18__dafl__seed0.txt").write_text("RuntimeError: out of memory\n")
    result = collect(sel, tmp_path)
    text = format_tables(result)
    headline = table_rows(text, "**last epoch**")
    paper = table_rows(text, "As the paper reports it")
    # (90 + 92) / 2, std sqrt(2); the collapsed seed's 10 % is left out and counted
    assert headline["CuDFKD"][0] == "91.00 ± 1.41 (2) **1/3 collapsed**"
    assert paper["CuDFKD"][0] == "95.00 ± 1.41 / 95.28 (-0.28)"
    assert headline["DAFL"][1] == "**FAILED** **3/3 diverged**"
    assert headline["DAFL"][0] == "**FAILED** **1/3 error**"  # seed 0 crashed, seeds 1 and 2 never ran
    assert headline["CuDFKD"][1] == "not run" and paper["CuDFKD"][1] == "- / 91.61"
    assert headline["NAYER *"][1] == "no recipe" and paper["NAYER *"][1] == "no recipe / -"  # dfkd has none
    assert headline["T. Scratch"] == ["not run", "not run"]
    cell = next(c for c in result["cells"] if (c["row"], c["pair"]) == ("cudfkd", "resnet34-resnet18"))
    assert cell["seeds_ok"] == 2 and cell["seeds_failed"] == 1
    assert cell["aggregate"]["last"] == {"mean": 91.0, "std": pytest.approx(2**0.5)}
    cost = {row["method"]: row for row in result["cost"]["rows"]}
    assert list(cost)[:2] == ["dafl", "cudfkd"]  # the paper's cost rows first, in its order
    assert cost["cudfkd"]["published"]["hours"] == 5.48


def test_one_seed_is_one_number_not_a_zero_std(tmp_path):
    sel = select("cifar10", pairs=["resnet34-resnet18"], methods=["cudfkd"], seeds=[0])
    fake_run(tmp_path, "resnet34-resnet18/cudfkd/seed0", last=93.5, best=94.0)
    assert table_rows(format_tables(collect(sel, tmp_path)), "**last epoch**")["CuDFKD"] == ["93.50"]


@contextmanager
def loopback_mirror(folder: Path) -> Iterator[str]:
    """``folder`` served over HTTP on 127.0.0.1 (a mirror laid out like a data root); yields its URL."""
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(folder))
    handler.log_message = lambda *args: None
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_port}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_tiny_cifar10_suite_writes_both_tables_in_the_papers_layout(capsys, monkeypatch, tmp_path, cifar_root):
    # the data: fetched and verified by `dfkd data get` from a loopback mirror of the official archive
    archive = cifar_root / "cifar-10-python.tar.gz"
    (remote,) = dl.REMOTE["cifar10"]
    digest = hashlib.md5(archive.read_bytes()).hexdigest()
    monkeypatch.setitem(dl.REMOTE, "cifar10", (dataclasses.replace(remote, digest=digest, size=None),))
    data = tmp_path / "data"
    with loopback_mirror(cifar_root) as url:
        code, _, _ = run(capsys, "data", "get", "cifar10", "--root", data, "--mirror", url)
    assert code == 0 and (data / "cifar-10-python.tar.gz").read_bytes() == archive.read_bytes()
    out = tmp_path / "bench"
    argv = ["bench", "cifar10", "--tiny", "--seeds", "0", "--out", out, f"data.root={data}", *TINY_RUN]
    code, stdout, _ = run(capsys, *argv)
    failed = json.loads((out / "table.json").read_text())
    failed = [r for c in failed["cells"] for r in c["runs"] if r["status"] != "ok"]
    assert code == (1 if failed else 0) and all(r["status"] == "collapsed" for r in failed), failed
    layout = load_layout("cifar10")
    table = (out / "table.md").read_text()
    headline = table_rows(table, "**last epoch**")
    paper = table_rows(table, "As the paper reports it")
    recipes = set(recipe_names())
    for row in layout.rows:
        assert row.label + (" *" if row.extra else "") in headline
        cells = headline[row.label + (" *" if row.extra else "")]
        assert len(cells) == len(layout.pairs)
        for pair, text, paper_text in zip(layout.pairs, cells, paper[row.label + (" *" if row.extra else "")]):
            has_recipe = row.key in ("teacher", "student") or f"cifar10/{row.key}-{pair.name}" in recipes
            if has_recipe:  # a number (a tiny run may collapse: then it is marked, never a silent number)
                assert re.fullmatch(r"\d+\.\d\d|\*\*FAILED\*\* \*\*1/1 collapsed\*\*", text), (row, pair, text)
                assert re.fullmatch(r"(\d+\.\d\d|-) / (\d+\.\d\d|-)( \([+-]\d+\.\d\d\))?", paper_text), paper_text
            else:
                assert text == "no recipe"
    # the published number of a cell is its recipe's expected top-1
    assert paper["CuDFKD"][0].split(" / ")[1].startswith("95.28")
    result = json.loads((out / "table.json").read_text())
    assert {c["row"] for c in result["cells"]} == {r.key for r in layout.rows}
    cost = (out / "cost.md").read_text()
    assert "| cudfkd | 1/1 |" in cost and "94.1 / 2.88 / 95.0 / 6.84 GB / 5.48 h" in cost
    assert "T. Scratch" in stdout and "Cost on resnet34-resnet18" in stdout
    # a second call reuses every finished cell: nothing is trained again
    stamp = (out / "resnet34-resnet18" / "cudfkd" / "seed0" / "summary.json").stat().st_mtime_ns
    code, _, _ = run(capsys, *argv)
    assert code == (1 if failed else 0)
    assert (out / "resnet34-resnet18" / "cudfkd" / "seed0" / "summary.json").stat().st_mtime_ns == stamp
    # --collect assembles the same tables from the folder alone
    code, _, _ = run(capsys, "bench", "cifar10", "--tiny", "--seeds", "0", "--collect", out, f"data.root={data}")
    assert code == (1 if failed else 0) and (out / "table.md").read_text() == table


def tiny_cells(tmp_path: Path, cifar_root: Path, methods: str, *extra: str) -> list[str]:
    return [
        "bench", "cifar10", "--tiny", "--seeds", "0", "--pairs", "wrn40_2-wrn16_1", "--methods", methods,
        "--out", tmp_path / "bench", f"data.root={cifar_root}", *TINY_RUN, *extra,
    ]  # fmt: skip


def test_a_queue_over_devices_runs_every_cell_and_a_failed_cell_stops_nothing(capsys, tmp_path, cifar_root):
    out = tmp_path / "bench"
    # a folder made with other settings is refused for that cell alone
    (out / "wrn40_2-wrn16_1" / "dafl" / "seed0").mkdir(parents=True)
    (out / "wrn40_2-wrn16_1" / "dafl" / "seed0" / "config.yaml").write_text("train: {epochs: 99}\n")
    code, stdout, _ = run(capsys, *tiny_cells(tmp_path, cifar_root, "cudfkd,dafl"), "--devices", "cpu,cpu")
    assert code == 1 and "FAILED: 1 run(s) of the table" in stdout  # a table with a failed run: exit 1
    headline = table_rows(stdout, "**last epoch**")
    assert re.fullmatch(r"\d+\.\d\d", headline["CuDFKD"][0]) and re.fullmatch(r"\d+\.\d\d", headline["T. Scratch"][0])
    assert headline["DAFL"][0] == "**FAILED** **1/1 error**"
    reason = (out / "errors" / "wrn40_2-wrn16_1__dafl__seed0.txt").read_text()
    assert "holds a run made with other settings" in reason and "delete that folder" in reason


def test_the_submitit_local_executor_runs_the_cluster_path(capsys, tmp_path, cifar_root):
    pytest.importorskip("submitit")
    code, stdout, _ = run(
        capsys, *tiny_cells(tmp_path, cifar_root, "cudfkd"), "--launcher", "submitit-local", "--wait",
        "--job", "timeout_min=10",
    )  # fmt: skip
    assert code == 0
    out = tmp_path / "bench"
    jobs = json.loads((out / "jobs.json").read_text())
    assert jobs["launcher"] == "submitit-local"
    assert {j["run"] for j in jobs["jobs"]} == {"teachers/wrn40_2", "wrn40_2-wrn16_1/cudfkd/seed0"}
    assert re.fullmatch(r"\d+\.\d\d", table_rows(stdout, "**last epoch**")["CuDFKD"][0])
    assert (out / "wrn40_2-wrn16_1" / "cudfkd" / "seed0" / "summary.json").is_file()
    # without --wait the command returns at once and says how to collect
    code, stdout, _ = run(capsys, *tiny_cells(tmp_path, cifar_root, "cudfkd"), "--launcher", "submitit-local")
    assert code == 0 and f"dfkd bench cifar10 --collect {out}" in stdout


def test_a_requeued_job_resumes_its_cell_from_the_last_checkpoint(tmp_path, cifar_root):
    pytest.importorskip("submitit")
    sel = select(
        "cifar10", ["wrn40_2-wrn16_1"], ["cudfkd"], [0], tiny=True,
        overrides=[f"data.root={cifar_root}", *TINY_RUN, "train.epochs=2"],
    )  # fmt: skip
    teacher, cell = plan_cells(sel)
    run_cell(teacher, tmp_path)
    with interrupted_after(1), pytest.raises(KeyboardInterrupt):  # preempted after its first epoch
        run_cell(cell, tmp_path)
    requeued = CellJob(cell, str(tmp_path)).checkpoint()
    assert requeued.function.cell == cell  # submitit resubmits the same cell
    assert requeued.function() == "ok"
    rows = (tmp_path / cell.run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["epoch"] for r in rows] == [1, 2]
    assert "resum" in (tmp_path / cell.run / "log.txt").read_text()


def test_the_plan_counts_each_cell_and_times_it_without_running_it(capsys, tmp_path, cifar_root):
    out = tmp_path / "bench"
    code, stdout, _ = run(capsys, *tiny_cells(tmp_path, cifar_root, "cudfkd,student"), "--plan")
    assert code == 0
    plan = json.loads((out / "plan.json").read_text())
    by_run = {c["run"]: c for c in plan["cells"]}
    assert set(by_run) == {"teachers/wrn40_2", "scratch/wrn16_1/seed0", "wrn40_2-wrn16_1/cudfkd/seed0"}
    cell = by_run["wrn40_2-wrn16_1/cudfkd/seed0"]
    # --tiny: 1 epoch x 1 round x 2 student steps, and 1 generator step per round
    assert cell["student_steps"] == 2 and cell["synthesis_steps"] == 1 and cell["seconds"] > 0
    assert cell["images"] > 0  # CuDFKD's generator makes the student's batches
    teacher = by_run["teachers/wrn40_2"]
    # one epoch of the real training split (50,000 images) at the tiny batch of 64
    assert teacher["student_steps"] == 782 and teacher["synthesis_steps"] == 0
    assert "wrn40_2-wrn16_1/cudfkd/seed0" in stdout and (out / "plan.md").is_file()
    assert not (out / "wrn40_2-wrn16_1").exists() and not (out / "teachers").exists()  # nothing ran
    # at a smaller timed batch (the tiny recipes' is 8) the counts stay, the timing is redone and scaled
    code, _, _ = run(capsys, *tiny_cells(tmp_path, cifar_root, "cudfkd"), "--plan", "--plan-batch", "4")
    again = json.loads((out / "plan.json").read_text())
    assert code == 0 and again["timings"]["cifar10/cudfkd-wrn40_2-wrn16_1"]["timed_batch"] == 4
    assert plan["timings"]["cifar10/cudfkd-wrn40_2-wrn16_1"]["timed_batch"] == 8
    assert {c["run"]: c["student_steps"] for c in again["cells"]}["wrn40_2-wrn16_1/cudfkd/seed0"] == 2
    assert "scaled linearly" in (out / "plan.md").read_text()


def test_job_options_and_devices_parse():
    assert parse_devices("0,1, 3") == ["cuda:0", "cuda:1", "cuda:3"] and parse_devices("cpu,cpu") == ["cpu", "cpu"]
    assert parse_job_options(["timeout_min=600", "slurm_partition=gpu"]) == {
        "timeout_min": 600,
        "slurm_partition": "gpu",
    }


def test_write_tables_on_an_empty_folder_says_nothing_ran(tmp_path):
    sel = select("cifar100", pairs=["resnet34-resnet18"], methods=["cudfkd"], seeds=[0])
    text, failed = write_tables(sel, tmp_path)
    assert failed == []  # nothing ran: nothing failed either
    assert table_rows(text, "**last epoch**")["CuDFKD"] == ["not run"]
    assert (tmp_path / "cost.md").is_file() and json.loads((tmp_path / "table.json").read_text())["suite"] == "cifar100"


class FakeJob:
    def __init__(self, job_id: str, fails: bool = False):
        self.job_id, self.fails = job_id, fails

    def result(self):
        if self.fails:
            raise RuntimeError("the job failed")
        return "ok"


class FakeSlurm:
    """Records what the launcher asks a submitit executor for: the parameters in force at each submission."""

    def __init__(self):
        self.parameters: dict = {}
        self.submitted: list[tuple[str, dict]] = []

    def update_parameters(self, **kwargs):
        self.parameters.update(kwargs)

    @contextmanager
    def batch(self):
        yield

    def submit(self, job):
        self.submitted.append((job.cell.run, dict(self.parameters)))
        return FakeJob(str(len(self.submitted)))


def test_slurm_runs_each_teachers_cells_after_that_teacher_alone(monkeypatch, tmp_path):
    from dfkd.commands import launch

    fake = FakeSlurm()
    monkeypatch.setattr(launch, "_executor", lambda launcher, root, options: fake)
    sel = select("cifar10", ["resnet34-resnet18", "wrn40_2-wrn16_1"], ["cudfkd"], [0, 1])
    assert launch.submit(plan_cells(sel), tmp_path, "slurm", {}, wait=False) == 6
    ids = {cell_run: str(i) for i, (cell_run, _) in enumerate(fake.submitted, 1)}
    for cell_run, parameters in fake.submitted:
        dependency = parameters.get("slurm_additional_parameters", {}).get("dependency")
        if cell_run.startswith("teachers/"):
            assert dependency is None  # the teachers' array starts at once
        else:
            teacher = "teachers/resnet34" if cell_run.startswith("resnet34") else "teachers/wrn40_2"
            assert dependency == f"afterok:{ids[teacher]}"
    assert len(fake.submitted) == 2 + 4
    assert json.loads((tmp_path / "jobs.json").read_text())["jobs"][0] == {"run": "teachers/resnet34", "job_id": "1"}


def test_the_local_executor_skips_the_cells_of_a_failed_teacher(monkeypatch, tmp_path):
    from dfkd.commands import launch

    class FailingTeacher(FakeSlurm):
        def submit(self, job):
            super().submit(job)
            return FakeJob(str(len(self.submitted)), fails=job.cell.run == "teachers/resnet34")

    fake = FailingTeacher()
    monkeypatch.setattr(launch, "_executor", lambda launcher, root, options: fake)
    sel = select("cifar10", ["resnet34-resnet18", "wrn40_2-wrn16_1"], ["cudfkd"], [0])
    launch.submit(plan_cells(sel), tmp_path, "submitit-local", {}, wait=True)
    submitted = [cell_run for cell_run, _ in fake.submitted]
    assert submitted == ["teachers/resnet34", "teachers/wrn40_2", "wrn40_2-wrn16_1/cudfkd/seed0"]
    skipped = (tmp_path / "errors" / "resnet34-resnet18__cudfkd__seed0.txt").read_text()
    assert "its teacher (teachers/resnet34) failed" in skipped
