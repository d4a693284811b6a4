"""Runs without a registered dataset: data.name=none (scored on held-out synthetic images) and data.name=folder."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import interrupted_after, save_png
from helpers import run_cli as run
from torch import nn

import dfkd
from dfkd.config import DataConfig, build, load_config
from dfkd.data import dataset_info
from dfkd.data.datafree import load_image_folder, resolve_dataset_info
from dfkd.errors import ConfigError, DataError
from dfkd.methods.heldout import synthesize_heldout
from dfkd.models import Normalized, create_model
from dfkd.models.meta import TeacherMeta, attach_meta

SHAPE = [3, 16, 16]
FACTS = ["data.num_classes=4", "data.image_shape=[3,16,16]", "data.mean=[0.5]", "data.std=[0.25]"]
TINY = [
    "method.name=dfad",
    "method.nz=16",
    "method.ngf=4",
    "student.arch=tiny_cnn",
    "train.epochs=2",
    "train.rounds_per_epoch=1",
    "train.kd_steps=1",
    "train.batch_size=8",
    "eval.window_start=0",
    "data.heldout_size=24",
    "data.heldout_steps=3",
    "engine.progress=false",
    "engine.device=cpu",
]


def data_cfg(**values) -> DataConfig:
    return build(DataConfig, {"name": "none", **values}, "data")


def tiny_teacher(num_classes: int = 4) -> nn.Module:
    """tiny_cnn with random weights and non-trivial BN running statistics."""
    torch.manual_seed(7)
    net = create_model("tiny_cnn", num_classes, 3)
    with torch.no_grad():
        for _ in range(3):
            net(torch.rand(16, 3, 16, 16) * 4 - 2)
    return net.eval()


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("teacher") / "tiny.pt"
    torch.save({"state_dict": tiny_teacher().state_dict(), "arch": "tiny_cnn"}, path)
    return path


def rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------------------------------------------------------
# resolve_dataset_info


def test_facts_from_the_config_alone():
    info = resolve_dataset_info(data_cfg(num_classes=4, image_shape=SHAPE, mean=[0.5], std=[0.2, 0.3, 0.4]))
    assert (info.name, info.num_classes, info.image_shape) == ("none", 4, (3, 16, 16))
    assert info.mean == (0.5, 0.5, 0.5) and info.std == (0.2, 0.3, 0.4)  # one value stands for every channel
    assert info.classes == ("0", "1", "2", "3")


def test_facts_from_the_teacher_alone_and_the_config_wins_on_normalisation_and_size():
    meta = TeacherMeta((0.4, 0.4, 0.4), (0.2, 0.2, 0.2), (3, 32, 32), 3, ("cat", "dog", "owl"), "py:x")
    info = resolve_dataset_info(data_cfg(), meta)
    assert (info.num_classes, info.image_shape, info.mean, info.classes) == (
        3,
        (3, 32, 32),
        (0.4, 0.4, 0.4),
        ("cat", "dog", "owl"),
    )
    info = resolve_dataset_info(data_cfg(image_shape=SHAPE, mean=[0.5], num_classes=3), meta)
    assert info.image_shape == (3, 16, 16) and info.mean == (0.5,) * 3 and info.std == (0.2,) * 3


@pytest.mark.parametrize(
    "values, fragment",
    [
        ({"num_classes": 5}, "data.num_classes=5 but the teacher (py:x) says 3"),
        ({"class_names": ["cat", "dog", "emu"]}, "data.class_names="),
        ({"image_shape": [1, 32, 32]}, "data.image_shape has 1 channels but the teacher (py:x) takes 3"),
        ({"mean": [0.1, 0.2]}, "data.mean has 2 values for images of 3 channels"),
        ({"std": [0.0]}, "every value must be positive"),
    ],
)
def test_config_and_teacher_that_disagree(values, fragment):
    meta = TeacherMeta((0.4,) * 3, (0.2,) * 3, (3, 32, 32), 3, ("cat", "dog", "owl"), "py:x")
    with pytest.raises(ConfigError, match="^" + "[^\n]*" + fragment.replace("(", r"\(").replace(")", r"\)")):
        resolve_dataset_info(data_cfg(**values), meta)


def test_one_class_name_per_class():
    with pytest.raises(ConfigError, match=r"^2 class names \(data.class_names or the teacher's\) for 3 classes"):
        resolve_dataset_info(data_cfg(class_names=["a", "b"]), TeacherMeta(num_classes=3))


def test_missing_facts_name_the_keys_to_set():
    with pytest.raises(ConfigError) as err:
        resolve_dataset_info(data_cfg(), TeacherMeta())
    message = str(err.value)
    assert "\n" not in message and message.startswith("data.name=none needs data.num_classes")
    assert all(key in message for key in ("data.image_shape", "data.mean", "data.std"))
    with pytest.raises(ConfigError) as err:  # only what neither the config nor the teacher states
        resolve_dataset_info(data_cfg(image_shape=SHAPE, mean=[0.5]), TeacherMeta(num_classes=4))
    assert str(err.value).startswith("data.name=none needs data.std: set them")


def test_a_registered_dataset_is_its_registry_entry():
    assert resolve_dataset_info(build(DataConfig, {"name": "cifar10"}, "data")) == dataset_info("cifar10")


# ---------------------------------------------------------------------------------------------------------------------
# the held-out synthetic set


def wrapped(net: nn.Module) -> nn.Module:
    return Normalized(net, (0.5,) * 3, (0.25,) * 3).eval().requires_grad_(False)


def test_heldout_set_is_a_pure_function_of_its_seed_and_leaves_the_run_rng_alone():
    teacher = wrapped(tiny_teacher())
    info = resolve_dataset_info(data_cfg(num_classes=4, image_shape=SHAPE, mean=[0.5], std=[0.25]))
    torch.manual_seed(0)
    before = torch.get_rng_state()
    a = synthesize_heldout(teacher, info, 10, seed=3, steps=2, device="cpu")
    assert torch.equal(torch.get_rng_state(), before)  # the run's stream is untouched
    b = synthesize_heldout(teacher, info, 10, seed=3, steps=2, device="cpu")
    c = synthesize_heldout(teacher, info, 10, seed=4, steps=2, device="cpu")
    assert a.dtype == torch.uint8 and a.shape == (10, 3, 16, 16)
    assert torch.equal(a, b) and not torch.equal(a, c)
    # the training stream under the run's seed draws other images
    assert not torch.equal(a, (torch.rand(10, 3, 16, 16) * 255).round().to(torch.uint8))
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training
    assert not teacher.net.features[1]._forward_hooks  # its BN hooks are gone


def test_heldout_optimisation_moves_the_images_toward_their_classes():
    teacher = wrapped(tiny_teacher())
    info = resolve_dataset_info(data_cfg(num_classes=4, image_shape=SHAPE, mean=[0.5], std=[0.25]))
    targets = torch.arange(16) % 4
    noise = synthesize_heldout(teacher, info, 16, seed=1, steps=0, device="cpu")
    shaped = synthesize_heldout(teacher, info, 16, seed=1, steps=8, device="cpu")
    with torch.no_grad():
        ce = [nn.functional.cross_entropy(teacher(x.float() / 255), targets).item() for x in (noise, shaped)]
    assert ce[1] < ce[0]


def test_heldout_set_for_a_teacher_without_batchnorm():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 4))
    info = resolve_dataset_info(data_cfg(num_classes=4, image_shape=SHAPE, mean=[0.5], std=[0.25]))
    teacher = wrapped(net)
    noise = synthesize_heldout(teacher, info, 8, seed=0, steps=0, device="cpu")
    shaped = synthesize_heldout(teacher, info, 8, seed=0, steps=8, device="cpu")
    assert shaped.shape == (8, 3, 16, 16) and not torch.equal(noise, shaped)
    # without BN statistics to match, the class term alone moves the images toward their classes
    targets = torch.arange(8) % 4
    with torch.no_grad():
        ce = [nn.functional.cross_entropy(teacher(x.float() / 255), targets).item() for x in (noise, shaped)]
    assert ce[1] < ce[0]


# ---------------------------------------------------------------------------------------------------------------------
# image folders


def folder_info(root, **values):
    return resolve_dataset_info(build(DataConfig, {"name": "folder", "root": str(root), **values}, "data"))


def test_folder_converts_channels_and_resizes(tmp_path):
    save_png(tmp_path / "b" / "0.png", np.full((20, 24, 3), (10, 200, 30)))
    save_png(tmp_path / "a" / "0.png", np.full((8, 8), 100))  # grayscale
    save_png(tmp_path / "a" / "1.png", np.full((16, 16, 3), 7))
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    info = folder_info(tmp_path, image_shape=SHAPE, mean=[0.5], std=[0.25])
    assert info.classes == ("a", "b") and info.num_classes == 2
    images, labels = load_image_folder(tmp_path, info)
    assert images.dtype == torch.uint8 and images.shape == (3, 3, 16, 16)
    assert labels.tolist() == [0, 0, 1]
    assert torch.all(images[0] == 100)  # grey to three equal channels, a flat image stays flat when resized
    assert images[2, :, 5, 5].tolist() == [10, 200, 30]
    grey = load_image_folder(tmp_path, folder_info(tmp_path, image_shape=[1, 4, 4], mean=[0.5], std=[0.25]))[0]
    assert grey.shape == (3, 1, 4, 4) and int(grey[0].max()) == 100


def test_folders_are_matched_to_known_class_names(tmp_path):
    for name in ("owl", "cat"):
        save_png(tmp_path / name / "x.png", np.zeros((4, 4, 3)))
    info = folder_info(tmp_path, image_shape=[3, 4, 4], mean=[0.5], std=[0.25], class_names=["dog", "owl", "cat"])
    _, labels = load_image_folder(tmp_path, info)
    assert labels.tolist() == [2, 1]  # cat, owl in folder order
    save_png(tmp_path / "0" / "x.png", np.zeros((4, 4, 3)))  # a class by its index
    assert load_image_folder(tmp_path, info)[1].tolist() == [0, 2, 1]
    save_png(tmp_path / "emu" / "x.png", np.zeros((4, 4, 3)))
    with pytest.raises(DataError, match="folder 'emu' names no class of the teacher"):
        load_image_folder(tmp_path, info)


def test_folders_named_by_index_are_labelled_by_their_number(tmp_path):
    # sorted as text, "10" comes third: the labels must be the numbers, not the folders' order
    for k in range(12):
        save_png(tmp_path / str(k) / "x.png", np.full((4, 4, 3), k))
    facts = {"image_shape": [3, 4, 4], "mean": [0.5], "std": [0.25]}
    for info in (folder_info(tmp_path, **facts), folder_info(tmp_path, num_classes=12, **facts)):
        assert info.classes == tuple(str(k) for k in range(12))
        images, labels = load_image_folder(tmp_path, info)
        assert labels.tolist() == images[:, 0, 0, 0].tolist()  # each image's pixel value is its folder's number
    # a test set with some of a 20-class teacher's classes: each folder still names its class
    info = folder_info(tmp_path, num_classes=20, **facts)
    assert info.num_classes == 20 and sorted(set(load_image_folder(tmp_path, info)[1].tolist())) == list(range(12))
    with pytest.raises(DataError, match="folder '11' names no class of the teacher"):
        load_image_folder(tmp_path, folder_info(tmp_path, num_classes=11, **facts))


def test_folder_errors(tmp_path):
    facts = {"image_shape": [3, 4, 4], "mean": [0.5], "std": [0.25]}
    with pytest.raises(ConfigError, match="data.name=folder needs data.root=DIR"):
        resolve_dataset_info(build(DataConfig, {"name": "folder", **facts}, "data"))
    with pytest.raises(DataError, match="not a directory"):
        folder_info(tmp_path / "missing", **facts)
    with pytest.raises(DataError, match="no class folders"):
        folder_info(tmp_path, **facts)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with pytest.raises(ConfigError, match="has 2 class folders but the teacher has 3 classes"):
        folder_info(tmp_path, num_classes=3, **facts)
    info = folder_info(tmp_path, **facts)
    with pytest.raises(DataError, match="no images"):
        load_image_folder(tmp_path, info)
    (tmp_path / "b" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="broken.png: cannot read the image"):
        load_image_folder(tmp_path, info)


# ---------------------------------------------------------------------------------------------------------------------
# end to end


def none_args(teacher_file, out, *extra):
    return ["distill", "teacher.arch=tiny_cnn", f"teacher.weights={teacher_file}", "data.name=none", f"out={out}",
            *FACTS, *TINY, *extra]  # fmt: skip


def test_data_free_run_end_to_end_and_resume(capsys, teacher_file, tmp_path):
    full = tmp_path / "full"
    code, out, err = run(capsys, *none_args(teacher_file, full))
    assert code == 0, err
    assert "agreement with the teacher on held-out synthetic images" in out and "top-1" not in out
    summary = json.loads((full / "summary.json").read_text())
    assert summary["eval_split"] == "synthetic-heldout" and summary["curve_metric"] == "eval/agreement"
    assert "24 held-out synthetic images" in summary["selected_by"]
    assert summary["teacher_top1"] is None and summary["student_top1_best"] is None
    assert summary["agreement_best"] == max(r["eval/agreement"] for r in rows(full))
    assert summary["mu"] == pytest.approx(sum(r["eval/agreement"] for r in rows(full)) / 2)
    for row in rows(full):
        assert "eval/top1" not in row and {"eval/agreement", "eval/prob_loyalty"} <= set(row)
    best = torch.load(full / "ckpt" / "best.pt", weights_only=True)
    assert best["top1"] is None and best["epoch"] == summary["best_epoch"]
    assert best["image_shape"] == SHAPE and best["mean"] == [0.5] * 3

    cut = tmp_path / "cut"
    with interrupted_after(1):
        assert run(capsys, *none_args(teacher_file, cut))[0] == 130
    # interrupted: no summary.json yet, and its export still says how its best epoch was chosen
    card = dfkd.export_student(cut, out=tmp_path / "cut-export")
    assert card["run_status"] == "unfinished (no summary.json)" and card["checkpoint"] == "best"
    assert card["accuracy"]["split"] == "synthetic-heldout" and "held-out synthetic images" in card["selected_by"]
    assert "on the test set" not in card["selected_by"] and "warning" not in card
    code, _, err = run(capsys, "distill", "--resume", cut)
    assert code == 0, err
    strip = [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows(cut)]
    assert strip == [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows(full)]

    code, _, err = run(capsys, "eval", "--weights", full)
    assert code == 2 and "distilled without data (data.name=none)" in err and "Traceback" not in err


def test_heldout_set_never_enters_training(capsys, teacher_file, tmp_path):
    # another held-out set (seed and steps): every training loss is the same, only the evaluation differs
    a, b = tmp_path / "a", tmp_path / "b"
    assert run(capsys, *none_args(teacher_file, a, "train.epochs=1"))[0] == 0
    other = ("train.epochs=1", "data.heldout_seed=99", "data.heldout_steps=0")
    assert run(capsys, *none_args(teacher_file, b, *other))[0] == 0
    train = [[{k: v for k, v in r.items() if k.startswith(("train/", "synth/"))} for r in rows(d)] for d in (a, b)]
    assert train[0] == train[1]
    assert [r["eval/prob_loyalty"] for r in rows(a)] != [r["eval/prob_loyalty"] for r in rows(b)]


def test_missing_facts_through_the_cli(capsys, teacher_file, tmp_path):
    args = [a for a in none_args(teacher_file, tmp_path / "o") if not a.startswith("data.num_classes")]
    code, _, err = run(capsys, *args, "teacher.arch=lenet5")
    assert code == 2 and "teacher.arch=lenet5 is built from data.num_classes" in err
    code, _, err = run(capsys, *none_args(teacher_file, tmp_path / "o"), "eval.split=val")
    assert code == 2 and "drop eval.split=val" in err


def test_teacher_metadata_fills_the_data_config(tmp_path):
    meta = TeacherMeta((0.5,) * 3, (0.25,) * 3, (3, 16, 16), 4, ("a", "b", "c", "d"), "py:tests")
    teacher = attach_meta(tiny_teacher(), meta)
    cfg = load_config("distill", None, ["data.name=none", f"out={tmp_path / 'm'}", *TINY])
    summary = dfkd.distill(cfg, teacher=teacher)
    assert summary["eval_split"] == "synthetic-heldout" and summary["status"] == "ok"
    assert torch.load(tmp_path / "m" / "ckpt" / "last.pt", weights_only=True)["classes"] == ["a", "b", "c", "d"]


def test_folder_run_and_eval(capsys, teacher_file, tmp_path):
    rng = np.random.default_rng(0)
    for name in ("a", "b", "c", "d"):
        for i in range(2):
            save_png(tmp_path / "test" / name / f"{i}.png", rng.integers(0, 255, (20, 20, 3)))
    folder = tmp_path / "test"
    out = tmp_path / "f"
    args = ["distill", "teacher.arch=tiny_cnn", f"teacher.weights={teacher_file}", "data.name=folder",
            f"data.root={folder}", "data.image_shape=[3,16,16]", "data.mean=[0.5]", "data.std=[0.25]", f"out={out}",
            *TINY]  # fmt: skip
    code, stdout, err = run(capsys, *args)
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["eval_split"] == "test" and summary["selected_by"] == f"best eval/top1 on the image folder {folder}"
    assert all("eval/top1" in r for r in rows(out)) and (out / "ckpt" / "best.pt").is_file()
    code, stdout, err = run(capsys, "eval", "--weights", out, "data.name=folder", f"data.root={folder}")
    assert code == 0, err
    assert f"top-1 {summary['student_top1_last']:.2f}%" in stdout and "(8 test images)" in stdout
    # its export is scored on the folder the same way: the card says data.name=folder, data.root says where
    assert run(capsys, "export", out, "--which", "last")[0] == 0
    code, stdout, err = run(capsys, "eval", "--weights", out / "export", f"data.root={folder}")
    assert code == 0, err
    assert f"top-1 {summary['student_top1_last']:.2f}%" in stdout and "(8 test images)" in stdout
    code, _, err = run(capsys, "eval", "--weights", out / "export")
    assert code == 2 and "data.name=folder needs data.root=DIR" in err


def test_a_run_without_data_exports_and_plots(capsys, teacher_file, tmp_path):
    pytest.importorskip("sklearn")
    out = tmp_path / "none"
    assert run(capsys, *none_args(teacher_file, out, "train.epochs=1"))[0] == 0
    code, _, err = run(capsys, "export", out)
    assert code == 0, err
    student = dfkd.load_student(out / "export")
    card = student.card
    assert (card["input_shape"], card["num_classes"], card["accuracy"]["split"]) == (SHAPE, 4, "synthetic-heldout")
    assert "held-out synthetic images" in card["selected_by"] and "top1" not in card["accuracy"]
    # the exported student is the run's best student: the same logits as its checkpoint's weights
    run_student = wrapped(create_model("tiny_cnn", 4, 3))
    run_student.net.load_state_dict(torch.load(out / "ckpt" / "best.pt", weights_only=True)["state_dict"])
    x = torch.rand(3, *SHAPE)
    with torch.no_grad():
        assert torch.allclose(student(x), run_student(x), atol=1e-6)
    code, stdout, err = run(capsys, "plot", out, "--synthetic", "12")
    assert code == 0, err
    numbers = json.loads((out / "plots" / "plot.json").read_text())
    assert numbers["real_images"] == 0 and sum(numbers["class_counts"]) == 12 and len(numbers["class_counts"]) == 4
    assert "data.name=none" in stdout
