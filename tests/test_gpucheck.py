"""`dfkd bench gpu-check --tiny`: the GPU machine's first command, end to end on a CPU."""

from __future__ import annotations

from pathlib import Path

import torch
from helpers import assert_one_line_error

from dfkd.commands.cli import main


def test_gpu_check_runs_end_to_end_on_cpu(capsys, data_root, monkeypatch, tmp_path):
    monkeypatch.setenv("DFKD_DATA", str(data_root))
    code = main(["bench", "gpu-check", "--tiny", "--methods", "cudfkd,cmi", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0, out
    rows = [line for line in out.splitlines() if line.startswith("| cudfkd") or line.startswith("| cmi")]
    assert len(rows) == 4  # two methods x (fp32, bf16 + channels_last)
    assert all("| yes |" in row and "GiB" in row for row in rows)
    assert "| bf16 + channels_last |" in out and "All runs finished with finite losses." in out
    assert (tmp_path / "teacher" / "summary.json").is_file()  # it trained its own teacher


def test_gpu_check_refuses_to_run_without_a_gpu_unless_tiny(capsys, monkeypatch, tmp_path):
    from dfkd.commands import gpucheck

    def no_runs(*args, **kwargs):
        raise AssertionError("gpu-check ran on a machine without a GPU")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(gpucheck, "train_teacher", no_runs)
    monkeypatch.setattr(gpucheck, "distill", no_runs)
    code = main(["bench", "gpu-check", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert_one_line_error(code, err, "gpu-check measures a GPU but torch finds none")
    assert "--tiny" in err
    assert not any(tmp_path.iterdir())


def test_gpu_check_replaces_the_runs_in_its_folder_only_with_overwrite(capsys, monkeypatch, tmp_path):
    from dfkd.commands import gpucheck

    calls = []

    def fake_distill(cfg, overwrite=False):  # a run leaves its config.yaml behind, as a real one does
        calls.append((Path(cfg.out).name, overwrite))
        Path(cfg.out).mkdir(parents=True, exist_ok=True)
        (Path(cfg.out) / "config.yaml").write_text("{}\n")
        return {"status": "ok", "device": "cuda:0 (a GPU)"}

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(gpucheck, "distill", fake_distill)
    teacher = str(tmp_path / "t.pt")
    args = ["bench", "gpu-check", "--methods", "cudfkd,cmi", "--teacher", teacher, "--out", str(tmp_path)]
    assert main(args) == 0 and len(calls) == 4 and not any(overwrite for _, overwrite in calls)
    calls.clear()
    code = main(args)
    assert_one_line_error(code, capsys.readouterr().err, f"{tmp_path / 'cudfkd-fp32'} (and 3 more) already holds a run")
    assert calls == []  # refused before the first run
    assert main([*args, "--overwrite"]) == 0
    assert calls == [(f"{m}-{p}", True) for m in ("cudfkd", "cmi") for p in ("fp32", "bf16")]


def test_gpu_check_takes_no_overrides_and_tiny_belongs_to_it(capsys, tmp_path):
    assert main(["bench", "gpu-check", "--out", str(tmp_path), "train.epochs=2"]) == 2
    assert "gpu-check runs fixed settings: drop --seeds, --budget and key=value overrides" in capsys.readouterr().err
    assert main(["bench", "fashion-mnist", "--tiny", "--out", str(tmp_path)]) == 2
    assert "--tiny belongs to `dfkd bench gpu-check`" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing ran
