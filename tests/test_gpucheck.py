"""`dfkd bench gpu-check --tiny`: the GPU machine's first command, end to end on a CPU."""

from __future__ import annotations

from dfkd.cli import main


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


def test_gpu_check_takes_no_overrides_and_tiny_belongs_to_it(capsys, tmp_path):
    assert main(["bench", "gpu-check", "--out", str(tmp_path), "train.epochs=2"]) == 2
    assert "gpu-check runs fixed settings: drop --seeds, --budget and key=value overrides" in capsys.readouterr().err
    assert main(["bench", "fashion-mnist", "--tiny", "--out", str(tmp_path)]) == 2
    assert "--tiny belongs to `dfkd bench gpu-check`" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing ran
