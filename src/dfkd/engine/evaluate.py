"""Evaluation on the real test set, and `dfkd eval` of a checkpoint or an export."""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn

from dfkd.data import dataset_info, to_float
from dfkd.data.datafree import FOLDER, NO_DATA, checkpoint_meta, load_image_folder, resolve_dataset_info
from dfkd.engine.common import build_model, load_split_on_device
from dfkd.engine.env import setup_env
from dfkd.errors import ConfigError
from dfkd.metrics import agreement_percent, prob_loyalty, prob_loyalty_reference, top1_percent
from dfkd.models import read_weights
from dfkd.models.exported import find_card, load_student
from dfkd.models.loading import resolve_weights
from dfkd.models.meta import teacher_meta
from dfkd.models.sources import is_external_arch


@torch.inference_mode()
def predict(model: nn.Module, images_u8: Tensor, batch_size: int, channels_last: bool = False) -> Tensor:
    """Logits (float32) of ``model`` in eval mode on uint8 images, batched; the model's train mode is restored."""
    was_training = model.training
    model.eval()
    outputs = []
    for start in range(0, images_u8.shape[0], batch_size):
        x = to_float(images_u8[start : start + batch_size])
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        outputs.append(model(x).float())
    model.train(was_training)
    return torch.cat(outputs)


def student_metrics(student_logits: Tensor, labels: Tensor | None, teacher_logits: Tensor | None) -> dict[str, float]:
    """top1 (with labels), and with teacher logits: agreement, probability loyalty (corrected and reference forms)."""
    out = {} if labels is None else {"top1": top1_percent(student_logits, labels)}
    if teacher_logits is not None:
        out["agreement"] = agreement_percent(student_logits, teacher_logits)
        out["prob_loyalty"] = prob_loyalty(student_logits, teacher_logits)
        out["prob_loyalty_reference"] = prob_loyalty_reference(student_logits, teacher_logits)
    return out


def evaluate_weights(cfg) -> dict:
    """``dfkd eval``: top-1 of a checkpoint on the test set, and agreement with a teacher when one is given.

    The architecture and dataset default to those recorded in a dfkd checkpoint (``arch``, ``dataset``). An export
    of ``dfkd export`` (its folder or card) is evaluated as its card describes it: architecture, mean/std, dataset.
    With ``data.name=folder`` the test set is the image folder in ``data.root``, its classes, image shape and
    normalisation those the checkpoint or the export's card records (or the ``data`` config gives).
    """
    if not cfg.model.weights:
        raise ConfigError("no weights to evaluate: pass --weights CKPT (or model.weights=CKPT)")
    card_path = find_card(cfg.model.weights)
    if card_path is not None:
        return _evaluate_export(cfg, card_path)
    path = resolve_weights(cfg.model.weights)
    _, meta = read_weights(str(path))
    arch = cfg.model.arch or meta.get("arch")
    data = cfg.data.name or meta.get("dataset")
    if not arch:
        raise ConfigError(f"{path} does not record its architecture: pass --arch NAME (`dfkd list models`)")
    if not data:
        raise ConfigError(f"{path} does not record its dataset: pass data.name=NAME (`dfkd list datasets`)")
    if data == NO_DATA:
        raise _no_test_set(str(path))
    env = setup_env(cfg.engine.device, "fp32", cfg.engine.channels_last, cfg.engine.threads, cfg.engine.compile)
    info = _test_info(cfg, data, checkpoint_meta(path))
    test_x, test_y = _load_test_set(cfg, info, env)
    model = build_model(arch, info, env, str(path), "model", cfg.trust_code)
    logits = predict(model, test_x, cfg.eval.batch_size, env.channels_last)
    result = {"weights": str(path), "arch": arch, "dataset": data, "images": int(test_y.numel())}
    return _with_teacher(cfg, result, logits, test_x, test_y, info, env)


def _evaluate_export(cfg, card_path) -> dict:
    model = load_student(card_path, trust_code=cfg.trust_code)
    card = model.card
    if cfg.model.arch and cfg.model.arch != card["architecture"]:
        raise ConfigError(f"the export {card_path} holds a {card['architecture']}, not {cfg.model.arch}: drop --arch")
    data = cfg.data.name or card["dataset"]
    if data == NO_DATA:
        raise _no_test_set(f"the export {card_path}")
    info = _test_info(cfg, data, teacher_meta(model))  # a folder's classes and shape: what the card states
    if list(info.image_shape) != list(card["input_shape"]) or info.num_classes != card["num_classes"]:
        raise ConfigError(
            f"the export takes {card['input_shape']} images and has {card['num_classes']} classes but {data} has "
            f"{list(info.image_shape)} and {info.num_classes}: pass data.name= a dataset it fits"
        )
    env = setup_env(cfg.engine.device, "fp32", cfg.engine.channels_last, cfg.engine.threads, cfg.engine.compile)
    model.to(env.device)
    test_x, test_y = _load_test_set(cfg, info, env)
    logits = predict(model, test_x, cfg.eval.batch_size)
    weights = card_path.parent / card["weights"]["file"]
    result = {
        "weights": str(weights),
        "arch": card["architecture"],
        "dataset": data,
        "images": int(test_y.numel()),
        "checkpoint": card["checkpoint"],
        "run_status": card.get("run_status"),
    }
    return _with_teacher(cfg, result, logits, test_x, test_y, info, env)


def _test_info(cfg, data: str, meta):
    """The facts of the test set: a registered dataset's, or with data.name=folder those the checkpoint or export
    states (``meta``, a :class:`~dfkd.models.meta.TeacherMeta`) with the ``data`` config and the class folders."""
    if data == FOLDER:
        return resolve_dataset_info(dataclasses.replace(cfg.data, name=FOLDER), meta)
    return dataset_info(data)


def _load_test_set(cfg, info, env) -> tuple[Tensor, Tensor]:
    """The test images and labels on the device: the image folder in data.root, or the dataset's test split."""
    if info.name == FOLDER:
        images, labels = load_image_folder(cfg.data.root, info)
        return images.to(env.device), labels.to(env.device)
    return load_split_on_device(info, "test", cfg.data.root, env)


def _no_test_set(what: str):
    return ConfigError(
        f"{what} was distilled without data (data.name=none): there is no test set to score it on; pass "
        "data.name=folder data.root=DIR (a folder of labelled images) or a registered dataset (data.name=NAME)"
    )


def _with_teacher(cfg, result: dict, logits: Tensor, test_x: Tensor, test_y: Tensor, info, env) -> dict:
    """``result`` plus the metrics of ``logits``, and with ``teacher.weights`` the agreement with that teacher."""
    teacher_logits = None
    if cfg.teacher.weights or is_external_arch(cfg.teacher.arch):
        t_path = resolve_weights(cfg.teacher.weights) if cfg.teacher.weights else None
        t_arch = cfg.teacher.arch or read_weights(str(t_path))[1].get("arch")
        if not t_arch:
            raise ConfigError(f"{t_path} does not record its architecture: pass teacher.arch=NAME")
        # a folder's facts are those the student's run recorded, the teacher's size and normalisation in that run
        data_wins = info.name == FOLDER
        t_weights = str(t_path) if t_path else None
        teacher = build_model(t_arch, info, env, t_weights, "teacher", cfg.trust_code, data_wins=data_wins)
        teacher_logits = predict(teacher, test_x, cfg.eval.batch_size, env.channels_last)
    result.update(student_metrics(logits, test_y, teacher_logits))
    if teacher_logits is not None:
        result["teacher_top1"] = student_metrics(teacher_logits, test_y, None)["top1"]
    return result
