"""The distillation loop: one loop for every method.

Per epoch: ``rounds_per_epoch`` x (``method.synthesize`` then ``kd_steps`` student steps on ``method.next_batch``
with ``method.student_loss``), then the learning-rate schedule, an evaluation on the real test set (with
``data.name=none``: agreement with the teacher on held-out synthetic images, see :mod:`dfkd.methods.heldout`), a
checkpoint and a line of metrics. Synthesis time and student time are accounted separately.

Launch under torchrun for data parallelism::

    torchrun --standalone --nproc_per_node=2 -m dfkd distill --config NAME engine.device=cpu
"""

from __future__ import annotations

import copy
import logging
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from dfkd.config import DistillConfig, to_dict, to_yaml
from dfkd.data import DatasetInfo, dataset_info
from dfkd.data.datafree import (
    NO_DATA,
    check_data_free_eval,
    checkpoint_meta,
    checkpoint_record,
    is_data_free,
    load_image_folder,
    resolve_dataset_info,
    zoo_sizes,
)
from dfkd.engine.common import (
    build_model,
    default_out,
    freeze,
    load_split_on_device,
    progress_bar,
    tensor_bytes,
)
from dfkd.engine.ema import StudentEMA
from dfkd.engine.env import Env, setup_env
from dfkd.engine.evaluate import predict, student_metrics
from dfkd.engine.flops import PARTS, arithmetic, flops_of, measure_peak, snapshot
from dfkd.engine.guard import CollapseGuard, collapse_reasons
from dfkd.engine.meters import Meters, Stopwatch, first_non_finite, format_seconds
from dfkd.engine.optim import build_optimizer, build_scheduler, warmup_factor
from dfkd.engine.rundir import RunDir
from dfkd.engine.seed import gather_rng_states, restore_rng_states, seed_everything
from dfkd.engine.supervised import check_validation_slice
from dfkd.engine.tblog import TensorBoardLog
from dfkd.errors import STATUS_DIVERGED, STATUS_OK, ConfigError, DivergedError
from dfkd.images import plot_curves, save_grid
from dfkd.methods import METHODS, Ctx, Method, Progress
from dfkd.methods.heldout import HELDOUT_SPLIT, digest, synthesize_heldout
from dfkd.metrics import accuracy_curve_stats, top1_percent
from dfkd.models import MODELS, build_network
from dfkd.models.loading import resolve_weights
from dfkd.models.meta import TeacherMeta, teacher_meta
from dfkd.models.sources import is_external_arch
from dfkd.sysinfo import cpu_model

log = logging.getLogger("dfkd")

CHECKPOINT_FORMAT = "dfkd-distill/1"


def distill(
    cfg: DistillConfig,
    teacher: nn.Module | None = None,
    student: nn.Module | None = None,
    resume: bool = False,
    overwrite: bool = False,
) -> dict:
    """Distill a teacher into a student without its training data; returns the run summary.

    Args:
        cfg: the resolved configuration (:func:`dfkd.load_config`).
        teacher: any ``nn.Module`` classifier taking normalised images (``data.name`` gives the normalisation);
            default: ``teacher.arch`` with ``teacher.weights``.
        student: an ``nn.Module`` to train; default: a fresh ``student.arch``.
        resume: continue the run in ``cfg.out`` from its last checkpoint.
        overwrite: replace a run already in ``cfg.out``.

    Example:
        >>> cfg = dfkd.load_config("distill", "fashion-mnist/cudfkd-lenet5_bn-lenet5_half",
        ...                        ["teacher.weights=runs/teacher", "train.epochs=2"])
        >>> summary = dfkd.distill(cfg)
    """
    env = setup_env(
        cfg.engine.device, cfg.engine.precision, cfg.engine.channels_last, cfg.engine.threads, cfg.engine.compile
    )
    run = RunDir(cfg.out or default_out("distill", f"{cfg.method.name}-{cfg.data.name}"), env.is_main)
    run.check(resume=resume, overwrite=overwrite)
    env.barrier()  # every rank checks before rank 0 writes anything
    cleanup = ExitStack()
    try:
        return _distill(cfg, env, run, teacher, student, resume, overwrite, cleanup)
    finally:
        cleanup.close()  # the method's hooks come off a caller's teacher even when the run fails
        run.close()
        env.teardown()


@dataclass
class _Parts:
    """What the set-up builds and the loop works with: the data the student is scored on, the two networks, the
    method, the student's optimiser and schedule, and the run's record keepers."""

    info: DatasetInfo
    test_x: torch.Tensor  # the test images, or held-out synthetic ones without data (data.name=none)
    test_y: torch.Tensor | None  # None without labels
    heldout_digest: str | None  # of the held-out synthetic images; None with a test set
    select: str  # the score that picks the best checkpoint: "top1" where there are labels, else "agreement"
    teacher: nn.Module
    teacher_name: str
    student: nn.Module
    student_name: str
    student_ddp: nn.Module  # the student the loss calls: wrapped for data parallelism under torchrun
    method: Method
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    ema: StudentEMA | None
    tb: TensorBoardLog
    guard: CollapseGuard
    teacher_logits: torch.Tensor | None = None  # the teacher's answers on test_x, once the run's folder is ready
    teacher_top1: float | None = None


@dataclass
class _Clock:
    """The run's wall time: this process's, plus that of the processes before a resume."""

    started: float  # time.perf_counter() when this process began the run
    earlier: float  # total_seconds of the processes before a resume

    def total(self) -> float:
        return self.earlier + time.perf_counter() - self.started


def _distill(
    cfg, env: Env, run: RunDir, teacher_module, student_module, resume: bool, overwrite: bool, cleanup: ExitStack
) -> dict:
    """Set up, then per epoch: rounds of synthesis each followed by ``kd_steps`` student steps; evaluate; guard;
    save. Then the summary."""
    started = time.perf_counter()
    seed_everything(cfg.engine.seed, env.rank)
    p = _build(cfg, env, teacher_module, student_module, cleanup)
    state = _start_or_resume(cfg, env, run, p, resume, overwrite)
    p.teacher_logits, p.teacher_top1 = _score_teacher(cfg, env, run, p)

    t = cfg.train
    steps_per_epoch = t.rounds_per_epoch * t.kd_steps
    warmup = t.synthesis_warmup_epochs
    all_epochs = warmup + t.epochs
    prog = Progress(0, 0, state["step"], t.epochs, t.rounds_per_epoch, t.kd_steps, warmup)
    # a warm-up round counts as kd_steps on the bar, so its ETA covers the warm-up too
    bar = progress_bar(
        all_epochs * steps_per_epoch, state["epoch"] * steps_per_epoch, cfg.engine.progress and env.is_main, "distill"
    )
    counted = None
    if cfg.engine.count_flops:
        prog.epoch, prog.round = state["epoch"] - warmup, 0  # the first round's, as the loop sets them
        counted = _count_flops(t, env, p, prog)
    env.reset_peak_memory()
    memory_at_loop_start = env.memory_in_use_bytes()
    timers = state["timers"]
    clock = _Clock(started, earlier=timers["total_seconds"])
    loop_started = time.perf_counter()
    for epoch in range(state["epoch"], all_epochs):
        prog.epoch = epoch - warmup
        meters = Meters()
        # Synthesis time is every moment spent producing images (the method's synthesis round and the student
        # batches it generates; the latter also booked as batch time); student time is the student's forward,
        # backward and optimiser step.
        scheduled_lr = [group["lr"] for group in p.optimizer.param_groups]
        watch = Stopwatch(env.device)
        watch.start()
        for rnd in range(t.rounds_per_epoch):
            prog.round = rnd
            meters.update(p.method.synthesize(prog), "synth/")
            watch.lap("synth")
            p.student_ddp.train()
            for _ in range(0 if prog.in_warmup else t.kd_steps):
                meters.update(_student_step(t, env, p, prog, scheduled_lr, watch), "train/")
                prog.step += 1
                watch.lap("student")
            bar.update(t.kd_steps)
        _book_times(timers, watch.totals())
        losses = meters.means()
        _stop_if_diverged(cfg, env, run, p, state, losses, epoch, clock)
        _end_training(env, p, prog, scheduled_lr)

        tick = time.perf_counter()
        metrics, student_logits = _evaluate(cfg, env, p)
        stop = _judge(env, p, metrics, student_logits, losses, prog, epoch)
        timers["eval_seconds"] += time.perf_counter() - tick
        # everything this process did so far, the previous epoch's checkpoint and pictures included
        timers["total_seconds"] = clock.total()
        _save_epoch(cfg, env, run, p, state, metrics, losses, prog, epoch, scheduled_lr, all_epochs)
        _log_epoch(p, state, metrics, losses, prog, epoch, all_epochs, loop_started)
        if stop:
            log.warning(
                "stopping: the student has looked collapsed for %d epochs in a row (engine.stop_on_collapse)",
                p.guard.streak,
            )
            break
        limit = cfg.engine.time_limit
        if limit is not None and env.main_decides(timers["total_seconds"] >= limit) and epoch + 1 < all_epochs:
            state["time_limited"] = True
            log.info("stopping: the run's wall time passed engine.time_limit=%gs after epoch %d", limit, epoch + 1)
            break
    bar.close()
    return _finish(cfg, env, run, p, state, clock, memory_at_loop_start, counted)


def _build(cfg, env: Env, teacher_module, student_module, cleanup: ExitStack) -> _Parts:
    """The data the student is scored on, the frozen teacher, the student, the method, the student's optimiser and
    schedule (the optional average of its weights), and the run's record keepers."""
    info, test_x, test_y, heldout, teacher = _teacher_and_test_set(cfg, env, teacher_module)
    # the score that picks the best checkpoint: top-1 where there are labels, else agreement with the teacher
    select = "top1" if test_y is not None else "agreement"
    student = build_model(student_module or cfg.student.arch, info, env, None, "student", cfg.trust_code)
    method = build_method(cfg, teacher, student, info, env)
    cleanup.callback(method.close)
    env.broadcast_state(student)
    env.broadcast_state(method)
    student_ddp = DistributedDataParallel(student) if env.distributed else student
    optimizer = build_optimizer(student.parameters(), cfg.train)
    scheduler = build_scheduler(optimizer, cfg.train, cfg.train.epochs)
    if not 0.0 <= cfg.train.ema_decay < 1.0:
        raise ConfigError(f"train.ema_decay={cfg.train.ema_decay}: give a decay in [0, 1) (0 = no averaging)")
    ema = StudentEMA(student, cfg.train.ema_decay) if cfg.train.ema_decay else None
    tb = TensorBoardLog(cfg.log.tensorboard, env.is_main)
    cleanup.callback(tb.close)
    return _Parts(
        info=info,
        test_x=test_x,
        test_y=test_y,
        heldout_digest=heldout,
        select=select,
        teacher=teacher,
        teacher_name=_arch_name(cfg.teacher.arch, teacher_module),
        student=student,
        student_name=_arch_name(cfg.student.arch, student_module),
        student_ddp=student_ddp,
        method=method,
        optimizer=optimizer,
        scheduler=scheduler,
        ema=ema,
        tb=tb,
        guard=CollapseGuard(stop=cfg.engine.stop_on_collapse, patience=cfg.engine.collapse_patience),
    )


def _teacher_and_test_set(
    cfg, env: Env, teacher_module
) -> tuple[DatasetInfo, torch.Tensor, torch.Tensor | None, str | None, nn.Module]:
    """``(info, test_x, test_y, heldout, teacher)``: the dataset's facts, the images the student is scored on with
    their labels (None without), the digest of held-out synthetic images (None with a test set) and the frozen
    teacher."""
    if teacher_module is None and not cfg.teacher.weights and not is_external_arch(cfg.teacher.arch):
        raise ConfigError(
            "teacher.weights is not set: train a teacher with `dfkd train-teacher` and pass teacher.weights=RUN_DIR "
            "(or a checkpoint file)"
        )
    check_data_free_eval(cfg.data, cfg.eval.split)
    check_validation_slice(cfg.data, cfg.eval.split, cfg.teacher.weights)
    teacher_source, teacher_weights = teacher_module or cfg.teacher.arch, cfg.teacher.weights
    heldout = None
    if is_data_free(cfg.data.name):
        # the teacher comes first: what it states about itself fills what the data config leaves unset
        record = checkpoint_record(cfg.teacher.weights)  # read once: the sizes of a zoo teacher, the data's facts
        recorded = checkpoint_meta(cfg.teacher.weights, record)
        teacher_source, teacher_weights = _raw_teacher(cfg, teacher_module, recorded, record), None
        info = resolve_dataset_info(cfg.data, _teacher_facts(teacher_source, recorded))
        if cfg.data.name == NO_DATA:
            test_x, test_y = None, None
        else:
            test_x, test_y = (t.to(env.device) for t in load_image_folder(cfg.data.root, info))
    else:
        info = dataset_info(cfg.data.name)
        test_x, test_y = load_split_on_device(info, cfg.eval.split, cfg.data.root, env, cfg.data.val_size)
    data_wins = is_data_free(cfg.data.name)  # info holds the teacher's facts, data.image_shape/mean/std over them
    teacher = build_model(teacher_source, info, env, teacher_weights, "teacher", cfg.trust_code, data_wins=data_wins)
    teacher = freeze(teacher)
    if test_x is None:
        d = cfg.data
        test_x = synthesize_heldout(teacher, info, d.heldout_size, d.heldout_seed, d.heldout_steps, env.device)
        heldout = digest(test_x)
    return info, test_x, test_y, heldout, teacher


def _start_or_resume(cfg, env: Env, run: RunDir, p: _Parts, resume: bool, overwrite: bool) -> dict:
    """The run's folder made ready and the run's state: fresh, or loaded with the networks, optimiser, method, guard
    and random generators from the last checkpoint when resuming."""
    run.prepare(resume=resume, overwrite=overwrite)
    state = _fresh_state()
    if resume:
        state = _restore(run, p, env, cfg.engine.seed)
        log.info("resuming %s from epoch %d", run.path, state["epoch"])
        if p.heldout_digest is not None and state.get("heldout_digest") not in (None, p.heldout_digest):
            log.warning(
                "the held-out synthetic images differ from the ones this run started with (another device or "
                "library version rebuilt them): agreement before and after the resume is on different images"
            )
    state["heldout_digest"] = p.heldout_digest
    run.write_text("config.yaml", to_yaml(cfg))
    run.write_metrics(state["history"])
    p.tb.open(run.path / "tensorboard", state["history"])
    return state


def _score_teacher(cfg, env: Env, run: RunDir, p: _Parts) -> tuple[torch.Tensor, float | None]:
    """The teacher's logits on the images the student is scored on, and its top-1 where they have labels; logs the
    run's first line."""
    teacher_logits = predict(p.teacher, p.test_x, cfg.eval.batch_size, env.channels_last)
    teacher_top1 = top1_percent(teacher_logits, p.test_y) if p.test_y is not None else None
    log.info(
        "%s: %s -> %s on %s | %s | device %s | run dir %s",
        cfg.method.name,
        p.teacher_name,
        p.student_name,
        p.info.name,
        _evaluation_text(cfg, teacher_logits, teacher_top1),
        env.describe(),
        run.path,
    )
    return teacher_logits, teacher_top1


def _student_step(t, env: Env, p: _Parts, prog: Progress, scheduled_lr: list[float], watch: Stopwatch) -> dict:
    """One student step on the method's next batch; returns the method's losses."""
    batch = p.method.next_batch(prog)
    watch.lap("batch")
    return _learn(t, env, p, prog, scheduled_lr, batch)


def _learn(t, env: Env, p: _Parts, prog: Progress, scheduled_lr: list[float], batch) -> dict:
    """The student's forward on ``batch`` (the method's loss, the teacher's forward in it), backward and step."""
    with env.autocast():
        out = p.method.student_loss(batch, p.student_ddp, prog)
    p.optimizer.zero_grad(set_to_none=True)
    out["loss"].backward()
    if t.grad_clip:
        torch.nn.utils.clip_grad_norm_(p.student.parameters(), t.grad_clip)
    if prog.step <= t.warmup_steps:
        for group, lr in zip(p.optimizer.param_groups, scheduled_lr):
            group["lr"] = lr * warmup_factor(prog.step, t.warmup_steps)
    p.optimizer.step()
    if p.ema is not None:
        p.ema.update(p.student)
    return out


def _count_flops(t, env: Env, p: _Parts, prog: Progress) -> dict:
    """FLOPs of one item of each part of the loop (:data:`dfkd.engine.flops.PARTS`): a synthesis round, a student
    batch and a student step, run once each on the run's own method, networks and optimiser, untimed; then this
    machine's peak (:func:`measure_peak`) under the run's precision and memory format. Everything they changed is
    put back before the loop starts (parameters, BN statistics, gradients, optimiser and method states, counters, the
    random generators: what a checkpoint holds), so the run trains exactly as it would without counting."""
    modules = [p.student, p.method, *([p.ema.module] if p.ema is not None else [])]
    restore = snapshot(modules, [p.optimizer], env.device)  # the method's submodules among them
    method_state, images_synthesized = copy.deepcopy(p.method.checkpoint_state()), p.method.images_synthesized
    ema_updates = p.ema.updates if p.ema is not None else 0
    scheduled_lr = [group["lr"] for group in p.optimizer.param_groups]
    try:
        _, generator_round = flops_of(lambda: p.method.synthesize(prog))
        p.student_ddp.train()
        batch, student_batch = flops_of(lambda: p.method.next_batch(prog))
        _, student_step = flops_of(lambda: _learn(t, env, p, prog, scheduled_lr, batch))
        peak = measure_peak(env.device, env.autocast, env.channels_last)
    finally:
        restore()
        p.method.load_checkpoint_state(method_state)
        p.method.images_synthesized = images_synthesized
        if p.ema is not None:
            p.ema.updates = ema_updates
    flops = dict(zip(PARTS, (generator_round, student_batch, student_step)))
    log.info(
        "FLOPs per item (untimed pass): synthesis round %.3g, student batch %.3g, student step %.3g; peak %.1f GFLOP/s "
        "(matmul), %.1f GFLOP/s (conv) on %d threads",
        *flops.values(),
        peak["matmul_gflops_per_second"],
        peak["conv_gflops_per_second"],
        peak["threads"],
    )
    return {"flops": flops, "peak": peak}


def _arithmetic(counted: dict, state: dict, rounds_per_epoch: int) -> dict:
    """The summary's ``flops``, ``peak`` and ``arithmetic``: the counted FLOPs per item, the machine's peak and the
    rates achieved over the whole run (every process of it, as the timers), from how many of each part it did."""
    timers = state["timers"]
    batch_seconds = timers.get("batch_seconds", 0.0)
    counts = {
        "generator_round": len(state["history"]) * rounds_per_epoch,  # warm-up rounds too: their time is booked
        "student_batch": state["step"],
        "student_step": state["step"],
    }
    seconds = {
        "generator_round": timers["synth_seconds"] - batch_seconds,
        "student_batch": batch_seconds,
        "student_step": timers["student_seconds"],
    }
    rates = arithmetic(counted["flops"], counts, seconds, counted["peak"])
    return {**counted, "arithmetic": {"counts": counts, **rates}}


def _book_times(timers: dict, booked: dict) -> None:
    """Add an epoch's stopwatch totals to the run's timers."""
    timers["synth_seconds"] += booked.get("synth", 0.0) + booked.get("batch", 0.0)
    timers["batch_seconds"] = timers.get("batch_seconds", 0.0) + booked.get("batch", 0.0)
    timers["student_seconds"] += booked.get("student", 0.0)


def _stop_if_diverged(
    cfg, env: Env, run: RunDir, p: _Parts, state: dict, losses: dict, epoch: int, clock: _Clock
) -> None:
    """Raise :class:`DivergedError` when an epoch's mean loss is not finite on any rank, before the epoch is saved;
    the summary records the run as diverged."""
    bad = first_non_finite(losses)
    # every rank stops together: a rank that raised alone would leave the others waiting in a collective
    ranks_diverged = env.all_reduce_sum(torch.tensor(float(bad is not None), device=env.device)).item()
    if not ranks_diverged:
        return
    state["timers"]["total_seconds"] = clock.total()
    last = f"epoch {state['epoch']}" if state["epoch"] else "none yet"
    where = f"{bad} became {losses[bad]}" if bad is not None else "the loss became non-finite on another rank"
    reason = f"{where} in epoch {epoch + 1}"
    summary = _summary(cfg, env, state, p, run.path)
    flagged = [f["epoch"] for f in p.guard.flagged]  # a run can collapse first and diverge later
    run.write_summary({**summary, "status": STATUS_DIVERGED, "status_reason": reason, "collapsed_epochs": flagged})
    raise DivergedError(
        f"training diverged: {reason}; stopped without saving this epoch (last good checkpoint: {last}, "
        f"in {run.last}); lower train.lr or the method's lr_g, then `dfkd distill --resume {run.path}`"
    )


def _end_training(env: Env, p: _Parts, prog: Progress, scheduled_lr: list[float]) -> None:
    """The epoch's student steps are over: the schedule steps, and the ranks' students agree before evaluation."""
    for group, lr in zip(p.optimizer.param_groups, scheduled_lr):
        group["lr"] = lr  # the schedule steps from its own value, whatever the warm-up did
    if not prog.in_warmup:
        p.scheduler.step()
    env.average_buffers(p.student)  # BN running statistics drift apart across ranks; evaluate and save their mean
    if p.ema is not None:
        env.average_buffers(p.ema.module)


def _evaluate(cfg, env: Env, p: _Parts) -> tuple[dict, torch.Tensor]:
    """The evaluated student's metrics (the average's when train.ema_decay is set, with the live student's score
    beside it) and its logits."""
    evaluated = p.ema.module if p.ema is not None else p.student
    student_logits = predict(evaluated, p.test_x, cfg.eval.batch_size, env.channels_last)
    metrics = student_metrics(student_logits, p.test_y, p.teacher_logits)
    if p.ema is not None:
        live_logits = predict(p.student, p.test_x, cfg.eval.batch_size, env.channels_last)
        metrics[f"{p.select}_live"] = student_metrics(live_logits, p.test_y, p.teacher_logits)[p.select]
    return metrics, student_logits


def _judge(
    env: Env, p: _Parts, metrics: dict, student_logits: torch.Tensor, losses: dict, prog: Progress, epoch: int
) -> bool:
    """The collapse guard's verdict on the epoch; returns whether every rank stops (engine.stop_on_collapse)."""
    # the untrained student of a synthesis warm-up epoch is evaluated (an honest point of the accuracy-time
    # curve) but can neither be the best student nor look collapsed
    reasons = (
        []
        if prog.in_warmup
        else collapse_reasons(
            metrics["agreement"], student_logits, p.teacher_logits, p.test_y, losses.get("train/loss"), prog.step
        )
    )
    p.guard.update(epoch + 1, reasons)
    if reasons:
        log.warning("epoch %d: the student looks collapsed: %s", epoch + 1, "; ".join(reasons))
    stop = env.all_reduce_sum(torch.tensor(float(p.guard.should_stop), device=env.device)).item() > 0
    p.guard.stopped_early = stop
    return stop


def _save_epoch(
    cfg,
    env: Env,
    run: RunDir,
    p: _Parts,
    state: dict,
    metrics: dict,
    losses: dict,
    prog: Progress,
    epoch: int,
    scheduled_lr: list[float],
    all_epochs: int,
) -> None:
    """The epoch's row of metrics (history, TensorBoard, metrics.jsonl), the checkpoint (best too when it is), and
    every engine.sample_every epochs the pictures."""
    timers = state["timers"]
    row = {
        "epoch": epoch + 1,
        "step": prog.step,
        **{f"eval/{k}": v for k, v in metrics.items()},
        **losses,
        **({"synthesis_warmup": True} if prog.in_warmup else {}),
        "lr": scheduled_lr[0],  # the rate this epoch trained at (after any warm-up), not the next epoch's
        "images_synthesized": p.method.images_synthesized,
        **{f"time/{k}": v for k, v in timers.items()},
    }
    state["history"].append(row)
    p.tb.log_row(row)  # before the checkpoint: a resume purges what it repeats, but cannot restore what was lost
    is_best = not prog.in_warmup and metrics[p.select] > state["best_score"]
    if is_best:
        state["best_score"], state["best_epoch"] = metrics[p.select], epoch + 1
    state.update(epoch=epoch + 1, step=prog.step, timers=timers, guard=p.guard.state_dict())
    rng = gather_rng_states(env)
    checkpoint = _checkpoint(cfg, p, state, metrics, rng)
    run.save_checkpoint(checkpoint, is_best)
    run.append_metrics(row)
    if cfg.engine.sample_every and (epoch + 1) % cfg.engine.sample_every == 0 and epoch + 1 < all_epochs:
        # the last epoch's come after the loop
        _pictures(cfg, env, run, p, state["history"])


def _log_epoch(
    p: _Parts,
    state: dict,
    metrics: dict,
    losses: dict,
    prog: Progress,
    epoch: int,
    all_epochs: int,
    loop_started: float,
) -> None:
    timers = state["timers"]
    done = epoch + 1 - _first_epoch(state)
    remaining = (time.perf_counter() - loop_started) / max(1, done) * (all_epochs - epoch - 1)
    log.info(
        "%sepoch %d/%d | %s | loss %s | synth %s, student %s | eta %s",
        "synthesis warm-up: " if prog.in_warmup else "",
        epoch + 1,
        all_epochs,
        _score_text(metrics, state, p.select),
        f"{losses['train/loss']:.4g}" if "train/loss" in losses else "-",
        format_seconds(timers["synth_seconds"]),
        format_seconds(timers["student_seconds"]),
        format_seconds(remaining),
    )


def _finish(
    cfg, env: Env, run: RunDir, p: _Parts, state: dict, clock: _Clock, memory_at_loop_start: int, counted: dict | None
) -> dict:
    """The last pictures and the run's summary, with its status from the collapse guard (and with engine.count_flops
    the loop's arithmetic, see :func:`_count_flops`); returns the summary."""
    _pictures(cfg, env, run, p, state["history"])
    state["timers"]["total_seconds"] = clock.total()
    summary = _summary(cfg, env, state, p, run.path)
    summary["memory"] = {  # the parts of peak_memory_bytes
        # the process before the loop: interpreter and libraries, data, networks
        "loop_start_bytes": memory_at_loop_start,
        "data_bytes": tensor_bytes((p.test_x, p.test_y, p.teacher_logits)),
        "teacher_bytes": tensor_bytes(p.teacher.state_dict()),
        "student_bytes": tensor_bytes((p.student.state_dict(), p.optimizer.state_dict()["state"]))
        + (tensor_bytes(p.ema.module.state_dict()) if p.ema is not None else 0),
        # generators, heads, banks, pools and the method's optimiser states, at the end of the run
        "method_bytes": tensor_bytes((p.method.state_dict(), p.method.checkpoint_state())),
    }
    if counted is not None:
        summary.update(_arithmetic(counted, state, cfg.train.rounds_per_epoch))
    guard = p.guard
    status, reason = guard.status(state["epoch"])
    summary.update(status=status, status_reason=reason, collapsed_epochs=[f["epoch"] for f in guard.flagged])
    summary["stopped_at_time_limit"] = bool(state.get("time_limited"))
    run.write_summary(summary)
    _log_result(summary, p, run, status, reason)
    return summary


def _log_result(summary: dict, p: _Parts, run: RunDir, status: str, reason: str | None) -> None:
    if status != STATUS_OK:
        log.warning("FAILED: the run %s: %s; its accuracy is not a result (summary in %s)", status, reason, run.path)
    elif p.select == "agreement":
        log.info(
            "done: student agreement with the teacher on held-out synthetic images %.2f%% at the last epoch (best "
            "%.2f%%; no test set, no top-1) in %s; summary in %s",
            summary["agreement_last"],
            summary["agreement_best"],
            format_seconds(summary["total_seconds"]),
            run.path / "summary.json",
        )
    else:
        log.info(
            "done: student top-1 %.2f%% at the last epoch (best %.2f%%, %s; teacher %.2f%%) in %s; summary in %s",
            summary["student_top1_last"],
            summary["student_top1_best"],
            best_label(summary["eval_split"]),
            p.teacher_top1,
            format_seconds(summary["total_seconds"]),
            run.path / "summary.json",
        )


def build_method(cfg: DistillConfig, teacher: nn.Module, student: nn.Module, info, env: Env) -> Method:
    """The run's method (``cfg.method``) on a frozen ``teacher`` and a ``student``, on the device."""
    method = METHODS.get(cfg.method.name)(cfg.method, Ctx(teacher, student, info, env, cfg.train.batch_size))
    try:
        return method.to(env.device)
    except BaseException:
        method.close()  # its hooks must not stay on a caller's teacher
        raise


def restore_method(method: Method, ckpt: dict) -> None:
    """Load a distillation checkpoint's method state: submodules (generators, pools, banks), optimisers, counters."""
    method.load_state_dict(ckpt["method"])
    method.load_checkpoint_state(ckpt["method_state"])
    method.images_synthesized = int(ckpt["images_synthesized"])


def _arch_name(arch: str, module: nn.Module | None) -> str:
    return type(module).__name__ if module is not None else arch


def _raw_teacher(cfg, teacher_module: nn.Module | None, recorded: TeacherMeta, record: dict) -> nn.Module:
    """The teacher network with its weights, unwrapped, built before the run's dataset facts are known (``recorded``
    and ``record``: what its weights file states, see :func:`checkpoint_meta`)."""
    arch, weights = teacher_module or cfg.teacher.arch, cfg.teacher.weights
    if isinstance(arch, str) and not arch:
        raise ConfigError("teacher.arch is not set: name an architecture (`dfkd list models`)")
    path = str(resolve_weights(weights)) if weights else None
    sizes = {}
    if isinstance(arch, str):
        num_classes, in_channels = zoo_sizes(cfg.data, recorded, record)
        if arch in MODELS and not (num_classes and in_channels):
            raise ConfigError(
                f"teacher.arch={arch} is built from data.num_classes and data.image_shape when data.name="
                f"{cfg.data.name}: set them (e.g. data.num_classes=10 data.image_shape=[3,32,32])"
            )
        sizes = {k: v for k, v in (("num_classes", num_classes), ("in_channels", in_channels)) if v}
    return build_network(arch, weights=path, role="teacher", trust_code=cfg.trust_code, **sizes)


def _teacher_facts(net: nn.Module, recorded: TeacherMeta) -> TeacherMeta:
    """What the teacher states about itself; its dfkd checkpoint's records fill what its network does not say."""
    stated = teacher_meta(net)
    return TeacherMeta(
        **{
            f: getattr(stated, f) if getattr(stated, f) not in (None, "") else getattr(recorded, f)
            for f in ("mean", "std", "input_shape", "num_classes", "classes", "source")
        }
    )


def _evaluation_text(cfg, teacher_logits: torch.Tensor, teacher_top1: float | None) -> str:
    """What the run is scored on, for the first log line."""
    n = len(teacher_logits)
    if teacher_top1 is not None:
        where = "folder" if is_data_free(cfg.data.name) else ("validation" if cfg.eval.split == "val" else "test")
        return f"teacher top-1 {teacher_top1:.2f}% on {n} {where} images"
    # how well the held-out set was made: the teacher's top-1 against the class each image was optimised toward
    targets = torch.arange(n, device=teacher_logits.device) % teacher_logits.shape[1]
    return (
        f"no test set: the student is scored by agreement with the teacher on {n} held-out synthetic images "
        f"(data.heldout_seed={cfg.data.heldout_seed}; the teacher gives {top1_percent(teacher_logits, targets):.1f}% "
        "of them the class they were made for)"
    )


def _score_text(metrics: dict, state: dict, select: str) -> str:
    best = f"{state['best_score']:.2f}%" if state["best_epoch"] else "-"
    if select == "agreement":
        return (
            f"agreement on held-out synthetic images {metrics['agreement']:.2f}% (best {best}) | "
            f"prob. loyalty {metrics['prob_loyalty']:.4f}"
        )
    return f"top-1 {metrics['top1']:.2f}% (best {best}) | agree {metrics['agreement']:.2f}%"


def _selected_by(cfg, select: str) -> str:
    if select == "agreement":
        return (
            f"best eval/agreement: the student's agreement with the teacher on {cfg.data.heldout_size} held-out "
            f"synthetic images (data.heldout_seed={cfg.data.heldout_seed}); there is no test set"
        )
    where = f"image folder {cfg.data.root}" if is_data_free(cfg.data.name) else f"{cfg.eval.split} split"
    return f"best eval/top1 on the {where}"


def best_label(eval_split: str | None) -> str:
    """What chose a run's best epoch, to print beside its number: the test set unless the run held out a validation
    slice (``eval.split=val``) or had no data (agreement on held-out synthetic images). The headline is the last
    epoch's: the best one picked on the set it is scored on flatters it."""
    if eval_split == "val":
        return "chosen on the validation slice"
    if eval_split == HELDOUT_SPLIT:
        return "chosen on held-out synthetic images"
    return "test-selected"


def _fresh_state() -> dict:
    timers = {
        "synth_seconds": 0.0,
        "batch_seconds": 0.0,
        "student_seconds": 0.0,
        "eval_seconds": 0.0,
        "total_seconds": 0.0,
    }
    return {
        "epoch": 0,
        "step": 0,
        "best_score": -1.0,  # of the selection metric: eval/top1, or eval/agreement without labels
        "best_epoch": 0,
        "history": [],
        "timers": timers,
        "start": 0,
        "guard": {},
    }


def _first_epoch(state: dict) -> int:
    return state["start"]


def _checkpoint(cfg, p: _Parts, state: dict, metrics: dict, rng: list[dict]) -> dict:
    info, student, ema, method = p.info, p.student, p.ema, p.method
    # ``state_dict`` holds the weights the run evaluated (the average when train.ema_decay is set): what `dfkd eval`
    # and a teacher.weights=RUN_DIR load. The live student travels beside it for resuming.
    extra = {} if ema is None else {"live_state_dict": student.net.state_dict(), "ema_updates": ema.updates}
    evaluated = student if ema is None else ema.module
    return {
        "format": CHECKPOINT_FORMAT,
        "state_dict": evaluated.net.state_dict(),
        **extra,
        "arch": cfg.student.arch,
        "num_classes": int(info.num_classes),
        "in_channels": int(info.image_shape[0]),
        "dataset": cfg.data.name,
        # the facts the run used (data.name=none takes them from config and teacher, not a registry)
        "image_shape": list(info.image_shape),
        "mean": list(info.mean),
        "std": list(info.std),
        "classes": list(info.classes),
        "top1": metrics.get("top1"),  # None without labels (data.name=none)
        "agreement": metrics.get("agreement"),
        "epoch": state["epoch"],
        "step": state["step"],
        "best_score": state["best_score"],
        "selected_by": _selected_by(cfg, "top1" if "top1" in metrics else "agreement"),
        **({"best_top1": state["best_score"]} if "top1" in metrics else {}),
        "best_epoch": state["best_epoch"],
        "heldout_digest": state.get("heldout_digest"),
        "history": state["history"],
        "timers": dict(state["timers"]),
        "guard": state["guard"],
        "optimizer": p.optimizer.state_dict(),
        "scheduler": p.scheduler.state_dict(),
        "method": method.state_dict(),
        "method_state": method.checkpoint_state(),
        "images_synthesized": method.images_synthesized,
        "rng": rng,
        "config": to_dict(cfg),
    }


def _restore(run: RunDir, p: _Parts, env: Env, seed: int) -> dict:
    student, ema, guard = p.student, p.ema, p.guard
    ckpt = run.load_checkpoint("last")
    if ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ConfigError(f"{run.last} is not a distillation checkpoint: resume it with the command that wrote it")
    if (ema is not None) != ("live_state_dict" in ckpt):
        raise ConfigError(
            f"{run.last} was written with{'out' if ema is not None else ''} train.ema_decay: resume it with the "
            "settings that wrote it"
        )
    if ema is None:
        student.net.load_state_dict(ckpt["state_dict"])
    else:
        student.net.load_state_dict(ckpt["live_state_dict"])
        ema.module.net.load_state_dict(ckpt["state_dict"])
        ema.updates = int(ckpt["ema_updates"])
    p.optimizer.load_state_dict(ckpt["optimizer"])
    p.scheduler.load_state_dict(ckpt["scheduler"])
    restore_method(p.method, ckpt)
    restore_rng_states(ckpt["rng"], env, seed, int(ckpt["epoch"]), run.last)
    guard.load_state_dict(ckpt.get("guard", {}))
    return {
        "epoch": int(ckpt["epoch"]),
        "step": int(ckpt["step"]),
        "best_score": float(ckpt["best_score"] if "best_score" in ckpt else ckpt["best_top1"]),
        "best_epoch": int(ckpt["best_epoch"]),
        "history": list(ckpt["history"]),
        "timers": dict(ckpt["timers"]),
        "start": int(ckpt["epoch"]),
        "guard": guard.state_dict(),
        "heldout_digest": ckpt.get("heldout_digest"),
    }


def _pictures(cfg, env: Env, run: RunDir, p: _Parts, history: list[dict]) -> None:
    if not env.is_main or not history:
        return
    samples = p.method.preview(64)
    if samples is not None:
        save_grid(run.path / "samples" / f"epoch_{history[-1]['epoch']:03d}.png", samples)
        p.tb.log_images("samples", samples, history[-1]["epoch"])
    if p.select == "agreement":
        plot_curves(
            run.path / "accuracy.png",
            {f"student ({cfg.student.arch})": [row.get("eval/agreement") for row in history]},
            title=f"{cfg.method.name}: {cfg.teacher.arch} -> {cfg.student.arch}, no data: agreement on "
            f"{cfg.data.heldout_size} held-out synthetic images",
            ylabel="agreement with the teacher (%)",
        )
        return
    plot_curves(
        run.path / "accuracy.png",
        {
            f"student ({cfg.student.arch})": [row["eval/top1"] for row in history],
            "agreement with teacher": [row.get("eval/agreement") for row in history],
        },
        title=f"{cfg.method.name}: {cfg.teacher.arch} -> {cfg.student.arch} on {cfg.data.name}",
        references={"teacher": p.teacher_top1},
    )


def _summary(cfg, env: Env, state: dict, p: _Parts, path: Path) -> dict:
    select = p.select
    history = state["history"]
    # mu, var and the best are taken over the selection metric's curve: top-1, or agreement without labels
    curve = [row[f"eval/{select}"] for row in history if not row.get("synthesis_warmup")]
    stats = accuracy_curve_stats(curve, cfg.eval.window_start, cfg.eval.window_end)
    last = history[-1] if history else {}
    best = next((row for row in history if row["epoch"] == state["best_epoch"]), {})
    # int64: a float32 sum loses whole images beyond 2**24
    images = env.all_reduce_sum(torch.tensor(p.method.images_synthesized, dtype=torch.int64, device=env.device)).item()
    timers = state["timers"]
    student_steps = state["step"]
    busy = timers["synth_seconds"] + timers["student_seconds"]
    return {
        "method": cfg.method.name,
        "dataset": cfg.data.name,
        "eval_split": HELDOUT_SPLIT if select == "agreement" else cfg.eval.split,
        "selected_by": _selected_by(cfg, select),
        "curve_metric": f"eval/{select}",  # what mu, var and curve_window describe
        "seed": cfg.engine.seed,
        "teacher": p.teacher_name,
        "student": p.student_name,
        "teacher_top1": p.teacher_top1,
        "student_top1_best": stats["best"] if select == "top1" else None,
        "best_epoch": state["best_epoch"],
        "student_top1_last": last.get("eval/top1"),
        # the papers report the best epoch's agreement and loyalty; the last epoch's are the run's final student
        "agreement_best": best.get("eval/agreement"),
        "agreement_last": last.get("eval/agreement"),
        "prob_loyalty_best": best.get("eval/prob_loyalty"),
        "prob_loyalty_last": last.get("eval/prob_loyalty"),
        "prob_loyalty_reference_best": best.get("eval/prob_loyalty_reference"),
        "prob_loyalty_reference_last": last.get("eval/prob_loyalty_reference"),
        "mu": stats["mu"],
        "var": stats["var"],
        "curve_window": stats["window"],
        "epochs": len(history),
        "synthesis_warmup_epochs": sum(1 for row in history if row.get("synthesis_warmup")),
        "student_steps": student_steps,
        "images_synthesized": int(images),
        "synth_seconds": timers["synth_seconds"],
        "batch_seconds": timers.get("batch_seconds", 0.0),  # the part of synth_seconds that made student batches
        "student_seconds": timers["student_seconds"],
        "eval_seconds": timers["eval_seconds"],
        "total_seconds": timers["total_seconds"],
        "student_steps_per_second": student_steps / busy if busy else None,
        "images_per_second": images / busy if busy else None,
        "peak_memory_bytes": env.peak_memory_bytes(),
        "device": env.describe(),
        "cpu": cpu_model(),
        "world_size": env.world_size,
        "expected_top1": cfg.expected.top1,
        "expected_source": cfg.expected.source,
        "run_dir": str(path),
    }
