"""DFQ: Data-Free Network Quantization With Adversarial Knowledge Distillation.

Choi et al., CVPR Workshops 2020 (arXiv 2005.04136), as re-implemented in the CMI benchmark, which produced the
numbers of the CuDFKD paper's tables. Reference code: github.com/zju-vipa/CMI @ 9e79fa9,
``datafree/synthesis/generative.py``
(``GenerativeSynthesizer``: the generator step ``synthesize`` L52-75, the student's batches ``sample`` L78-82),
``datafree_kd.py`` (method ``dfq``: set-up L255-265, the student step ``train`` L369-400) and ``scripts/dfq/*.sh``
(the settings).

Algorithm (one round; the engine runs ``rounds_per_epoch`` rounds per epoch, 40 in the reference scripts):

1. Generator step (G train mode; T, S eval mode), ``g_steps`` times, on a fresh batch x = G(z), z ~ N(0, I):
   L_G = bn * L_BN + oh * CE(t, argmax t) + adv * (-KL_T(t || s)) + balance * sum_c p_c log p_c
   with t = T(x), s = S(x), p the batch-mean softmax of t: match the teacher's BatchNorm statistics, be confident,
   be where the student disagrees with the teacher (unmasked, batch-mean KL), cover the classes evenly.
2. Student steps (``kd_steps``, 10 in the scripts), each on a fresh batch x = G(z) with G in eval mode:
   L_S = T^2 * KL(softmax(T(x)/T) || softmax(S(x)/T)), T = 1.

Deviations:
- The temperature is the config's ``T`` (default 1), used by the student loss and the adversarial term alike. The
  reference passes ``--T 20`` in its scripts but silently rebinds the criterion to T = 1
  (``zju-vipa/CMI@9e79fa9:datafree_kd.py:259``: ``KLDiv()`` replaces the ``KLDiv(T=args.T)`` of L239); the default
  reproduces what it ran.
- Only the benchmark's single-generator re-implementation is provided; the paper's ensembles of generators and
  students and its quantised students are not.
- The reference's shared synthesizer also computes an activation term, weighted 0 in every DFQ script: not a knob
  here. The BN-statistics hooks are installed only when ``bn > 0``.
- Under DDP the persistent generator's gradients are all-reduced before each step, so it stays identical on every
  rank (the reference has no distributed path for this method).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from dfkd.losses import adv_unmasked_kl, class_balance
from dfkd.methods.base import Ctx, GeneratorConfig, GeneratorMethod, Progress
from dfkd.methods.registry import METHODS


@dataclass
class DFQConfig(GeneratorConfig):
    name: str = "dfq"
    # generator (the CMI benchmark: LargeGenerator, nz 256, PyTorch's default init, Adam betas (0.5, 0.999))
    # generator loss weights (CMI scripts/dfq)
    bn: float = 1.0
    oh: float = 1.0
    adv: float = 1.0
    balance: float = 20.0
    # KD temperature of the student loss and of the adversarial KL
    T: float = 1.0


@METHODS.register("dfq")
class DFQ(GeneratorMethod):
    name = "dfq"
    Config = DFQConfig

    def __init__(self, cfg: DFQConfig, ctx: Ctx):
        super().__init__(cfg, ctx)
        self.bn_hooks = self.bn_statistics(cfg.bn)

    # 1. generator step
    def generator_loss(self, x: Tensor, prog: Progress) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        c = self.cfg
        t, priors = self.teacher_priors(x, self.bn_hooks)
        loss_adv = adv_unmasked_kl(self.ctx.student(x), t, c.T) if c.adv > 0 else t.new_zeros(())
        loss_balance = class_balance(t)
        loss = c.bn * priors["loss_bn"] + c.oh * priors["loss_oh"] + c.adv * loss_adv + c.balance * loss_balance
        return loss, t, {"loss_bn": priors["loss_bn"], "loss_oh": priors["loss_oh"], "loss_adv": loss_adv,
                         "loss_balance": loss_balance}  # fmt: skip
