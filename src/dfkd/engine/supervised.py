"""Supervised training on real data: teachers, and the "student trained on real data" reference."""

from __future__ import annotations

import logging
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from dfkd.config import TeacherTrainConfig, to_dict, to_yaml
from dfkd.data import DATASETS, TensorLoader, build_augment, dataset_info, source_dataset
from dfkd.data.datafree import is_data_free
from dfkd.engine.common import build_model, default_out, load_split_on_device, progress_bar
from dfkd.engine.env import Env, setup_env
from dfkd.engine.evaluate import predict
from dfkd.engine.meters import Meters, first_non_finite, format_seconds
from dfkd.engine.optim import build_optimizer, build_scheduler
from dfkd.engine.rundir import RunDir
from dfkd.engine.seed import gather_rng_states, restore_rng_states, seed_everything
from dfkd.engine.tblog import TensorBoardLog
from dfkd.errors import ConfigError, DivergedError
from dfkd.images import plot_curves, save_grid
from dfkd.metrics import top1_percent
from dfkd.models.loading import resolve_weights

log = logging.getLogger("dfkd")

CHECKPOINT_FORMAT = "dfkd-supervised/1"


def train_teacher(
    cfg: TeacherTrainConfig, model: nn.Module | None = None, resume: bool = False, overwrite: bool = False
) -> dict:
    """Train ``model.arch`` (or the given module) on the real training set with cross-entropy; returns the summary.

    The final weights (``RUN/ckpt/last.pt``, key ``state_dict``) load as a teacher with ``teacher.weights=RUN``.
    """
    env = setup_env(
        cfg.engine.device, cfg.engine.precision, cfg.engine.channels_last, cfg.engine.threads, cfg.engine.compile
    )
    run = RunDir(cfg.out or default_out("train", f"{cfg.model.arch}-{cfg.data.name}"), env.is_main)
    run.check(resume=resume, overwrite=overwrite)
    env.barrier()  # every rank checks before rank 0 writes anything
    try:
        with TensorBoardLog(cfg.log.tensorboard, env.is_main) as tb:
            return _train(cfg, env, run, model, resume, overwrite, tb)
    finally:
        run.close()
        env.teardown()


def _train(
    cfg: TeacherTrainConfig, env: Env, run: RunDir, module, resume: bool, overwrite: bool, tb: TensorBoardLog
) -> dict:
    started = time.perf_counter()
    seed_everything(cfg.engine.seed, env.rank)
    info = dataset_info(cfg.data.name)
    train_x, train_y = load_split_on_device(info, "train", cfg.data.root, env, cfg.data.val_size)
    test_x, test_y = load_split_on_device(info, cfg.eval.split, cfg.data.root, env, cfg.data.val_size)
    model = build_model(module or cfg.model.arch, info, env, cfg.model.weights, "model", cfg.trust_code)
    model_ddp = DistributedDataParallel(model) if env.distributed else model
    t = cfg.train
    optimizer = build_optimizer(model.parameters(), t)
    scheduler = build_scheduler(optimizer, t, t.epochs)
    augment = build_augment(t.augment, padding=t.padding)
    loader = TensorLoader(
        train_x,
        train_y,
        t.batch_size,
        shuffle=True,
        drop_last=True,
        augment=augment,
        rank=env.rank,
        world_size=env.world_size,
    )
    if len(loader) == 0:
        raise ConfigError(f"train.batch_size={t.batch_size} is larger than the training set ({loader.num_samples})")

    run.prepare(resume=resume, overwrite=overwrite)
    epoch0, history, best, timers = 0, [], (-1.0, 0), {"train_seconds": 0.0, "eval_seconds": 0.0, "total_seconds": 0.0}
    if resume:
        ckpt = run.load_checkpoint("last")
        if ckpt.get("format") != CHECKPOINT_FORMAT:
            raise ConfigError(f"{run.last} is not a train-teacher checkpoint: resume it with the command that wrote it")
        model.net.load_state_dict(ckpt["state_dict"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        restore_rng_states(ckpt["rng"], env, cfg.engine.seed, int(ckpt["epoch"]), run.last)
        epoch0, history = int(ckpt["epoch"]), list(ckpt["history"])
        best, timers = (float(ckpt["best_top1"]), int(ckpt["best_epoch"])), dict(ckpt["timers"])
    run.write_text("config.yaml", to_yaml(cfg))
    run.write_metrics(history)
    tb.open(run.path / "tensorboard", history)
    log.info(
        "training %s on %s (%d images) for %d epochs | device %s | run dir %s",
        cfg.model.arch if module is None else type(module).__name__,
        info.name,
        loader.num_samples,
        t.epochs,
        env.describe(),
        run.path,
    )
    bar = progress_bar(t.epochs * len(loader), epoch0 * len(loader), cfg.engine.progress and env.is_main, "train")
    env.reset_peak_memory()
    loop_started = time.perf_counter()
    for epoch in range(epoch0, t.epochs):
        tick = time.perf_counter()
        model_ddp.train()
        meters = Meters()
        for x, y in loader:
            x = env.images(x)
            with env.autocast():
                logits = model_ddp(x)
            loss = F.cross_entropy(logits.float(), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if t.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
            optimizer.step()
            meters.update({"loss": loss, "top1": (logits.argmax(1) == y).float().mean() * 100}, "train/")
            bar.update(1)
        if epoch == epoch0 and env.is_main:
            save_grid(run.path / "samples" / "train_batch.png", x[:64].float())
            tb.log_images("train_batch", x[:64].float(), epoch + 1)
        losses = meters.means()
        if (bad := first_non_finite(losses)) is not None:
            raise DivergedError(
                f"training diverged: {bad} became {losses[bad]} in epoch {epoch + 1}; the last good checkpoint is "
                f"{run.last if history else 'none'}; lower train.lr and resume with --resume"
            )
        scheduler.step()
        env.synchronize()
        timers["train_seconds"] += time.perf_counter() - tick
        tock = time.perf_counter()
        top1 = top1_percent(predict(model, test_x, cfg.eval.batch_size, env.channels_last), test_y)
        timers["eval_seconds"] += time.perf_counter() - tock
        timers["total_seconds"] += time.perf_counter() - tick
        row = {"epoch": epoch + 1, "eval/top1": top1, **losses, "lr": optimizer.param_groups[0]["lr"]}
        row.update({f"time/{k}": v for k, v in timers.items()})
        history.append(row)
        tb.log_row(row)
        is_best = top1 > best[0]
        if is_best:
            best = (top1, epoch + 1)
        rng = gather_rng_states(env)
        run.save_checkpoint(
            {
                "format": CHECKPOINT_FORMAT,
                "state_dict": model.net.state_dict(),
                "arch": cfg.model.arch,
                "num_classes": int(info.num_classes),
                "in_channels": int(info.image_shape[0]),
                "dataset": info.name,
                "top1": top1,
                "epoch": epoch + 1,
                "best_top1": best[0],
                "best_epoch": best[1],
                "history": history,
                "timers": dict(timers),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "rng": rng,
                "config": to_dict(cfg),
            },
            is_best,
        )
        run.append_metrics(row)
        done = epoch + 1 - epoch0
        eta = (time.perf_counter() - loop_started) / done * (t.epochs - epoch - 1)
        log.info(
            "epoch %d/%d | test top-1 %.2f%% (best %.2f%%) | train loss %.4f | eta %s",
            epoch + 1,
            t.epochs,
            top1,
            best[0],
            losses["train/loss"],
            format_seconds(eta),
        )
    bar.close()
    timers["total_seconds"] += loop_started - started
    if env.is_main:
        plot_curves(
            run.path / "accuracy.png",
            {cfg.model.arch: [r["eval/top1"] for r in history]},
            title=f"{cfg.model.arch} on {info.name} (real data)",
        )
    summary = {
        "model": cfg.model.arch if module is None else type(module).__name__,
        "dataset": info.name,
        "eval_split": cfg.eval.split,
        "train_images": int(train_y.numel()),
        "top1_best": best[0],
        "best_epoch": best[1],
        "top1_last": history[-1]["eval/top1"] if history else None,
        "epochs": len(history),
        **timers,
        "peak_memory_bytes": env.peak_memory_bytes(),
        "device": env.describe(),
        "expected_top1": cfg.expected.top1,
        "weights": str(run.last),  # the final weights: what teacher.weights=RUN loads
        "run_dir": str(run.path),
    }
    run.write_summary(summary)
    log.info(
        "done: %s %s top-1 %.2f%% (best epoch %d); final weights (what teacher.weights=%s loads) in %s",
        cfg.model.arch,
        cfg.eval.split,
        *best,
        run.path,
        run.last,
    )
    return summary


def check_validation_slice(data_cfg, eval_split: str, teacher_weights: str | None) -> None:
    """eval.split=val chooses the best epoch on data.val_size images held out of the training split: images the
    teacher must never have trained on. A `dfkd train-teacher` checkpoint records the slice it held out and is checked
    (ConfigError when the run's slice reaches into the teacher's training images); any other teacher gets a warning
    that this could not be checked."""
    if eval_split != "val" or is_data_free(data_cfg.name):
        return
    name, size = data_cfg.name, data_cfg.val_size
    trained = _training_split(teacher_weights)
    if trained is None:
        log.warning(
            "eval.split=val: the teacher%s does not record which images it trained on; if they include %s's training "
            "split, the validation slice (data.val_size=%d) holds images it has seen, and the best epoch is chosen on "
            "them",
            f" {teacher_weights}" if teacher_weights else "",
            name,
            size,
        )
        return
    dataset, held_out = trained
    if source_dataset(dataset) != source_dataset(name) or held_out >= size:
        return  # other images, or the slice lies within the images the teacher held out (one permutation for all)
    if held_out == 0:
        raise ConfigError(
            f"eval.split=val: the teacher {teacher_weights} trained on the whole training split of {dataset} "
            f"(data.val_size=0), so the validation slice (data.val_size={size}) is made of its training images: "
            f"use eval.split=test, or a teacher trained with data.val_size={size}"
        )
    raise ConfigError(
        f"eval.split=val: the teacher {teacher_weights} held out {held_out} images of {dataset}'s training split "
        f"(its data.val_size) and trained on the rest, so a validation slice of data.val_size={size} holds "
        f"{size - held_out} of its training images: set data.val_size={held_out} or less, or eval.split=test"
    )


def _training_split(weights: str | None) -> tuple[str, int] | None:
    """``(dataset, data.val_size)`` of the images a `dfkd train-teacher` checkpoint trained on; None for any other
    file (a zoo or foreign checkpoint, a distilled student) and for no file."""
    if not weights:
        return None
    path = resolve_weights(weights)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # not a weights-only torch file: the teacher's loader says what is wrong with it
        return None
    config = ckpt.get("config") if isinstance(ckpt, dict) and ckpt.get("format") == CHECKPOINT_FORMAT else None
    data = config.get("data") if isinstance(config, dict) else None
    if not isinstance(data, dict) or data.get("name") not in DATASETS or not isinstance(data.get("val_size"), int):
        return None
    return data["name"], data["val_size"]
