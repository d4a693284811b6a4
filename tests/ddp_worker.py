"""Run by test_ddp.py under torchrun: a tiny distillation, then each rank dumps its student and generator."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

import dfkd
import dfkd.methods.cudfkd as cudfkd


def main() -> None:
    data_root, teacher_run, out = sys.argv[1:4]
    rank = int(os.environ["RANK"])
    dump = Path(out) / "dump"
    dump.mkdir(parents=True, exist_ok=True)
    original_close = cudfkd.CuDFKD.close

    def close(self):  # capture the persistent generator before the run ends
        torch.save(self.generator.state_dict(), dump / f"generator{rank}.pt")
        original_close(self)

    cudfkd.CuDFKD.close = close
    student = dfkd.create_model("lenet5_half", 10, 1)
    cfg = dfkd.load_config(
        "distill",
        "fashion-mnist/cudfkd-lenet5_bn-lenet5_half",
        [
            f"data.root={data_root}",
            f"teacher.weights={teacher_run}",
            f"out={out}/run",
            "method.nz=16",
            "method.ngf=4",
            "train.batch_size=16",
            "train.rounds_per_epoch=2",
            "train.kd_steps=2",
            "train.epochs=1",
            "eval.window_start=0",
            "engine.progress=false",
            "engine.device=cpu",
            "method.adv=1.0",
        ],
    )
    dfkd.distill(cfg, student=student)
    torch.save(student.state_dict(), dump / f"student{rank}.pt")


if __name__ == "__main__":
    main()
