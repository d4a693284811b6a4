"""Two gloo processes on CPU (torchrun): the student and the persistent generator stay identical across ranks."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch


@pytest.mark.skipif(
    shutil.which("torchrun") is None and not Path(sys.executable).with_name("torchrun").exists(),
    reason="torchrun not installed",
)
def test_two_process_gloo_run(data_root, teacher_run, tmp_path):
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    worker = Path(__file__).with_name("ddp_worker.py")
    proc = subprocess.run(
        [torchrun, "--standalone", "--nproc_per_node=2", str(worker), str(data_root), str(teacher_run), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, "\n".join(line for line in proc.stderr.splitlines() if "rror" in line)[-3000:]
    dump = tmp_path / "dump"
    for name in ("student", "generator"):
        a = torch.load(dump / f"{name}0.pt", weights_only=True)
        b = torch.load(dump / f"{name}1.pt", weights_only=True)
        assert all(torch.equal(a[k], b[k]) for k in a), f"{name} differs across ranks"
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["world_size"] == 2
    # both ranks synthesised: the global count is twice one rank's 1 x 2 rounds x (16 + 2 x 16)
    assert summary["images_synthesized"] == 2 * 2 * (16 + 2 * 16)
