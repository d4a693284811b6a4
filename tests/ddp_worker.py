"""Run by test_ddp.py under torchrun: a tiny distillation with a BatchNorm student on 2 gloo processes.

Modes: ``run`` (each rank dumps its student and generator at the end), ``kill`` (every rank SIGKILLs itself once
epoch 1 is saved), ``resume`` (continue the killed run), ``diverge`` (rank 1's teacher turns NaN at the end of
epoch 2; each rank records the error it stopped with), ``method:<name>`` (that method's LeNet recipe, tiny, one
warm-up and one distillation epoch; each rank dumps the method's state), ``clock`` (rank 0's clock runs 1,000 s
per reading, rank 1's is true, against engine.time_limit=1500; each rank records the epochs it ran).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
from helpers import NaNAfter

import dfkd
import dfkd.engine.distill as distill_module
import dfkd.methods.cudfkd as cudfkd
from dfkd.engine import rundir
from dfkd.errors import DivergedError
from dfkd.methods import METHODS

# ``method:<name>``: that method's LeNet recipe at tiny sizes for one epoch; each rank dumps the method's state
METHOD_SIZES = {
    "adadfkd": ["method.nz=16", "method.ngf=4", "method.n_neg=40"],
    "fastdfkd": ["method.nz=16", "method.ngf=4", "method.g_steps=2", "method.synthesis_batch_size=8"],
    "nayer": ["method.le_emb_size=16", "method.ngf=4", "method.g_steps=2", "method.synthesis_batch_size=10"],
}


def run_method(name: str, data_root: str, teacher_run: str, out: str, rank: int) -> None:
    overrides = [
        f"data.root={data_root}",
        f"teacher.weights={teacher_run}",
        f"out={out}/run",
        *METHOD_SIZES[name],
        "train.batch_size=8",
        "train.rounds_per_epoch=2",
        "train.kd_steps=2",
        "train.epochs=1",
        "train.synthesis_warmup_epochs=1",
        "eval.window_start=0",
        "engine.progress=false",
        "engine.device=cpu",
    ]
    cfg = dfkd.load_config("distill", f"fashion-mnist/{name}-lenet5_bn-lenet5_half", overrides)
    original_close = METHODS.get(name).close

    def close(self):  # the method's state at the end of the run, before it is torn down
        torch.save(self.state_dict(), Path(out) / "dump" / f"method{rank}.pt")
        original_close(self)

    METHODS.get(name).close = close
    dfkd.distill(cfg)


def main() -> None:
    mode, data_root, teacher_run, out = sys.argv[1:5]
    rank = int(os.environ["RANK"])
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # as the CLI does: every rank's lines to stderr
    dump = Path(out) / "dump"
    dump.mkdir(parents=True, exist_ok=True)
    if mode.startswith("method:"):
        run_method(mode.split(":", 1)[1], data_root, teacher_run, out, rank)
        return
    original_close = cudfkd.CuDFKD.close

    def close(self):  # capture the persistent generator before the run ends
        torch.save(self.generator.state_dict(), dump / f"generator{rank}.pt")
        original_close(self)

    cudfkd.CuDFKD.close = close
    if mode == "kill":
        original_append = rundir.RunDir.append_metrics

        def append_then_die(self, row):
            original_append(self, row)
            if row["epoch"] == 1:
                dist.barrier()  # rank 0 has written the checkpoint
                os.kill(os.getpid(), signal.SIGKILL)

        rundir.RunDir.append_metrics = append_then_die
    torch.manual_seed(0)  # the same initial student in every launch (rank 0's is broadcast to rank 1)
    student = dfkd.create_model("lenet5_bn", 10, 1)
    teacher = None
    overrides = [
        f"data.root={data_root}",
        f"teacher.weights={teacher_run}",
        f"out={out}/run",
        "method.nz=16",
        "method.ngf=4",
        "train.batch_size=16",
        "train.rounds_per_epoch=2",
        "train.kd_steps=2",
        f"train.epochs={1 if mode == 'run' else 3}",
        "eval.window_start=0",
        "engine.progress=false",
        "engine.device=cpu",
        "method.adv=1.0",
    ]
    if mode == "clock":
        overrides.append("engine.time_limit=1500")
        if rank == 0:  # past the limit after the first epoch on rank 0 only
            readings = iter(range(10**6))
            distill_module.time = SimpleNamespace(perf_counter=lambda: time.perf_counter() + 1000.0 * next(readings))
    if mode == "diverge":
        net = dfkd.create_model("lenet5_bn", 10, 1)
        net.load_state_dict(torch.load(Path(teacher_run) / "ckpt" / "best.pt", weights_only=True)["state_dict"])
        # 1 output check, 1 test-set pass, then 2 rounds x (1 generator step + 2 student steps) per epoch: rank 1's
        # teacher turns NaN in the last student step of epoch 2, so rank 0's losses of that epoch are all finite
        teacher = NaNAfter(net, calls=2 + 2 * 3 + 5) if rank == 1 else net
        overrides += ["teacher.weights=null", "method.bn=0"]
    cfg = dfkd.load_config("distill", "fashion-mnist/cudfkd-lenet5_bn-lenet5_half", overrides)
    try:
        summary = dfkd.distill(cfg, teacher=teacher, student=student, resume=mode == "resume")
    except DivergedError as exc:
        (dump / f"diverged{rank}.txt").write_text(str(exc))
        return
    torch.save(student.state_dict(), dump / f"student{rank}.pt")
    (dump / f"summary{rank}.json").write_text(json.dumps(summary))


if __name__ == "__main__":
    main()
