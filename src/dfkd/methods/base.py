"""The one interface every method implements, and the small helpers methods share.

The engine runs, per epoch, ``rounds_per_epoch`` rounds of::

    method.synthesize(prog)                          # the method's own generator / inversion steps
    for _ in range(kd_steps):
        batch = method.next_batch(prog)              # where the student's batch comes from
        out = method.student_loss(batch, student, prog)   # the student's loss; the engine steps the optimiser

A method owns its synthesis, its student batches and its student loss. The engine owns devices, precision, DDP,
the student optimiser, evaluation, checkpoints and logging, and never branches on a method's name.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from dfkd.config import choice
from dfkd.data import DatasetInfo
from dfkd.engine.env import Env
from dfkd.errors import ConfigError
from dfkd.hooks import InputHook
from dfkd.losses import BNStatsHooks, kd_kl
from dfkd.models import classifier_module, create_generator, init_dcgan_
from dfkd.models.generators import in_unit_range


@dataclass
class Batch:
    """What a method hands to the student step: images in [0, 1] on the device, optional labels and weights."""

    x: Tensor
    y: Tensor | None = None
    w: Tensor | None = None


@dataclass
class Progress:
    """Where the run is; schedules (curricula, warm-ups, ramps) are functions of these counters."""

    epoch: int  # 0-based
    round: int  # 0-based within the epoch
    step: int  # global student step about to be taken (0-based, never reset)
    epochs: int
    rounds_per_epoch: int
    kd_steps: int

    @property
    def total_steps(self) -> int:
        return self.epochs * self.rounds_per_epoch * self.kd_steps

    @property
    def step_in_round(self) -> int:
        """The index of the student step about to be taken within its round (0 right after a synthesis step)."""
        return self.step % self.kd_steps


@dataclass
class Ctx:
    """What the engine gives a method. A plain dataclass, so teacher and student are not in the method's state."""

    teacher: nn.Module  # Normalized, eval mode, requires_grad False, never DDP-wrapped
    student: nn.Module  # the raw (unwrapped) Normalized student, for use inside synthesize()
    info: DatasetInfo
    env: Env
    batch_size: int  # the student batch size (train.batch_size)


@dataclass
class MethodConfig:
    name: str = ""


class Method(nn.Module):
    """Base class of all methods. Subclasses set ``name`` and ``Config`` and register with ``@METHODS.register``.

    Submodules (generators, heads, memory banks) are registered as usual, so ``.to()`` and ``state_dict()`` cover
    them; optimiser states and plain counters go through :meth:`checkpoint_state`.
    """

    name: ClassVar[str] = ""
    Config: ClassVar[type] = MethodConfig

    def __init__(self, cfg: Any, ctx: Ctx):
        super().__init__()
        self.cfg = cfg
        self.ctx = ctx
        # Synthetic images this method has emitted: every generator output for online generators (generator steps
        # and student batches), the images added to the pool for inversion / pool methods. Saved with checkpoints.
        self.images_synthesized = 0
        self._hooks: list = []

    @property
    def device(self) -> torch.device:
        return self.ctx.env.device

    # -- the three steps -------------------------------------------------------------------------------------------
    def synthesize(self, prog: Progress) -> dict[str, Tensor]:
        """Run the method's synthesis for one round; return detached scalars to log."""
        raise NotImplementedError

    def next_batch(self, prog: Progress) -> Batch:
        """The next student batch."""
        raise NotImplementedError

    def student_loss(self, batch: Batch, student: nn.Module, prog: Progress) -> dict[str, Tensor]:
        """Default: KL(teacher || student) at temperature ``cfg.T``, scaled by T^2 (the CMI benchmark's KD)."""
        with torch.no_grad():
            t = self.ctx.teacher(batch.x)
        s = student(batch.x)
        return {"loss": kd_kl(s, t, self.cfg.T)}

    # -- state -----------------------------------------------------------------------------------------------------
    def checkpoint_state(self) -> dict:
        """Optimiser states and counters not held by submodules (tensors, numbers and dicts only)."""
        return {}

    def load_checkpoint_state(self, state: dict) -> None:
        pass

    def preview(self, n: int) -> Tensor | None:
        """Up to ``n`` current synthetic images in [0, 1] for the sample grid, or None."""
        return None

    def close(self) -> None:
        """Remove the hooks the method put on the teacher or student (those made through :meth:`track`)."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    # -- helpers ---------------------------------------------------------------------------------------------------
    def track(self, hook):
        """Register a hook object (anything with ``remove()``) for removal by :meth:`close`; returns it."""
        self._hooks.append(hook)
        return hook

    def bn_statistics(self, weight: float) -> BNStatsHooks | None:
        """BN-statistics hooks on the teacher when the BN-loss ``weight`` is non-zero, else None."""
        if weight == 0:
            return None
        hooks = BNStatsHooks(self.ctx.teacher)
        if not hooks.layers:
            hooks.remove()
            raise ConfigError("method.bn > 0 needs a teacher with BatchNorm2d layers; set method.bn=0")
        return self.track(hooks)

    def penultimate_features(self, weight: float) -> InputHook | None:
        """A hook on the teacher's classifier input (its penultimate feature) when ``weight`` is non-zero."""
        return self.track(InputHook(classifier_module(self.ctx.teacher))) if weight != 0 else None

    def teacher_with_bn(self, x: Tensor, bn_hooks: BNStatsHooks | None) -> tuple[Tensor, Tensor]:
        """Teacher logits on ``x`` and the BN-statistics loss of that forward (zero without hooks)."""
        if bn_hooks is None:
            t = self.ctx.teacher(x)
            return t, t.new_zeros((), dtype=torch.float32)
        with bn_hooks.capture():
            t = self.ctx.teacher(x)
        return t, bn_hooks.loss()


@dataclass
class GeneratorConfig(MethodConfig):
    """The knobs of a persistent online generator (:class:`GeneratorMethod`); methods override the defaults."""

    generator: str = "dcgan_large"  # a registered generator (CMI's LargeGenerator)
    nz: int = 256
    ngf: int = 64
    lr_g: float = 1e-3
    betas_g: list[float] = field(default_factory=lambda: [0.5, 0.999])
    g_steps: int = 1  # generator steps per round
    synthesis_batch_size: int | None = None  # generator-step batch; null = train.batch_size
    sample_mode: str = choice("eval", "eval", "train")  # generator BatchNorm mode when drawing student batches


class GeneratorMethod(Method):
    """A method with one persistent generator trained online against the teacher (DAFL, ZSKT, DFAD, DFQ, MB-DFKD,
    PRE-DFKD, CuDFKD).

    Builds the generator from ``cfg.generator``/``nz``/``ngf`` (its images in [0, 1]) with its Adam optimiser
    (``lr_g``, ``betas_g``), draws fresh images, serves student batches from it (generator BatchNorm in
    ``cfg.sample_mode``), keeps a fixed latent batch for the sample grid and saves the optimiser with checkpoints.
    """

    def __init__(self, cfg: Any, ctx: Ctx, generator: nn.Module | None = None, init: bool = False):
        super().__init__(cfg, ctx)
        if generator is None:
            c, h, _ = ctx.info.image_shape
            generator = create_generator(cfg.generator, nz=cfg.nz, ngf=cfg.ngf, img_size=h, nc=c)
        if init:
            init_dcgan_(generator)
        self.generator = ctx.env.prepare(in_unit_range(generator, ctx.info.mean, ctx.info.std))
        self.opt_g = torch.optim.Adam(self.generator.parameters(), lr=cfg.lr_g, betas=tuple(cfg.betas_g))
        self.synthesis_batch_size = cfg.synthesis_batch_size or ctx.batch_size
        self.register_buffer("preview_z", torch.randn(64, cfg.nz, device=ctx.env.device))

    def sample_z(self, n: int) -> Tensor:
        return torch.randn(n, self.cfg.nz, device=self.device)

    def generate(self, z: Tensor | int) -> Tensor:
        """Images from latents ``z`` (or from ``z`` fresh latents), counted as synthesised."""
        z = self.sample_z(z) if isinstance(z, int) else z
        self.images_synthesized += z.shape[0]
        return self.ctx.env.images(self.generator(z))

    @torch.no_grad()
    def next_batch(self, prog: Progress) -> Batch:
        """A fresh batch from the generator, its BatchNorm in ``cfg.sample_mode`` (running statistics by default)."""
        self.generator.train(self.cfg.sample_mode == "train")
        return Batch(x=self.generate(self.ctx.batch_size))

    def checkpoint_state(self) -> dict:
        return {"opt_g": self.opt_g.state_dict()}

    def load_checkpoint_state(self, state: dict) -> None:
        self.opt_g.load_state_dict(state["opt_g"])

    @torch.no_grad()
    def preview(self, n: int) -> Tensor:
        self.generator.eval()
        return self.generator(self.preview_z[:n])


class BestIterate:
    """The lowest-loss iterate of an inner optimisation, kept on the device: no host sync per step.

    ``offer(loss, *tensors)`` keeps ``tensors`` (detached copies) when ``loss`` is lower than every loss offered
    before; the first offer is always kept, so a NaN loss from the start still leaves an iterate.
    """

    def __init__(self) -> None:
        self.loss: Tensor | None = None
        self.values: tuple[Tensor, ...] = ()

    @torch.no_grad()
    def offer(self, loss: Tensor, *tensors: Tensor) -> None:
        loss = loss.detach().float()
        if self.loss is None:
            self.loss, self.values = loss.clone(), tuple(t.detach().clone() for t in tensors)
            return
        better = loss < self.loss
        self.loss = torch.where(better, loss, self.loss)
        self.values = tuple(torch.where(better, new.detach(), old) for new, old in zip(tensors, self.values))


@contextmanager
def frozen(*models: nn.Module) -> Iterator[None]:
    """Eval mode and no parameter gradients for ``models`` inside the block (restored afterwards).

    Used when a generator's loss runs through the student: gradients reach the generator, never the student.
    """
    saved = [(m, m.training, [p.requires_grad for p in m.parameters()]) for m in models]
    for m in models:
        m.eval()
        m.requires_grad_(False)
    try:
        yield
    finally:
        for m, training, flags in saved:
            m.train(training)
            for p, flag in zip(m.parameters(), flags):
                p.requires_grad_(flag)


def optimizer_step(optimizer: torch.optim.Optimizer, loss: Tensor, env: Env, module: nn.Module | None = None) -> None:
    """zero_grad, backward, step; for a persistent ``module`` (one that lives across rounds), gradients and BN
    statistics are averaged across ranks so that it stays identical on every rank under DDP."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if module is not None:
        env.all_reduce_grads(module)
    optimizer.step()
    if module is not None:
        env.average_buffers(module)
