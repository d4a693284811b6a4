"""ZSKT: Zero-shot Knowledge Transfer via Adversarial Belief Matching.

Micaelli & Storkey, NeurIPS 2019 (arXiv 1905.09768). Reference code followed by default: the CMI benchmark's
re-implementation, which produced the numbers of the CuDFKD paper's tables, github.com/zju-vipa/CMI @ 9e79fa9,
``datafree/synthesis/generative.py`` (``GenerativeSynthesizer``: the generator step ``synthesize`` L52-75, the
student's batches ``sample`` L78-82), ``datafree_kd.py`` (method ``zskt``: set-up L255-265, the student step
``train`` L369-400) and ``scripts/zskt/zskt_cifar10_wrn402_wrn161.sh`` (the settings). The original code
(github.com/polo5/ZeroShotKnowledgeTransfer @ 492cbff, ``solver.py``: the loop ``run`` L78-178, the losses L197-242
with ``F.kl_div``'s default element mean at L215; ``models/generator.py``) is ``loader: shared``, ``beta: 250``,
``kl_reduction: mean`` with ``generator: zskt`` (recipe ``zskt_original-*``).

An adversarial game on the teacher-student KL: the generator seeks images where the student's beliefs differ most
from the teacher's, the student matches the teacher there, optionally also matching its spatial attention.

Algorithm (one round; the engine runs ``rounds_per_epoch`` rounds per epoch):

1. Generator steps (G train mode; T eval mode; S frozen in ``g_student_mode``), ``g_steps`` (n_G) times:
   L_G = -adv * KL_T(T(x) || S(x)),  x = G(z)
   with z ~ N(0, I) fresh at every step (``loader: fresh``, the benchmark), or one z kept for the whole round
   (``loader: shared``, the original's "learnable loader").
2. Student steps (``kd_steps``, n_S):
   L_S = KL_T(T(x) || S(x)) + beta * sum_j mean((a(A^S_j) - a(A^T_j))^2)
   with a(A) the L2-normalised channel mean of A^2 of the j-th network stage (attention transfer, off by default).
   ``loader: fresh``: a fresh batch x = G(z) per step (G eval mode). ``loader: shared``: every step of the round
   gets the same batch G(z) from the round's z, made once after the generator steps, and the teacher's outputs on
   it are computed once.

Deviations:
- The temperature is the config's ``T`` (default 1), used by both players. The CMI benchmark passes ``--T 20`` but
  silently uses T = 1 (``zju-vipa/CMI@9e79fa9:datafree_kd.py:259`` rebinds the criterion, built with ``--T`` at
  L239, to ``KLDiv()``); the default reproduces what it ran.
- The benchmark has no attention term; ``beta`` adds the original's. Its feature maps are captured by forward
  hooks on named modules (``at_teacher_layers``, ``at_student_layers``; empty = the stage outputs ``block1..3``
  of WRNs, ``layer1..4`` of ResNets, or else the last feature map larger than 1x1 of each network). Maps of different
  size are compared at the smaller size (the original's WRN pairs always match).
- ``loader: shared`` draws the round's student batch once; the original re-runs the (frozen) generator on the same
  z at every student step, which yields the same images.
- ``lr_g_schedule: cosine`` anneals the generator's rate over the run per round; the original anneals both players
  per pseudo-batch, and the engine anneals the student per epoch.
- The original generator (``generator: zskt``) emits normalised-space images; they are mapped to [0, 1] with the
  dataset's mean and std and clamped to the valid image range (clamped pixels pass no gradient).
- The student's mode during the generator step is ``g_student_mode``: eval by default (the benchmark), train in the
  ``zskt_original`` recipes (the original never switches its student out of train mode, so its BatchNorm normalises
  the generator's batch with batch statistics and updates its running ones).
- Under DDP the persistent generator's gradients are all-reduced before each step (and before ``grad_clip_g``), so
  it stays identical on every rank.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from dfkd.config import choice
from dfkd.errors import ConfigError
from dfkd.hooks import OutputHooks
from dfkd.losses import adv_unmasked_kl, attention_transfer, kd_kl
from dfkd.methods.base import (
    Batch,
    Ctx,
    GeneratorConfig,
    GeneratorMethod,
    Progress,
    frozen,
    refuse_torchscript_teacher,
)
from dfkd.methods.registry import METHODS
from dfkd.models import Normalized

log = logging.getLogger(__name__)

# Stage outputs used for attention transfer when no layers are named: WRN groups (ZSKT), then ResNet stages.
STAGES = (("block1", "block2", "block3"), ("layer1", "layer2", "layer3", "layer4"))


def output_hooks(model: nn.Module, names: list[str]) -> OutputHooks:
    """Hooks that keep the outputs of the named modules of ``model`` (inside its normalising wrapper)."""
    net = model.net if isinstance(model, Normalized) else model
    modules = dict(net.named_modules())
    unknown = [n for n in names if n not in modules or not n]
    if unknown:
        raise ConfigError(f"attention-transfer layer(s) {unknown} not found in {type(net).__name__}")
    return OutputHooks([modules[n] for n in names])


@torch.no_grad()
def last_feature_map(model: nn.Module, image_shape: tuple[int, ...], device: torch.device) -> str:
    """Name of the module that outputs the network's last feature map larger than 1x1 (found by one dry forward)."""
    net = model.net if isinstance(model, Normalized) else model
    found: list[str] = []

    def record(name: str):
        def hook(_module: nn.Module, _inputs: tuple[Tensor, ...], out: Tensor) -> None:
            if torch.is_tensor(out) and out.dim() == 4 and out.shape[-2] * out.shape[-1] > 1:
                found.append(name)

        return hook

    handles = [m.register_forward_hook(record(name)) for name, m in net.named_modules() if name]
    try:
        with frozen(net):  # eval mode: the dry forward must not touch BatchNorm running statistics
            net(torch.zeros(2, *image_shape, device=device))
    finally:
        for handle in handles:
            handle.remove()
    if not found:
        raise ConfigError(f"{type(net).__name__} has no feature map larger than 1x1; set method.beta=0")
    return found[-1]


def attention_layers(teacher: nn.Module, student: nn.Module, image_shape, device) -> tuple[list[str], list[str]]:
    """The default attention-transfer pairs: shared stage names, else the last feature map of each network."""
    t_names = {n for n, _ in (teacher.net if isinstance(teacher, Normalized) else teacher).named_modules()}
    s_names = {n for n, _ in (student.net if isinstance(student, Normalized) else student).named_modules()}
    for stages in STAGES:
        if set(stages) <= t_names and set(stages) <= s_names:
            return list(stages), list(stages)
    return [last_feature_map(teacher, image_shape, device)], [last_feature_map(student, image_shape, device)]


@dataclass
class ZSKTConfig(GeneratorConfig):
    name: str = "zskt"
    # generator (the CMI benchmark: LargeGenerator, nz 256, PyTorch's default init, Adam betas (0.5, 0.999);
    # the original: generator zskt, nz 100, Adam's default betas, cosine annealing, grad-norm clipping at 5)
    lr_g_schedule: str = choice("constant", "constant", "cosine")
    grad_clip_g: float | None = None  # max global grad norm of the generator; null = no clipping
    loader: str = choice("fresh", "fresh", "shared")
    adv: float = 1.0  # weight of the generator's adversarial KL
    # the KL of both players: temperature and reduction (batchmean = the benchmark; mean = element mean, the original)
    T: float = 1.0
    kl_reduction: str = choice("batchmean", "batchmean", "mean")
    # attention transfer (the original: beta 250 on WRN groups 1..3)
    beta: float = 0.0
    at_teacher_layers: list[str] = field(default_factory=list)  # module names in the teacher; empty = default stages
    at_student_layers: list[str] = field(default_factory=list)  # the matching student modules, same count


@METHODS.register("zskt")
class ZSKT(GeneratorMethod):
    name = "zskt"
    Config = ZSKTConfig

    def __init__(self, cfg: ZSKTConfig, ctx: Ctx):
        super().__init__(cfg, ctx)
        if cfg.loader == "shared":
            self.refuse_student_batch_options("loader=shared")
        if cfg.grad_clip_g:  # after the DDP all-reduce of optimizer_step, right before Adam's step
            self.opt_g.register_step_pre_hook(self._clip_generator)
        self.t_hooks = self.s_hooks = None
        if cfg.beta > 0:
            refuse_torchscript_teacher(ctx.teacher, self.name, "attention transfer", "method.beta=0")
            t_layers, s_layers = cfg.at_teacher_layers, cfg.at_student_layers
            if len(t_layers) != len(s_layers):
                raise ConfigError(
                    f"method.at_teacher_layers and method.at_student_layers name {len(t_layers)} and {len(s_layers)} "
                    "modules; name the same number (or none, for the default stages)"
                )
            if not t_layers:
                t_layers, s_layers = attention_layers(ctx.teacher, ctx.student, ctx.info.image_shape, ctx.env.device)
                log.info("zskt: attention transfer between teacher %s and student %s", t_layers, s_layers)
            self.at_layers = (t_layers, s_layers)
            self.t_hooks = self.track(output_hooks(ctx.teacher, t_layers))
            self.s_hooks = self.track(output_hooks(ctx.student, s_layers))
        self._round: tuple[Tensor, Tensor, list[Tensor]] | None = None  # loader=shared: images, teacher logits, maps
        self._z: Tensor | None = None  # loader=shared: the round's latents

    def _clip_generator(self, *_args) -> None:
        nn.utils.clip_grad_norm_(self.generator.parameters(), self.cfg.grad_clip_g)

    def _teacher(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        """Teacher logits on x (no gradient) and, with attention transfer, its hooked feature maps."""
        with torch.no_grad():
            if self.t_hooks is None:
                return self.ctx.teacher(x), []
            with self.t_hooks.capture():
                t = self.ctx.teacher(x)
            return t, self.t_hooks.pop()

    # 1. generator steps: maximise KL(T || S)
    def generator_loss(self, x: Tensor, prog: Progress) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        c = self.cfg
        t = self.ctx.teacher(x)
        loss_adv = adv_unmasked_kl(self.ctx.student(x), t, c.T, reduction=c.kl_reduction)
        return c.adv * loss_adv, t, {"loss_adv": loss_adv}

    def generator_lr(self, prog: Progress) -> float:
        if self.cfg.lr_g_schedule == "constant":
            return self.cfg.lr_g
        done = (prog.epoch * prog.rounds_per_epoch + prog.round) / (prog.epochs * prog.rounds_per_epoch)
        return self.cfg.lr_g * 0.5 * (1.0 + math.cos(math.pi * done))

    def generator_input(self, prog: Progress) -> Tensor:
        return self.generate(self._z if self._z is not None else self.synthesis_batch_size)

    def synthesize(self, prog: Progress) -> dict[str, Tensor]:
        c = self.cfg
        self._round = None
        # the learnable loader's z, kept for the round's n_G + n_S steps
        self._z = self.sample_z(self.synthesis_batch_size) if c.loader == "shared" else None
        logs = super().synthesize(prog)
        if self._z is not None:  # the round's student batch, from the just-updated generator
            with torch.no_grad():
                self.generator.train(c.sample_mode == "train")
                x = self.generate(self._z)
            with self.ctx.env.autocast():
                self._round = (x, *self._teacher(x))
        return logs

    # 2. student batches
    def next_batch(self, prog: Progress) -> Batch:
        if self._round is not None:
            return Batch(x=self._round[0])
        return super().next_batch(prog)

    def student_loss(self, batch: Batch, student: torch.nn.Module, prog: Progress) -> dict[str, Tensor]:
        c = self.cfg
        if self._round is not None and batch.x is self._round[0]:
            t, t_maps = self._round[1], self._round[2]
        else:
            t, t_maps = self._teacher(batch.x)
        if self.s_hooks is None:
            s, s_maps = student(batch.x), []
        else:
            with self.s_hooks.capture():
                s = student(batch.x)
            s_maps = self.s_hooks.pop()
        loss_kd = kd_kl(s, t, c.T, reduction=c.kl_reduction)
        loss_at = attention_transfer(s_maps, t_maps) if c.beta > 0 else loss_kd.new_zeros(())
        return {"loss": loss_kd + c.beta * loss_at, "loss_kd": loss_kd.detach(), "loss_at": loss_at.detach()}
