"""AdaDFKD: Exploring Adaptive Inter-Sample Relationship in Data-Free Knowledge Distillation.

Li et al., Neural Networks 2024 (doi 10.1016/j.neunet.2024.106386; the title as the reference README gives it).
Reference code: github.com/ljrprocc/DFKD @ cd281c4, ``datafree/synthesis/adadfkd.py`` (AdaSynthesizer; the generator
step is ``synthesize`` L111-180), ``datafree/utils/_utils.py`` (``difficulty_mining`` L606, ``MoCo`` L630),
``datafree_kd.py`` (the loop and the hardness schedule, L659-682; the student step ``train`` L739) and
``scripts/adadfkd/*.sh``. The successor of CuDFKD (same authors, same loop): this file adds its two InfoNCE terms to
:class:`~dfkd.methods.cudfkd.CuDFKD`.

Algorithm (one round; the engine runs ``rounds_per_epoch`` rounds per epoch, 40 in every reference script):

1. Generator step (G train mode; T, S eval mode), ``g_steps`` times, on x = G(z), z ~ N(0, I):
   (t, f_T) = T(x), (s, f_S) = S(x) with f the penultimate (pooled) feature;
   L_G = lmda_ent * H(mean softmax(t / T)) + adv(e) * L_adv + oh * CE(t, argmax t) + act * L_act + bn * L_bn
         + hard * L_R2M(f_T, f_S; Q, h(e))
   with L_adv = -KL_3(t || s), unmasked (CuDFKD masks it to the samples S and T agree on), and the relationship
   refinement term L_R2M: InfoNCE of the query f_T/|f_T| (gradient to G through the teacher) against its positive
   key k = sg(f_S)/|f_S| and a ring of negatives taken from a queue Q of K past keys: per sample, the K
   similarities sorted ascending, ranks [floor(h K), floor((h + length) K)) kept. Then the B keys are enqueued.
   The hardness h(e) is 0 until epoch floor(E b), then grows linearly to 1 - length at floor(E b) + floor(E (f - b))
   (b, f = ``begin_fraction``, ``end_fraction``): the ring slides from the easiest negatives to the hardest.
2. Student steps (``kd_steps``), each on a fresh batch x = G(z) with G in eval mode:
   l = D(S(x), T(x)) + s_nce * InfoNCE_batch(f_T, f_S)  (in-batch: sample i's teacher feature must pick sample i's
   student feature; teacher features without gradient); lambda_t = lambda_0 + slope * t;  L_S = v*(l; lambda_t) * l.
3. The adversarial ramp of CuDFKD (constant in every reference script: ``grad_adv 0``).

Deviations:
- The queue is a wrap-around ring that takes any batch size. The reference asserts ``K % B == 0``, so its flagship
  script (CIFAR-10 ResNet-34 -> ResNet-18: ``--N_neg 4096``, batch 768; 4096 mod 768 = 256) crashes at the first
  generator step as shipped; its README number came from other settings. The queue's pointer is a buffer saved with
  every checkpoint (the reference saves the queue alone, and only with a new best), so a run resumes exactly.
- Feature widths: when the teacher's and the student's penultimate features differ in width, the reference passes
  the student's through a fresh, untrained, randomly initialised ``Linear`` on every call (generator and student
  steps alike). Here ``projection: error`` (default) refuses such a pair with a one-line config error, ``fixed``
  draws one such projection (PyTorch's ``Linear`` init, from the run's seeded generator) at the start and keeps it
  as a buffer for the whole run, and ``resample`` is the reference's behaviour. None of the README's headline pairs
  needs one (ResNet-34/18 512 = 512, WRN-40-2/16-2 128 = 128).
- ``nce_requires_spl: true`` keeps the reference's rule that the student's InfoNCE is added only with self-paced
  learning on (``curr_option`` other than none; the reference computes it and drops it otherwise); ``false`` adds it
  always. With ``spl_granularity: sample`` it is per sample, like the distillation term (the reference has batch
  weights only).
- The adversarial ramp is CuDFKD's closed form. The reference's ``get_alpha_adv`` is one ``grad_adv`` higher after
  epoch floor(E f): from that epoch on it returns (floor(E f) - floor(E b)) increments
  (``ljrprocc/DFKD@cd281c4:datafree/utils/_utils.py:596-598``), where CuDFKD's per-epoch accumulation stops one
  short (``ljrprocc/DataFree@bf3096b:datafree_kd.py:698-700`` adds only while epoch < floor(E f)). No headline
  script ramps (``grad_adv 0``).
- Under DDP the keys of all ranks are gathered before they are enqueued, so every rank holds
  the same queue, as the reference's ``concat_all_gather`` does; its shuffle / unshuffle of the keys across ranks is
  an identity here (the keys come from no encoder with batch statistics) and is not ported. The persistent
  generator's gradients are all-reduced (CuDFKD).
- Similarities are float32 even under bf16 autocast. A hardness ramp shorter than one epoch jumps in one epoch (the
  reference divides by zero).
- The student's parameters are frozen during the generator step (the reference leaves their gradients on and
  clears them before the student's step: no effect on G). The features come from forward hooks on the networks'
  classifier input (``classifier_module``), not from a changed ``forward``.
- Dead code of the reference is not ported: ``mu``, ``neg``, ``mode``, ``debug``, ``--memory`` and its
  ``FeaturePool``, the ``warmup`` argument, the best-batch tracking of ``synthesize`` (only read with
  ``--memory``), and the column-softmax ``loss_s_t`` that ``difficulty_mining`` computes and discards.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from dfkd.config import choice
from dfkd.errors import ConfigError
from dfkd.hooks import InputHook
from dfkd.losses import activation_loss, adv_js, adv_unmasked_kl, batch_entropy, onehot_ce
from dfkd.losses.infonce import FeatureQueue, batch_infonce, hardness, r2m_loss
from dfkd.losses.precision import upcast
from dfkd.methods.base import Batch, Ctx, Progress, refuse_torchscript_teacher
from dfkd.methods.cudfkd import CuDFKD, CuDFKDConfig, spl_lambda, spl_weight
from dfkd.methods.registry import METHODS
from dfkd.models import classifier_module


@dataclass
class AdaDFKDConfig(CuDFKDConfig):
    """Defaults: the CIFAR-10 ResNet-34 -> ResNet-18 script (``adadfkd_cifar10_resnet34_resnet18.sh``)."""

    name: str = "adadfkd"
    # CuDFKD's knobs at the script's values (adversarial KL unmasked, constant weight 1; KD at T = 20)
    adv: float = 1.0
    grad_adv: float = 0.0
    loss: str = choice("kl", "l1", "kl", "l2")
    lambda_0: float = 2.2
    # R2M (generator side): weight, ring width (fraction of the queue), temperature, queue size
    hard: float = 0.1
    length: float = 0.9
    tau_nce: float = 0.07  # the reference's --tau (R2M and the student's InfoNCE)
    n_neg: int = 4096
    # the student's in-batch InfoNCE
    s_nce: float = 0.1
    nce_requires_spl: bool = True  # the reference adds it only when curr_option != none
    # teacher and student features of different widths: refuse | one fixed random projection | a fresh one per call
    projection: str = choice("error", "error", "fixed", "resample")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.length <= 1:
            raise ValueError(f"length={self.length}: the ring's width is a fraction of the queue (0 < length <= 1)")
        if self.hard < 0 or self.s_nce < 0:
            raise ValueError(f"hard={self.hard}, s_nce={self.s_nce}: the InfoNCE weights must be >= 0")
        if self.tau_nce <= 0:
            raise ValueError(f"tau_nce={self.tau_nce}: give a temperature > 0")
        if self.n_neg < 1:
            raise ValueError(f"n_neg={self.n_neg}: the queue needs at least one column (give n_neg >= 1)")


@METHODS.register("adadfkd")
class AdaDFKD(CuDFKD):
    name = "adadfkd"
    Config = AdaDFKDConfig

    def __init__(self, cfg: AdaDFKDConfig, ctx: Ctx):
        # before CuDFKD's BN check, whose advice (method.bn=0) would not be enough here
        refuse_torchscript_teacher(ctx.teacher, self.name, "contrastive loss on penultimate features", None)
        super().__init__(cfg, ctx)
        device = ctx.env.device
        # the teacher's penultimate feature (CuDFKD's hook when its activation loss made one; the same layer)
        self.teacher_features = self.feature_hook or self.track(InputHook(classifier_module(ctx.teacher)))
        self.student_features = self.track(InputHook(classifier_module(ctx.student)))
        dim_t = classifier_module(ctx.teacher).in_features
        dim_s = classifier_module(ctx.student).in_features
        self.resample = False
        if dim_t != dim_s:
            if cfg.projection == "error":
                raise ConfigError(
                    f"method.projection: the teacher's penultimate features are {dim_t}-d and the student's "
                    f"{dim_s}-d; set method.projection=fixed (one random projection for the run) or resample "
                    f"(the reference: a fresh one on every call)"
                )
            self.resample = cfg.projection == "resample"
            if not self.resample:
                weight, bias = random_linear(dim_s, dim_t, device)
                self.register_buffer("proj_weight", weight)
                self.register_buffer("proj_bias", bias)
        self.dims = (dim_t, dim_s)
        self.queue = FeatureQueue(dim_t, cfg.n_neg, device) if cfg.hard > 0 else None

    def hardness(self, prog: Progress) -> float:
        c = self.cfg
        return hardness(prog.epoch, prog.epochs, c.begin_fraction, c.end_fraction, c.length)

    def project(self, f_s: Tensor) -> Tensor:
        """The student's features at the teacher's width (unchanged when the widths agree)."""
        dim_t, dim_s = self.dims
        if dim_t == dim_s:
            return f_s
        if self.resample:
            return F.linear(f_s, *random_linear(dim_s, dim_t, f_s.device))
        return F.linear(f_s, self.proj_weight, self.proj_bias)

    # 1. generator step: CuDFKD's terms (the adversarial KL unmasked) + hard * R2M
    def generator_loss(self, x: Tensor, prog: Progress) -> tuple[Tensor, Tensor, dict[str, Tensor | float]]:
        c = self.cfg
        adv = self.adv_weight(prog)
        t, loss_bn = self.teacher_with_bn(x, self.bn_hooks)
        f_t = self.teacher_features.pop()
        entropy = batch_entropy(t, c.ent_T if c.ent_T is not None else c.T)
        loss_oh = onehot_ce(t)
        loss_act = activation_loss(f_t) if c.act != 0 else torch.zeros_like(loss_bn)
        loss_adv = t.new_zeros(())
        if adv > 0 or self.queue is not None:
            s = self.ctx.student(x)
            f_s = self.student_features.pop()
            if adv > 0:
                loss_adv = adv_unmasked_kl(s, t, c.tau_adv) if c.adv_type == "kl" else adv_js(s, t, c.tau_adv)
        loss = c.lmda_ent * entropy + adv * loss_adv + c.oh * loss_oh + c.act * loss_act + c.bn * loss_bn
        logs = {"entropy": entropy, "loss_oh": loss_oh, "loss_bn": loss_bn, "loss_adv": loss_adv, "adv_weight": adv}
        if self.queue is not None:
            h = self.hardness(prog)
            keys = F.normalize(upcast(self.project(f_s.detach())), dim=1)
            # the loss reads a copy: the queue is written below, before this graph's backward
            loss_r2m = r2m_loss(f_t, keys, self.queue.queue.clone(), h, c.length, c.tau_nce)
            loss = loss + c.hard * loss_r2m
            self.queue.push(self.ctx.env.all_gather(keys))  # every rank's keys: one queue on all ranks
            logs.update(loss_r2m=loss_r2m, hardness=h)
        return loss, t, logs

    # 2. the self-paced student loss on D(s, t) + s_nce * in-batch InfoNCE
    def student_loss(self, batch: Batch, student: torch.nn.Module, prog: Progress) -> dict[str, Tensor]:
        c = self.cfg
        with torch.no_grad():
            t = self.ctx.teacher(batch.x)
        f_t = self.teacher_features.pop()
        s = student(batch.x)
        f_s = self.student_features.pop()
        per_sample = c.spl_granularity == "sample"
        difficulty = self._difficulty(s, t, per_sample=per_sample)
        logs: dict[str, Tensor] = {}
        if c.s_nce > 0 and (c.curr_option != "none" or not c.nce_requires_spl):
            nce = batch_infonce(f_t, self.project(f_s), c.tau_nce, reduction="none" if per_sample else "mean")
            difficulty = difficulty + c.s_nce * nce
            logs["loss_nce"] = nce.detach().mean()
        lam = spl_lambda(prog.step, c.lambda_0, self.lambda_slope)
        v = spl_weight(difficulty.detach(), lam, c.curr_option, c.spl_floor)
        loss = (v * difficulty).mean()
        return {"loss": loss, "difficulty": difficulty.detach().mean(), "spl_weight": v.mean(), "lambda": lam, **logs}


def random_linear(dim_in: int, dim_out: int, device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
    """Weight ``[dim_out, dim_in]`` and bias of a freshly initialised ``nn.Linear`` (both U(-1/sqrt(dim_in),
    1/sqrt(dim_in)), PyTorch's default), drawn from the global generator: the reference's throw-away projection."""
    bound = 1.0 / math.sqrt(dim_in)
    weight = torch.empty(dim_out, dim_in, device=device).uniform_(-bound, bound)
    bias = torch.empty(dim_out, device=device).uniform_(-bound, bound)
    return weight, bias
