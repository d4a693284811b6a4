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
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Protocol

import torch
from torch import Tensor, nn

from dfkd.config import choice
from dfkd.data import AUGMENTATIONS, DatasetInfo, build_augment
from dfkd.data.mixing import MIXES, mix_batch
from dfkd.data.pool import SyntheticPool
from dfkd.errors import ConfigError, DfkdError
from dfkd.hooks import InputHook
from dfkd.losses import (
    BNStatsHooks,
    MomentumBNStats,
    activation_loss,
    adv_masked_kl,
    class_entropy,
    kd_kl,
    onehot_ce,
)
from dfkd.models import bn_layers, classifier_module, create_generator, init_dcgan_
from dfkd.models.generators import in_unit_range
from dfkd.models.meta import teacher_meta
from dfkd.models.sources import is_torchscript


@dataclass
class Batch:
    """What a method hands to the student step: images in [0, 1] on the device, optional labels and weights."""

    x: Tensor
    y: Tensor | None = None
    w: Tensor | None = None


@dataclass
class Progress:
    """Where the run is; schedules (curricula, warm-ups, ramps) are functions of these counters."""

    epoch: int  # 0-based distillation epoch; negative (-W .. -1) in the W synthesis-only warm-up epochs
    round: int  # 0-based within the epoch
    step: int  # global student step about to be taken (0-based, never reset)
    epochs: int  # distillation epochs (the warm-up not included)
    rounds_per_epoch: int
    kd_steps: int
    warmup_epochs: int = 0  # synthesis-only epochs before the first distillation epoch

    @property
    def synthesis_epoch(self) -> int:
        """The 0-based epoch counted from the very first one, warm-up included."""
        return self.epoch + self.warmup_epochs

    @property
    def warmup_rounds(self) -> int:
        """The synthesis rounds of the warm-up epochs."""
        return self.warmup_epochs * self.rounds_per_epoch

    @property
    def synthesis_round(self) -> int:
        """The 0-based synthesis round counted from the very first one, warm-up included."""
        return self.synthesis_epoch * self.rounds_per_epoch + self.round

    @property
    def in_warmup(self) -> bool:
        return self.epoch < 0

    @property
    def total_steps(self) -> int:
        return self.epochs * self.rounds_per_epoch * self.kd_steps

    @property
    def step_in_round(self) -> int:
        """The index of the student step about to be taken within its round (0 right after a synthesis step)."""
        return self.step % self.kd_steps


class Runtime(Protocol):
    """What a method may ask of the engine about devices and processes (the engine's ``Env`` provides it).

    A method knows no device types, precisions or ranks: it puts its networks through ``prepare``, runs its
    forwards under ``autocast``, hands images through ``images``, keeps a persistent network identical across
    processes with ``all_reduce_grads`` / ``average_buffers`` and a shared memory with ``all_gather`` (no-ops in a
    single process).
    """

    device: torch.device

    def autocast(self) -> AbstractContextManager: ...

    def prepare(self, module: nn.Module) -> nn.Module: ...

    def images(self, x: Tensor) -> Tensor: ...

    def all_reduce_grads(self, module: nn.Module) -> None: ...

    def average_buffers(self, module: nn.Module) -> None: ...

    def all_gather(self, tensor: Tensor) -> Tensor: ...


@dataclass
class Ctx:
    """What the engine gives a method. A plain dataclass, so teacher and student are not in the method's state."""

    teacher: nn.Module  # Normalized, eval mode, requires_grad False, never DDP-wrapped
    student: nn.Module  # the raw (unwrapped) Normalized student, for use inside synthesize()
    info: DatasetInfo
    env: Runtime
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
        """Default: :meth:`imitation_loss` of the student's logits against the teacher's on the batch."""
        with torch.no_grad():
            t = self.ctx.teacher(batch.x)
        return {"loss": self.imitation_loss(student(batch.x), t)}

    def imitation_loss(self, s: Tensor, t: Tensor) -> Tensor:
        """Default: KL(teacher || student) at temperature ``cfg.T``, scaled by T^2 (the CMI benchmark's KD)."""
        return kd_kl(s, t, self.cfg.T)

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

    def bn_statistics(self, weight: float, momentum: float | None = None) -> BNStatsHooks | MomentumBNStats | None:
        """BN-statistics hooks on the teacher when the BN-loss ``weight`` is non-zero, else None: DeepInversion's
        (:class:`BNStatsHooks`), or with a ``momentum`` FastDFKD's against a moving average (:class:`MomentumBNStats`,
        a submodule of the method: its averages are checkpointed)."""
        if weight == 0:
            return None
        refuse_torchscript_teacher(self.ctx.teacher, self.name, "BatchNorm-statistics loss", "method.bn=0")
        if not bn_layers(self.ctx.teacher):
            raise ConfigError(
                f"{self.name}: method.bn > 0 needs a teacher with BatchNorm2d layers and {_teacher_name(self.ctx)} "
                "has none; set method.bn=0 to drop the BN-statistics loss"
            )
        hooks = BNStatsHooks(self.ctx.teacher) if momentum is None else MomentumBNStats(self.ctx.teacher, momentum)
        return self.track(hooks)

    def penultimate_features(self, weight: float) -> InputHook | None:
        """A hook on the teacher's classifier input (its penultimate feature) when ``weight`` is non-zero (the
        activation loss, ``method.act``)."""
        if weight == 0:
            return None
        refuse_torchscript_teacher(self.ctx.teacher, self.name, "activation loss", "method.act=0")
        try:
            head = classifier_module(self.ctx.teacher)
        except DfkdError as e:
            raise ConfigError(
                f"{self.name}: method.act != 0 hooks the teacher's penultimate feature: {e}; set method.act=0"
            ) from e
        return self.track(InputHook(head))

    def teacher_priors(
        self, x: Tensor, bn_hooks: BNStatsHooks | None = None, feature_hook: InputHook | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The teacher's logits on ``x`` and the priors the generator methods share: ``loss_bn`` (BatchNorm
        statistics, with ``bn_hooks``), ``loss_oh`` (CE against its own argmax) and ``loss_act`` (-mean |f| of its
        penultimate feature, with ``feature_hook``); a term without its hook is 0."""
        t, loss_bn = self.teacher_with_bn(x, bn_hooks)
        loss_act = activation_loss(feature_hook.pop()) if feature_hook is not None else torch.zeros_like(loss_bn)
        return t, {"loss_bn": loss_bn, "loss_oh": onehot_ce(t), "loss_act": loss_act}

    def teacher_with_bn(self, x: Tensor, bn_hooks: BNStatsHooks | MomentumBNStats | None) -> tuple[Tensor, Tensor]:
        """Teacher logits on ``x`` and the BN-statistics loss of that forward (zero without hooks)."""
        if bn_hooks is None:
            t = self.ctx.teacher(x)
            return t, t.new_zeros((), dtype=torch.float32)
        with bn_hooks.capture():
            t = self.ctx.teacher(x)
        return t, bn_hooks.loss()


def refuse_torchscript_teacher(teacher: nn.Module, method: str, term: str, off: str | None) -> None:
    """Raise a one-line error when ``teacher`` is TorchScript and ``method``'s ``term`` must hook its layers: PyTorch
    cannot register forward hooks on scripted modules. ``off`` is the setting that drops the term (None: none does)."""
    if not is_torchscript(teacher):
        return
    fix = f", or set {off} to drop the {term}" if off else f" ({method} cannot run without its {term})"
    raise ConfigError(
        f"{method}: the {term} hooks the teacher's layers, which a TorchScript teacher does not allow; load the eager "
        f"model instead (teacher.arch=py:MODULE:FUNCTION or hub:DIR:ENTRY, with teacher.weights=FILE){fix}"
    )


def _teacher_name(ctx: Ctx) -> str:
    return teacher_meta(ctx.teacher).source or type(getattr(ctx.teacher, "net", ctx.teacher)).__name__


def check_steps(g_steps: int) -> None:
    """A synthesis round needs at least one step (a config check: raised as a one-line config error)."""
    if g_steps < 1:
        raise ValueError(f"g_steps={g_steps}: a synthesis round needs at least one step (give g_steps >= 1)")


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
    # the student's mode during the generator step: eval (the CMI benchmark) or train (ZSKT's, DFAD's, MB-DFKD's and
    # PRE-DFKD's own code: the student's BatchNorm normalises with batch statistics and updates its running ones)
    g_student_mode: str = choice("eval", "eval", "train")
    # student-batch options (dfkd's, for every generator method; all off by default; see GeneratorMethod):
    replay: float = 0.0  # fraction of each student batch drawn from a pool of past generated images, in [0, 1)
    pool_size: int = 8192  # images the replay pool keeps (uint8 on the device; FIFO: the oldest are replaced first)
    reuse: int = 1  # consecutive student steps of a round that one generated batch serves (>= 1)
    student_augment: str = choice("none", *AUGMENTATIONS)  # applied to every student batch, fresh and replayed
    student_padding: int = 4  # crop padding of student_augment (crop, crop_flip)
    mix: str = choice("none", *MIXES)  # mix each student batch with a shuffled copy of itself; the teacher labels it
    mix_alpha: float = 1.0  # lambda ~ Beta(mix_alpha, mix_alpha)

    def __post_init__(self) -> None:
        check_steps(self.g_steps)
        check_student_batch_options(self)


def check_student_batch_options(cfg: GeneratorConfig) -> None:
    """The student-batch options in range (a config check: raised as a one-line config error)."""
    if not 0 <= cfg.replay < 1:
        raise ValueError(f"replay={cfg.replay}: the replayed fraction of a student batch is in [0, 1)")
    if cfg.pool_size < 1:
        raise ValueError(f"pool_size={cfg.pool_size}: the replay pool keeps at least one image (give >= 1)")
    if cfg.reuse < 1:
        raise ValueError(f"reuse={cfg.reuse}: a generated batch serves at least one student step (give >= 1)")
    if cfg.student_padding < 0:
        raise ValueError(f"student_padding={cfg.student_padding}: give 0 or more")
    if not cfg.mix_alpha > 0:
        raise ValueError(f"mix_alpha={cfg.mix_alpha}: the Beta distribution needs mix_alpha > 0")


STUDENT_BATCH_OPTIONS = ("replay", "reuse", "student_augment", "mix")  # the switches; the other keys size them


def student_batch_options(cfg: GeneratorConfig) -> list[str]:
    """The student-batch options set away from their defaults, as recipe keys (``["replay=0.5", ...]``)."""
    defaults = {f.name: f.default for f in fields(GeneratorConfig)}
    return [f"{k}={getattr(cfg, k)}" for k in STUDENT_BATCH_OPTIONS if getattr(cfg, k) != defaults[k]]


class GeneratorMethod(Method):
    """A method with one persistent generator trained online against the teacher (DAFL, ZSKT, DFAD, DFQ, MB-DFKD,
    PRE-DFKD, CuDFKD).

    Builds the generator from ``cfg.generator``/``nz``/``ngf`` (its images in [0, 1]) with its Adam optimiser
    (``lr_g``, ``betas_g``), runs the generator step (:meth:`synthesize`: ``g_steps`` Adam steps on the method's
    :meth:`generator_loss`, student frozen), serves student batches from it (generator BatchNorm in
    ``cfg.sample_mode``), keeps a fixed latent batch for the sample grid and saves the optimiser with checkpoints.
    A method file then holds its algorithm only: its generator loss, and its student batches and loss if they differ.

    Student-batch options (dfkd's, off by default, where the default path is the plain fresh batch above):

    - ``replay`` (in [0, 1)): a fraction ``replay`` of each student batch is drawn uniformly, without replacement
      within a batch, from a pool of past generated images, the rest (``B - round(B * replay)``, at least one image)
      is freshly generated; fresh images join the pool after the draw. While the pool holds fewer images than the
      replayed share, the difference is generated fresh. The pool (:class:`~dfkd.data.pool.SyntheticPool`) keeps
      the last ``pool_size`` images (FIFO) as uint8 on the device, so replayed images reach the student 8-bit (an
      error of at most 1/510 on images in [0, 1]; fresh ones are not quantised). It is saved with checkpoints, so a
      resumed run goes on exactly; under DDP each rank keeps its own. CMI (Fang et al., "Contrastive Model Inversion
      for Data-Free Knowledge Distillation", IJCAI 2021, arXiv 2105.08584) and FastDFKD (Fang et al., "Up to 100x
      Faster Data-free Knowledge Distillation", AAAI 2022, arXiv 2112.06253) train the student on such a memory of
      past synthetic images.
    - ``reuse`` (>= 1): one generated batch serves ``reuse`` consecutive student steps of a round (generated at the
      round's steps 0, reuse, 2 * reuse, ...; a batch never outlives its round, so nothing is carried across a
      generator step or a checkpoint), cutting generator forwards per student step by that factor. The replayed
      share is drawn anew at every step.
    - ``student_augment`` (a :data:`~dfkd.data.AUGMENTATIONS` name, crop padding ``student_padding``): a fresh
      random augmentation of every student batch, fresh and replayed images alike, at every step (so reused batches
      differ from step to step).
    - ``mix`` (none, mixup, cutmix; lambda ~ Beta(``mix_alpha``, ``mix_alpha``)): the batch, after augmentation, is
      mixed with a shuffled copy of itself (:func:`~dfkd.data.mixing.mix_batch`). Student losses that run the teacher
      on ``batch.x`` then distil on the mixed images: the function matching of Beyer et al., "Knowledge
      distillation: A good teacher is patient and consistent", CVPR 2022 (arXiv 2106.05237).

    All their draws come from torch's global RNG on the method's device, which the engine saves with checkpoints.
    A method whose own student batches bypass :meth:`next_batch` refuses the options
    (:meth:`refuse_student_batch_options`).
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
        self.batch_options = bool(student_batch_options(cfg))
        self.replay_pool = SyntheticPool(ctx.info.image_shape, cfg.pool_size, ctx.env.device) if cfg.replay else None
        self.student_augment = build_augment(cfg.student_augment, padding=cfg.student_padding)
        self._held: Tensor | None = None  # the generated share of the student batch, reused for `reuse` steps

    def refuse_student_batch_options(self, why: str) -> None:
        """Raise a one-line config error when a student-batch option is set and ``why`` (a setting of the method,
        or its name) makes the student batches without :meth:`next_batch`, where the options would be ignored."""
        if self.batch_options:
            raise ConfigError(
                f"{self.name}: {why} makes its own student batches, so {', '.join(student_batch_options(self.cfg))} "
                "would be ignored; leave method.replay, reuse, student_augment and mix at their defaults"
            )

    def sample_z(self, n: int) -> Tensor:
        return torch.randn(n, self.cfg.nz, device=self.device)

    def generate(self, z: Tensor | int) -> Tensor:
        """Images from latents ``z`` (or from ``z`` fresh latents), counted as synthesised."""
        z = self.sample_z(z) if isinstance(z, int) else z
        self.images_synthesized += z.shape[0]
        with self.ctx.env.autocast():  # the generator is most of a student step's cost: it runs in bf16 too
            x = self.generator(z)
        return self.ctx.env.images(x)

    # -- the generator step: a template; methods supply generator_loss (and, rarely, lr and inputs) ----------------
    def generator_loss(self, x: Tensor, prog: Progress) -> tuple[Tensor, Tensor, dict[str, Any]]:
        """The method's L_G on images ``x`` (with their graph to G): (loss, teacher logits on x, terms to log)."""
        raise NotImplementedError

    def generator_lr(self, prog: Progress) -> float:
        """The generator's learning rate for this round (constant ``lr_g`` unless the method schedules it)."""
        return self.cfg.lr_g

    def generator_input(self, prog: Progress) -> Tensor:
        """The images of one generator step: G(z) on fresh latents (with the graph to G)."""
        return self.generate(self.synthesis_batch_size)

    def generator_step(self, x: Tensor, prog: Progress) -> tuple[dict[str, Any], Tensor]:
        """One Adam step of G on ``generator_loss(x)``; returns the terms to log (the teacher's class entropy on x
        among them) and the teacher's logits on x (detached)."""
        with self.ctx.env.autocast():
            loss, t, terms = self.generator_loss(x, prog)
        optimizer_step(self.opt_g, loss, self.ctx.env, self.generator)
        t = t.detach()
        logs = {k: v.detach() if torch.is_tensor(v) else v for k, v in terms.items()}
        return {"loss_g": loss.detach(), **logs, "class_entropy": class_entropy(t)}, t

    def synthesize(self, prog: Progress) -> dict[str, Any]:
        """``g_steps`` generator steps, G in train mode, the student frozen in ``cfg.g_student_mode``."""
        c, student = self.cfg, self.ctx.student
        lr = self.generator_lr(prog)
        for group in self.opt_g.param_groups:
            group["lr"] = lr
        self.generator.train()
        with frozen(student):
            student.train(c.g_student_mode == "train")
            for _ in range(c.g_steps):
                logs, _ = self.generator_step(self.generator_input(prog), prog)
        return {**logs, "lr_g": lr}

    @torch.no_grad()
    def next_batch(self, prog: Progress) -> Batch:
        """A fresh batch from the generator, its BatchNorm in ``cfg.sample_mode`` (running statistics by default)."""
        self.generator.train(self.cfg.sample_mode == "train")
        if not self.batch_options:
            return Batch(x=self.generate(self.ctx.batch_size))
        return Batch(x=self.ctx.env.images(self.student_images(prog)))

    def student_images(self, prog: Progress) -> Tensor:
        """The student batch under the student-batch options (class docstring): generated (or held) and replayed
        images, augmented, mixed; float32 in [0, 1], before the engine's memory format."""
        c, n, pool = self.cfg, self.ctx.batch_size, self.replay_pool
        if self._held is None or prog.step_in_round % c.reuse == 0:
            replayed = min(round(n * c.replay), len(pool), n - 1) if pool is not None else 0
            self._held = self.generate(n - replayed)
            past = pool.sample(replayed) if replayed else None  # drawn before this batch joins the pool
            if pool is not None:
                pool.add(self._held)
        else:
            replayed = n - self._held.shape[0]
            past = pool.sample(replayed) if replayed else None
        x = self._held if past is None else torch.cat([self._held, past])
        return mix_batch(self.student_augment(x), c.mix, c.mix_alpha)

    def checkpoint_state(self) -> dict:
        return {"opt_g": self.opt_g.state_dict()}

    def load_checkpoint_state(self, state: dict) -> None:
        self.opt_g.load_state_dict(state["opt_g"])

    @torch.no_grad()
    def preview(self, n: int) -> Tensor:
        self.generator.eval()
        return self.generator(self.preview_z[:n])


@dataclass
class PoolConfig(MethodConfig):
    """The knobs shared by the inversion methods (:class:`PoolMethod`); methods override the defaults."""

    g_steps: int = 200  # optimisation steps per round (one pool batch per round)
    synthesis_batch_size: int | None = None  # images per round; null = train.batch_size
    pool_size: int | None = None  # images kept; null = all of them (the references never prune)
    # student batches: pool draws through this augmentation (the dataset's training transform in the references)
    augment: str = "crop_flip"
    padding: int = 4
    T: float = 20.0  # KD temperature of the student loss

    def __post_init__(self) -> None:
        check_steps(self.g_steps)


class PoolMethod(Method):
    """A method that inverts the teacher into batches of images and trains the student on a pool of them (CMI,
    DeepInversion): each round's :meth:`synthesize` optimises one batch and :meth:`add_to_pool` keeps it; student
    batches are uniform draws from the pool (uint8 on the device), augmented by ``cfg.augment``."""

    def __init__(self, cfg: Any, ctx: Ctx):
        super().__init__(cfg, ctx)
        self.synthesis_batch_size = cfg.synthesis_batch_size or ctx.batch_size
        self.pool = SyntheticPool(ctx.info.image_shape, cfg.pool_size, ctx.env.device)
        self.augment = build_augment(cfg.augment, padding=cfg.padding)

    def add_to_pool(self, x: Tensor) -> dict[str, Any]:
        """Keep a synthesised batch (images in [0, 1]); returns its share of the round's log."""
        self.pool.add(x)
        self.images_synthesized += x.shape[0]
        return {"pool_size": len(self.pool)}

    @torch.no_grad()
    def next_batch(self, prog: Progress) -> Batch:
        return Batch(x=self.ctx.env.images(self.augment(self.pool.sample(self.ctx.batch_size))))

    def preview(self, n: int) -> Tensor | None:
        return self.pool.latest(n) if len(self.pool) else None


@dataclass
class MomentumInversionConfig(PoolConfig):
    """The synthesis loss FastDFKD and NAYER share (their reference code shares its hooks and criteria)."""

    bn: float = 10.0  # BatchNorm statistics against the running ones, blended with a moving average (below)
    bn_momentum: float = 0.9
    oh: float = 0.5  # CE against the labels the batch was synthesised for
    adv: float = 1.33  # decision-masked adversarial KL (student against teacher) at tau_adv
    tau_adv: float = 1.0
    # the view the loss is scored on (the references: crop with 4 px padding + mirror, per sample)
    synthesis_view: str = "crop_flip"
    synthesis_padding: int = 4


class MomentumInversionMethod(PoolMethod):
    """A pool method whose synthesis loss is bn * L_bn^mmt + oh * CE(t, y) + adv * L_adv (FastDFKD, NAYER), with
    L_bn^mmt the BatchNorm-statistics loss against the batch statistics blended with their moving average over
    earlier synthesis batches (:class:`~dfkd.losses.MomentumBNStats`, checkpointed with the method)."""

    def __init__(self, cfg: Any, ctx: Ctx):
        super().__init__(cfg, ctx)
        self.bn_stats = self.bn_statistics(cfg.bn, cfg.bn_momentum)
        self.view = build_augment(cfg.synthesis_view, padding=cfg.synthesis_padding)

    def inversion_loss(self, x: Tensor, y: Tensor, adversarial: bool) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """The loss on the synthesis view of images ``x`` made for labels ``y``: (loss, teacher logits, terms)."""
        c = self.cfg
        x = self.view(x)
        t, loss_bn = self.teacher_with_bn(x, self.bn_stats)
        loss_oh = onehot_ce(t, y)
        loss_adv = adv_masked_kl(self.ctx.student(x), t, c.tau_adv) if adversarial else torch.zeros_like(loss_bn)
        loss = c.bn * loss_bn + c.oh * loss_oh + c.adv * loss_adv
        return loss, t, {"loss_bn": loss_bn, "loss_oh": loss_oh, "loss_adv": loss_adv}

    def update_bn_statistics(self) -> None:
        """Fold the last synthesis step's statistics into the moving averages (averaged across ranks)."""
        if self.bn_stats is not None:
            self.bn_stats.update()
            self.ctx.env.average_buffers(self.bn_stats)


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


def optimizer_step(
    optimizer: torch.optim.Optimizer, loss: Tensor, env: Runtime, module: nn.Module | None = None
) -> None:
    """zero_grad, backward, step; for a persistent ``module`` (one that lives across rounds), gradients and BN
    statistics are averaged across ranks so that it stays identical on every rank under DDP."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if module is not None:
        env.all_reduce_grads(module)
    optimizer.step()
    if module is not None:
        env.average_buffers(module)
