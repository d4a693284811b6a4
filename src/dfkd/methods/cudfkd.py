"""CuDFKD: Dynamic Data-Free Knowledge Distillation by Easy-to-Hard Learning Strategy.

Li et al., Information Sciences 2023 (arXiv 2208.13648; v1 "How to Teach: Learning Data-Free Knowledge
Distillation from Curriculum"). Reference code: github.com/ljrprocc/DataFree @ bf3096b,
``datafree/synthesis/cudfkd.py`` (ProbSynthesizer; the generator step is ``synthesize``, L74-160), ``datafree_kd.py``
(the epoch loop and the adversarial ramp, L672-700; the student step with the SPL weights, ``train``, L756-837) and
``datafree/datasets/utils.py`` (``curr_v`` L26-43, ``lambda_scheduler`` L46-51).

Algorithm (one round; the engine runs ``rounds_per_epoch`` rounds per epoch, 40 in every reference script):

1. Generator step (G train mode; T, S eval mode), ``g_steps`` times:
   x = G(z), z ~ N(0, I);  t = T(x);  s = S(x) (only when the adversarial weight is > 0)
   L_G = lmda_ent * H(mean softmax(t / T)) + adv(e) * L_adv(s, t) + oh * CE(t, argmax t) + act * L_act + bn * L_bn
   with lmda_ent = -20 (maximise batch entropy = balanced classes) and L_adv the decision-masked KL at T=3.
2. Student steps (``kd_steps``, 10 in every script), each on a fresh batch x = G(z) with G in eval mode:
   l = D(S(x), T(x)) (L1 or KL_T);  lambda_t = lambda_0 + slope * t  (t = global student step);
   v = v*(l; lambda_t) (self-paced weight, closed form, no gradient);  L_S = v * l.
3. Curriculum on the generator: adv(e) ramps linearly from ``adv`` by ``grad_adv`` per epoch between
   ``begin_fraction`` and ``end_fraction`` of the run (closed form of the reference's per-epoch increment).

Deviations:
- Self-paced weighting is batch-level by default, as in the released code (one v per batch); per-sample weighting
  (the 2022-09 .. 2023-01 code and the paper's reading) is ``spl_granularity: sample``.
- ``loss: l2`` with SPL uses the batch-mean squared error and one batch weight; the reference weights every
  element and sums them (``MSELoss(reduction='none')`` at ``ljrprocc/DataFree@bf3096b:datafree_kd.py:411``,
  ``(v * real_loss_s).sum()`` at L813). No reference script uses l2.
- The entropy temperature is its own knob (``ent_T``; null = ``T``, the reference's single ``--T``).
- The ramp is computed in closed form from the epoch (resumable), equal to the reference's accumulation.
- The reference's dead machinery is not ported: multi-level "feature" generation (L forced to 1), ``--memory``
  (writes a pool nobody reads), ``--kd_steps``/``--g_steps`` (overridden by the interval lists), ``--cond``.
- ``lambda_slope: null`` keeps the reference's hard-coded rule (1e-4 on cifar10, 2e-5 on every other dataset);
  set it explicitly for other datasets.
- ``spl_floor`` (default 0, the reference) puts a lower bound on the self-paced weight. With 0, a student whose
  loss once jumps far above lambda (a diverged step: KL x T^2 in the thousands) gets weight exactly 0 on every later
  batch and never trains again (BENCHMARKS.md: a LeNet-5-half pushed there got weight 0 in its second epoch and
  stayed at chance); a small floor keeps hard batches down-weighted, as the curriculum intends, but never
  silenced. The Fashion-MNIST demo recipe sets it.
- Under DDP the persistent generator's gradients are all-reduced before each step, so it stays identical on every
  rank (the reference's ``prepare_model`` divides the batch size by the GPU count on every call instead:
  ``ljrprocc/DataFree@bf3096b:datafree_kd.py:274`` and L280, called for the student, the teacher and each
  generator at L318-319 and L436).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from dfkd.config import choice
from dfkd.losses import activation_loss, adv_js, adv_masked_kl, batch_entropy, kd_kl, kd_l1, kd_mse, onehot_ce
from dfkd.methods.base import Batch, Ctx, GeneratorConfig, GeneratorMethod, Progress
from dfkd.methods.registry import METHODS

# -- the curriculum as pure functions (golden-tested against the reference) ------------------------------------------


def spl_weight(loss: Tensor, lam: float, kind: str, floor: float = 0.0) -> Tensor:
    """Closed-form self-paced weight v*(l; lambda) (reference ``curr_v``).

    hard: [l < lambda];  soft: [l < lambda] * (1 - l / lambda);  log: (1 + e^-lambda) / (1 + e^(l - lambda))
    (the logistic implicit SP-regulariser of Fan et al., AAAI 2017);  none: 1.
    ``floor`` > 0 keeps every weight at least that large (dfkd's option; the reference has 0), so a loss far above
    lambda is down-weighted but never silenced.
    """
    if kind == "none":
        return torch.ones_like(loss)
    if kind == "hard":
        v = (loss < lam).to(loss.dtype)
    elif kind == "soft":
        v = (loss < lam).to(loss.dtype) * (1.0 - loss / lam)
    elif kind == "log":
        v = (1.0 + math.exp(-lam)) / (1.0 + torch.exp(loss - lam))
    else:
        raise ValueError(f"unknown self-paced weighting {kind!r}")
    return v.clamp_min(floor) if floor > 0 else v


def spl_lambda(step: int, lambda_0: float, slope: float) -> float:
    """The SPL age parameter at global student step ``step``: lambda_0 + slope * step (reference lambda_scheduler)."""
    return lambda_0 + slope * step


def adv_weight(epoch: int, epochs: int, adv0: float, grad_adv: float, begin: float, end: float) -> float:
    """Adversarial weight in force during 0-based ``epoch``.

    The reference adds ``grad_adv`` after every epoch e with floor(E*begin) < e < floor(E*end); in closed form
    adv0 + grad_adv * max(0, min(epoch, floor(E*end)) - floor(E*begin) - 1).
    """
    first, last = math.floor(epochs * begin), math.floor(epochs * end)
    return adv0 + grad_adv * max(0, min(epoch, last) - first - 1)


# -- the method ---------------------------------------------------------------------------------------------------


@dataclass
class CuDFKDConfig(GeneratorConfig):
    name: str = "cudfkd"
    # generator (G-Cu = the CMI LargeGenerator at nz 512 for CIFAR)
    nz: int = 512
    betas_g: list[float] = field(default_factory=lambda: [0.9, 0.99])
    # generator loss
    lmda_ent: float = -20.0
    oh: float = 1.0
    act: float = 0.0
    bn: float = 1.0
    adv_type: str = choice("kl", "kl", "js")
    tau_adv: float = 3.0
    # adversarial ramp (generator-side curriculum)
    adv: float = 0.0
    grad_adv: float = 0.5
    begin_fraction: float = 0.25
    end_fraction: float = 0.75
    # student loss and self-paced curriculum
    loss: str = choice("l1", "l1", "kl", "l2")
    T: float = 20.0  # KD temperature (loss=kl) and, unless ent_T is set, the entropy temperature
    ent_T: float | None = None
    curr_option: str = choice("log", "log", "hard", "soft", "none")
    spl_granularity: str = choice("batch", "batch", "sample")
    lambda_0: float = 2.0
    lambda_slope: float | None = None  # null = 1e-4 on cifar10, else 2e-5 (the reference's rule)
    spl_floor: float = 0.0  # lower bound on the self-paced weight (0 = the reference: a huge loss gets weight 0)


@METHODS.register("cudfkd")
class CuDFKD(GeneratorMethod):
    name = "cudfkd"
    Config = CuDFKDConfig

    def __init__(self, cfg: CuDFKDConfig, ctx: Ctx):
        super().__init__(cfg, ctx, init=True)  # reset_model, once: the generator persists for the whole run
        self.bn_hooks = self.bn_statistics(cfg.bn)
        self.feature_hook = self.penultimate_features(cfg.act)
        self.lambda_slope = (
            cfg.lambda_slope if cfg.lambda_slope is not None else (1e-4 if ctx.info.name == "cifar10" else 2e-5)
        )

    def adv_weight(self, prog: Progress) -> float:
        if self.cfg.curr_option == "none":  # the reference gates the ramp on the curriculum being on
            return self.cfg.adv
        c = self.cfg
        return adv_weight(prog.epoch, prog.epochs, c.adv, c.grad_adv, c.begin_fraction, c.end_fraction)

    # 1. generator step
    def generator_loss(self, x: Tensor, prog: Progress) -> tuple[Tensor, Tensor, dict[str, Tensor | float]]:
        c = self.cfg
        adv = self.adv_weight(prog)
        # The terms are built in this order on purpose: the gradients of those that read t are summed in reverse
        # order of creation, and this order reproduces the recorded demo numbers bit for bit (BENCHMARKS.md).
        t, loss_bn = self.teacher_with_bn(x, self.bn_hooks)
        entropy = batch_entropy(t, c.ent_T if c.ent_T is not None else c.T)
        loss_oh = onehot_ce(t)
        loss_act = activation_loss(self.feature_hook.pop()) if self.feature_hook else torch.zeros_like(loss_bn)
        if adv > 0:
            s = self.ctx.student(x)
            loss_adv = adv_masked_kl(s, t, c.tau_adv) if c.adv_type == "kl" else adv_js(s, t, c.tau_adv)
        else:
            loss_adv = t.new_zeros(())
        loss = c.lmda_ent * entropy + adv * loss_adv + c.oh * loss_oh + c.act * loss_act + c.bn * loss_bn
        logs = {"entropy": entropy, "loss_oh": loss_oh, "loss_bn": loss_bn, "loss_adv": loss_adv, "adv_weight": adv}
        return loss, t, logs

    def _difficulty(self, s: Tensor, t: Tensor, per_sample: bool) -> Tensor:
        reduction = "sample" if per_sample else ("batchmean" if self.cfg.loss == "kl" else "mean")
        if self.cfg.loss == "kl":
            return kd_kl(s, t, self.cfg.T, reduction=reduction)
        return (kd_l1 if self.cfg.loss == "l1" else kd_mse)(s, t, reduction=reduction)

    # 2. the self-paced student loss (student batches: fresh generator samples, BN in running-statistics mode)
    def student_loss(self, batch: Batch, student: torch.nn.Module, prog: Progress) -> dict[str, Tensor]:
        with torch.no_grad():
            t = self.ctx.teacher(batch.x)
        s = student(batch.x)
        c = self.cfg
        difficulty = self._difficulty(s, t, per_sample=c.spl_granularity == "sample")
        lam = spl_lambda(prog.step, c.lambda_0, self.lambda_slope)
        v = spl_weight(difficulty.detach(), lam, c.curr_option, c.spl_floor)
        loss = (v * difficulty).mean()
        return {"loss": loss, "difficulty": difficulty.detach().mean(), "spl_weight": v.mean(), "lambda": lam}
