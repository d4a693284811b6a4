"""Two gloo processes on CPU (torchrun): ranks stay identical (BatchNorm student included), a killed run resumes to
exactly the uninterrupted one, and a loss that turns NaN on one rank or a clock past the time limit on one rank stops
every rank."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(
    shutil.which("torchrun") is None and not Path(sys.executable).with_name("torchrun").exists(),
    reason="torchrun not installed",
)


def torchrun(mode: str, data_root: Path, teacher_run: Path, out: Path) -> subprocess.CompletedProcess:
    launcher = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    worker = Path(__file__).with_name("ddp_worker.py")
    command = [launcher, "--standalone", "--nproc_per_node=2", str(worker), mode, str(data_root), str(teacher_run)]
    # a session of its own: a hang kills torchrun and both workers, not torchrun alone
    proc = subprocess.Popen(
        [*command, str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        stdout, stderr = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"torchrun {mode} did not end within 300 s: the ranks hang")
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def errors(proc: subprocess.CompletedProcess) -> str:
    return "\n".join(line for line in proc.stderr.splitlines() if "rror" in line)[-3000:]


def load(path: Path) -> dict:
    return torch.load(path, weights_only=True)


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_two_process_gloo_run(data_root, teacher_run, tmp_path):
    proc = torchrun("run", data_root, teacher_run, tmp_path)
    assert proc.returncode == 0, errors(proc)
    dump = tmp_path / "dump"
    for name in ("student", "generator"):
        # the student has BatchNorm: its running statistics must agree across ranks too
        assert same(load(dump / f"{name}0.pt"), load(dump / f"{name}1.pt")), f"{name} differs across ranks"
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["world_size"] == 2
    # both ranks synthesised: the global count is twice one rank's 1 x 2 rounds x (16 + 2 x 16)
    assert summary["images_synthesized"] == 2 * 2 * (16 + 2 * 16)
    assert proc.stderr.count("done: student top-1") == 1, "only rank 0 reports"


def metrics(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if not k.startswith("time/")} for row in rows]


def test_a_killed_two_process_run_resumes_exactly(data_root, teacher_run, tmp_path):
    full, cut = tmp_path / "full", tmp_path / "cut"
    proc = torchrun("full", data_root, teacher_run, full)
    assert proc.returncode == 0, errors(proc)
    proc = torchrun("kill", data_root, teacher_run, cut)
    assert proc.returncode != 0 and len(metrics(cut / "run")) == 1
    proc = torchrun("resume", data_root, teacher_run, cut)
    assert proc.returncode == 0, errors(proc)
    assert metrics(cut / "run") == metrics(full / "run")
    a, b = load(full / "run" / "ckpt" / "last.pt"), load(cut / "run" / "ckpt" / "last.pt")
    assert same(a["state_dict"], b["state_dict"]) and same(a["method"], b["method"])
    for rank in (0, 1):  # each rank continued its own random stream
        assert same(load(full / "dump" / f"student{rank}.pt"), load(cut / "dump" / f"student{rank}.pt"))


def test_a_loss_that_turns_nan_on_one_rank_stops_every_rank(data_root, teacher_run, tmp_path):
    proc = torchrun("diverge", data_root, teacher_run, tmp_path)  # a hang would end in the timeout
    assert proc.returncode == 0, errors(proc)
    own = (tmp_path / "dump" / "diverged1.txt").read_text()
    other = (tmp_path / "dump" / "diverged0.txt").read_text()
    assert "in epoch 2" in own and "train/loss became nan" in own
    assert "non-finite on another rank in epoch 2" in other
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "diverged"


def test_rank_0s_clock_decides_the_time_limit_for_every_rank(data_root, teacher_run, tmp_path):
    # rank 0's clock is past engine.time_limit after epoch 1, rank 1's is not: a rank that stopped alone would leave
    # the other waiting in a collective (a hang ends in the timeout)
    proc = torchrun("clock", data_root, teacher_run, tmp_path)
    assert proc.returncode == 0, errors(proc)
    ran = [json.loads((tmp_path / "dump" / f"summary{rank}.json").read_text())["epochs"] for rank in (0, 1)]
    assert ran == [1, 1]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["stopped_at_time_limit"] and summary["status"] == "ok"


# what each method keeps identical across ranks (the rest of its state, e.g. a pool, is per rank by design)
SHARED_STATE = {
    "adadfkd": ("queue.", "generator."),  # every rank's keys enqueued; the persistent generator's gradients averaged
    "fastdfkd": ("generator.", "bn_stats."),  # the meta-generator (averaged meta-gradient) and the BN moving averages
    "nayer": ("bn_stats.",),  # the BN moving averages (the generator is per rank, as the pool)
}


@pytest.mark.parametrize("name", sorted(SHARED_STATE))
def test_what_a_method_shares_across_ranks_stays_identical(name, data_root, teacher_run, tmp_path):
    proc = torchrun(f"method:{name}", data_root, teacher_run, tmp_path)
    assert proc.returncode == 0, errors(proc)
    a, b = load(tmp_path / "dump" / "method0.pt"), load(tmp_path / "dump" / "method1.pt")
    shared = {k for k in a if k.startswith(SHARED_STATE[name])}
    assert shared and all(torch.equal(a[k], b[k]) for k in shared), [k for k in shared if not torch.equal(a[k], b[k])]
    if name == "adadfkd":  # 2 ranks x 8 keys x (1 generator step x 4 rounds) = 64 keys into a 40-column ring
        assert int(a["queue.ptr"]) == 64 % 40
