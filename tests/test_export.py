"""`dfkd export` and `dfkd.load_student`: a student file plus its card, read back to the same logits."""

from __future__ import annotations

import hashlib
import json
import shutil
import sys

import pytest
import torch
import yaml
from helpers import TINY_DISTILL, assert_one_line_error
from helpers import run_cli as run

import dfkd
from dfkd.commands.cli import main
from dfkd.data import dataset_info, load_split, to_float
from dfkd.errors import CheckpointError, ConfigError, DfkdError
from dfkd.models import Normalized, build_network
from dfkd.models.exported import sha256_file

DEMO = "fashion-mnist/cudfkd-lenet5_bn-lenet5_half"


@pytest.fixture(scope="module")
def run_dir(data_root, tmp_path_factory):
    """A finished two-epoch tiny distillation from an untrained BN-LeNet-5 teacher (no teacher training needed)."""
    root = tmp_path_factory.mktemp("export")
    teacher = root / "teacher.pt"
    torch.manual_seed(0)
    torch.save({"state_dict": dfkd.create_model("lenet5_bn", 10, 1).state_dict(), "arch": "lenet5_bn"}, teacher)
    overrides = [f"data.root={data_root}", f"teacher.weights={teacher}", f"out={root / 'run'}", *TINY_DISTILL]
    overrides += ["train.epochs=2", "engine.sample_every=0", "engine.stop_on_collapse=false"]
    dfkd.distill(dfkd.load_config("distill", DEMO, overrides))
    return root / "run"


@pytest.fixture(scope="module")
def images(data_root):
    return to_float(load_split("fashion-mnist-32", "test", data_root)[0][:6])


def run_student(run_dir, which):
    """The run's own student, as `dfkd eval` would build it from the checkpoint."""
    info = dataset_info("fashion-mnist-32")
    net = build_network("lenet5_half", 10, 1, run_dir / "ckpt" / f"{which}.pt")
    return Normalized(net, info.mean, info.std).eval()


def test_safetensors_export_and_its_card(capsys, run_dir, images):
    code, out, err = run(capsys, "export", run_dir, "--which", "best")
    assert code == 0, err
    folder = run_dir / "export"
    card = json.loads((folder / "card.json").read_text())
    summary = json.loads((run_dir / "summary.json").read_text())
    info = dataset_info("fashion-mnist-32")
    assert card["architecture"] == "lenet5_half" and card["num_classes"] == 10
    assert card["class_names"] == list(info.classes) and card["input_shape"] == [1, 32, 32]
    assert card["mean"] == list(info.mean) and card["std"] == list(info.std)
    assert card["teacher"]["arch"] == "lenet5_bn" and card["teacher"]["weights"].endswith("teacher.pt")
    assert (card["method"], card["dataset"], card["checkpoint"]) == ("cudfkd", "fashion-mnist-32", "best")
    assert card["accuracy"]["epoch"] == summary["best_epoch"]
    assert card["accuracy"]["top1"] == summary["student_top1_best"]
    assert card["accuracy"]["agreement"] == summary["agreement_best"] and card["accuracy"]["split"] == "test"
    # best chosen on the test set: said plainly, on the card and by the command
    assert "highest top-1 on the test set" in card["selected_by"] and "optimistic" in card["selected_by"]
    assert "overstates" in card["warning"] and "note: 'best' was picked on the test set" in out
    weights = folder / "student.safetensors"
    assert card["weights"]["file"] == weights.name
    assert card["weights"]["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert card["export"]["which"] == "best" and card["dfkd_version"] == dfkd.__version__

    from safetensors.torch import load_file

    ckpt = torch.load(run_dir / "ckpt" / "best.pt", weights_only=True)
    assert set(load_file(weights)) == set(ckpt["state_dict"])  # the bare network's (CMI zoo) keys
    expected = run_student(run_dir, "best")(images)
    for path in (folder, folder / "card.json", weights):
        student = dfkd.load_student(path)
        assert not student.training and student.card["weights"]["sha256"] == card["weights"]["sha256"]
        assert torch.allclose(student(images), expected, atol=1e-6)
    assert student.dfkd_meta.num_classes == 10 and student.dfkd_meta.classes == info.classes


def test_torchscript_export_of_the_last_epoch(capsys, run_dir, images, tmp_path, monkeypatch):
    out = tmp_path / "ts"
    code, _, err = run(capsys, "export", run_dir, "--format", "torchscript", "--which", "last", "--out", out)
    assert code == 0, err
    # a TorchScript export is a program: its sha256 matching the card proves nothing about who made it
    loads = []
    real = torch.jit.load
    monkeypatch.setattr(torch.jit, "load", lambda *args, **kwargs: loads.append(args) or real(*args, **kwargs))
    with pytest.raises(ConfigError, match=r"TorchScript export, a program .* pass trust_code=True \(dfkd eval"):
        dfkd.load_student(out)
    assert loads == []
    student = dfkd.load_student(out, trust_code=True)
    assert isinstance(student, torch.jit.ScriptModule) and len(loads) == 1
    card = student.card
    assert card["selected_by"].startswith("last: the weights of the final epoch (2)") and "warning" not in card
    assert card["accuracy"]["epoch"] == 2 and "normalisation is inside" in card["input"]
    assert torch.allclose(student(images), run_student(run_dir, "last")(images), atol=1e-5)


def test_onnx_export_takes_any_batch_of_01_images(capsys, run_dir, images, tmp_path):
    onnx = pytest.importorskip("onnx", reason="the onnx package is not installed (pip install 'dfkd[onnx]')")
    from onnx.reference import ReferenceEvaluator

    out = tmp_path / "onnx"
    code, _, err = run(capsys, "export", run_dir, "--format", "onnx", "--out", out)
    assert code == 0, err
    model_path = out / "student.onnx"
    onnx.checker.check_model(str(model_path))
    evaluator = ReferenceEvaluator(str(model_path))
    expected = run_student(run_dir, "last")(images)  # the default of a run whose best.pt the test set chose
    for batch in (1, 5):
        (logits,) = evaluator.run(None, {"images": images[:batch].numpy()})
        assert torch.allclose(torch.from_numpy(logits), expected[:batch], atol=1e-4)
    with pytest.raises(DfkdError, match="ONNX export: run it with onnxruntime"):
        dfkd.load_student(out)


def test_onnx_without_the_onnx_package_names_the_extra(capsys, run_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx", None)  # `import onnx` now raises ImportError
    code, _, err = run(capsys, "export", run_dir, "--format", "onnx", "--out", tmp_path / "o")
    assert_one_line_error(code, err, "--format onnx needs the onnx package: pip install 'dfkd[onnx]'")
    assert not (tmp_path / "o").exists()


def test_a_changed_weights_file_is_refused(run_dir, tmp_path):
    out = tmp_path / "e"
    dfkd.export_student(run_dir, out=out)
    weights = out / "student.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="does not match its card"):
        dfkd.load_student(out)


def test_the_sha256_covers_a_weights_file_larger_than_one_read(tmp_path):
    # sha256_file reads in blocks of 1 MiB; a bigger student is hashed whole, its last byte included
    path = tmp_path / "student.safetensors"
    data = bytearray(bytes(range(256)) * (10 * 1024 + 1))  # 2.5 MiB and a bit
    path.write_bytes(data)
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()
    data[-1] ^= 0xFF
    path.write_bytes(data)
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()


def test_an_export_is_replaced_only_with_overwrite(capsys, run_dir, tmp_path):
    out = tmp_path / "e"
    dfkd.export_student(run_dir, out=out)
    before = (out / "card.json").read_text()
    code, _, err = run(capsys, "export", run_dir, "--format", "torchscript", "--out", out)
    assert_one_line_error(code, err, "already holds an export (card.json, student.safetensors): pass --overwrite")
    assert (out / "card.json").read_text() == before
    code, _, err = run(capsys, "export", run_dir, "--format", "torchscript", "--out", out, "--overwrite")
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["card.json", "student.torchscript.pt"]


def test_bad_run_dirs_are_one_line_errors(capsys, tmp_path):
    code, _, err = run(capsys, "export", tmp_path)
    assert_one_line_error(code, err, "holds no ckpt/last.pt")
    with pytest.raises(SystemExit) as exit_info:
        main(["export", str(tmp_path), "--format", "pickle"])
    assert exit_info.value.code == 2 and "invalid choice: 'pickle'" in capsys.readouterr().err


def test_eval_reads_an_export(capsys, run_dir, data_root, tmp_path):
    out = tmp_path / "e"
    card = dfkd.export_student(run_dir, which="last", out=out)
    code, stdout, err = run(capsys, "eval", "--weights", out, f"data.root={data_root}")
    assert code == 0, err
    # the card's number is the last epoch's top-1 on the same test set
    assert f"lenet5_half on fashion-mnist-32 (256 test images): top-1 {card['accuracy']['top1']:.2f}%" in stdout
    assert "not a fresh score" not in stdout
    code, _, err = run(capsys, "eval", "--weights", out / "card.json", "--arch", "wrn16_1", f"data.root={data_root}")
    assert_one_line_error(code, err, "holds a lenet5_half, not wrn16_1")


def test_eval_of_a_torchscript_export_needs_trust(capsys, run_dir, data_root, tmp_path):
    out = tmp_path / "ts"
    card = dfkd.export_student(run_dir, format="torchscript", which="last", out=out)
    code, _, err = run(capsys, "eval", "--weights", out, f"data.root={data_root}")
    assert_one_line_error(code, err, "is a TorchScript export, a program that runs when loaded")
    assert "(dfkd eval --trust-code)" in err
    code, stdout, err = run(capsys, "eval", "--weights", out, f"data.root={data_root}", "--trust-code")
    assert code == 0, err
    assert f"top-1 {card['accuracy']['top1']:.2f}%" in stdout


def _copy_run(run_dir, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("export*"))
    return copy


def test_selected_by_follows_the_evaluation_split(run_dir, tmp_path):
    copy = _copy_run(run_dir, tmp_path)
    summary = json.loads((copy / "summary.json").read_text())
    (copy / "summary.json").write_text(json.dumps({**summary, "eval_split": "val"}))
    card = dfkd.export_student(copy, out=tmp_path / "val")
    assert "validation slice" in card["selected_by"] and "warning" not in card
    assert card["accuracy"]["split"] == "val"
    picked = "best eval/agreement: the student's agreement with the teacher on 256 held-out synthetic images"
    heldout = {**summary, "eval_split": "synthetic-heldout", "selected_by": picked}
    (copy / "summary.json").write_text(json.dumps(heldout))
    card = dfkd.export_student(copy, out=tmp_path / "heldout")
    assert card["selected_by"].startswith(f"{picked} (epoch ")
    assert card["accuracy"]["split"] == "synthetic-heldout"


def test_a_run_without_a_registered_dataset_describes_its_data_in_config(capsys, run_dir, tmp_path):
    copy = _copy_run(run_dir, tmp_path)
    config = yaml.safe_load((copy / "config.yaml").read_text())
    config["data"] = {"name": "none"}
    (copy / "config.yaml").write_text(yaml.safe_dump(config))
    # the checkpoint records the facts the run resolved: they describe the student
    card = dfkd.export_student(copy, out=tmp_path / "recorded")
    assert (card["dataset"], card["input_shape"], card["num_classes"]) == ("none", [1, 32, 32], 10)
    # a checkpoint without them (older dfkd) leaves them to the config, which must then state them
    for name in ("best.pt", "last.pt"):
        ckpt = torch.load(copy / "ckpt" / name, weights_only=True)
        for key in ("image_shape", "mean", "std", "classes"):
            ckpt.pop(key, None)
        torch.save(ckpt, copy / "ckpt" / name)
    with pytest.raises(
        ConfigError, match="data.name=none is not a registered dataset .* no data.image_shape, data.mean"
    ):
        dfkd.export_student(copy)
    assert not (copy / "export").exists()
    names = [f"c{i}" for i in range(10)]
    given = {"num_classes": 10, "image_shape": [1, 32, 32], "mean": [0.5], "std": [0.25], "class_names": names}
    config["data"] = {"name": "none", **given}
    (copy / "config.yaml").write_text(yaml.safe_dump(config))
    card = dfkd.export_student(copy)
    assert (card["dataset"], card["class_names"], card["mean"], card["std"]) == ("none", names, [0.5], [0.25])
    student = dfkd.load_student(card["path"])
    x = torch.rand(2, 1, 32, 32)
    assert torch.allclose(student(x), student.net((x - 0.5) / 0.25))
    code, _, err = run(capsys, "eval", "--weights", copy / "export")
    assert_one_line_error(code, err, "distilled without data (data.name=none)")


def test_the_default_checkpoint_is_the_last_unless_best_was_chosen_off_the_test_set(run_dir, tmp_path):
    copy = _copy_run(run_dir, tmp_path)
    card = dfkd.export_student(copy, out=tmp_path / "test")
    assert card["checkpoint"] == "last" and card["export"]["which"] == "last" and "warning" not in card
    assert card["accuracy"]["epoch"] == 2 and card["selected_by"].startswith("last: the weights of the final epoch")
    assert "best.pt was chosen on the test set" in card["selected_by"]
    summary = json.loads((copy / "summary.json").read_text())
    for split in ("val", "synthetic-heldout"):
        (copy / "summary.json").write_text(json.dumps({**summary, "eval_split": split}))
        card = dfkd.export_student(copy, out=tmp_path / split)
        assert card["checkpoint"] == "best" and card["accuracy"]["epoch"] == summary["best_epoch"]


@pytest.mark.parametrize("status", ["collapsed", "diverged"])
def test_a_failed_run_is_exported_only_with_force(capsys, caplog, run_dir, data_root, tmp_path, status):
    copy = _copy_run(run_dir, tmp_path)
    summary = json.loads((copy / "summary.json").read_text())
    reason = "the student predicts one class for 100.0% of the images (at epoch 2)"
    (copy / "summary.json").write_text(json.dumps({**summary, "status": status, "status_reason": reason}))
    code, _, err = run(capsys, "export", copy)
    assert_one_line_error(code, err, f"{copy} is a {status} run ({reason}): its student is not a result; pass --force")
    assert not (copy / "export").exists()
    code, out, err = run(capsys, "export", copy, "--force")
    assert code == 0, err
    card = json.loads((copy / "export" / "card.json").read_text())
    assert (card["run_status"], card["run_status_reason"]) == (status, reason)
    assert f"note: the run {status}" in out
    caplog.clear()
    with caplog.at_level("WARNING", logger="dfkd"):
        dfkd.load_student(copy / "export")
    assert f"the student of a {status} run" in caplog.text
    code, out, err = run(capsys, "eval", "--weights", copy / "export", f"data.root={data_root}")
    assert code == 0 and f"the student of a {status} run" in err and f"(exported from a {status} run" in out
