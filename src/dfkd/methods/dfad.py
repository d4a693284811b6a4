"""DFAD: Data-Free Adversarial Distillation.

Fang et al., arXiv 1912.11006 (2019). Reference code followed by default: the benchmark re-implementation of the
CMI code base, github.com/zju-vipa/CMI @ 9e79fa9, ``datafree/synthesis/generative.py`` (``GenerativeSynthesizer``:
the generator step ``synthesize`` L52-75, the student's batches ``sample`` L78-82) and ``datafree_kd.py`` (method
``dfad``: the L1 criterion at L259, the student step ``train`` L369-400), with the hyperparameters of
``zju-vipa/Fast-Datafree@0dcecbc:scripts/dfad_cifar.sh``. The original code
(github.com/VainF/Data-Free-Adversarial-Distillation, ``DFAD_cifar.py`` @ 053861f: 5 student steps then one
generator step per iteration, ``train`` L17-46, the schedulers L153-165; ``network/gan.py`` @ b967331: ``GeneratorA``,
L12-33, whose BatchNorms keep PyTorch's default eps where DAFL's pass 0.8,
``happen2me/DAFL_train@13b5fec:DAFL/DAFL_train.py:67``) is the recipe ``dfad_original-*``.

A min-max game on the L1 distance between teacher and student logits: the generator looks for images where the
student is furthest from the teacher, the student closes the gap there.

Algorithm (one round; the engine runs ``rounds_per_epoch`` rounds per epoch):

1. Generator step (G train mode; S eval mode, ``g_student_mode: train`` as in the original), ``g_steps`` times, on a
   fresh batch x = G(z), z ~ N(0, I):  L_G = -mean |S(x) - T(x)|  (mean over batch and classes).
2. Student steps (``kd_steps``), each on a fresh batch x = G(z) (G eval mode; ``sample_mode: train`` as in the
   original, which sets G to train mode for the whole iteration, ``DFAD_cifar.py`` L20):  L_S = mean |S(x) - T(x)|.
3. Optional step decay of the generator's learning rate (``lr_g_milestones``; the original drops both players' rates
   x0.1 at its epochs 100 and 200, the student's through ``train.scheduler: multistep``).

Deviations:
- A round starts with the generator step; the original's iteration starts with its 5 student steps. Over a run this
  is the same alternation, shifted by one generator step.
- The original generator (``generator: dfad``) emits normalised-space images; they are mapped to [0, 1] with the
  dataset's mean and std and clamped to the valid image range (clamped pixels pass no gradient; the original fed
  them unclamped).
- The generator's learning-rate decay is a function of the epoch (resumable without scheduler state); the recipe
  puts the milestones one epoch early to match the original, which steps its schedulers at the start of each
  1-based epoch, before training (``VainF/Data-Free-Adversarial-Distillation@053861f:DFAD_cifar.py:161-165``), so its
  drops at 100 and 200 take effect from 0-based epochs 99 and 199.
- Under DDP the persistent generator's gradients are all-reduced before each step, so it stays identical on every
  rank. With ``g_student_mode: train`` the generator step also updates the student's BatchNorm running statistics,
  as in the original.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

from dfkd.losses import adv_l1, kd_l1
from dfkd.methods.base import GeneratorConfig, GeneratorMethod, Progress
from dfkd.methods.registry import METHODS


def step_decay(epoch: int, milestones: list[int], gamma: float) -> float:
    """Learning-rate factor in force during 0-based ``epoch``: gamma ** (number of milestones <= epoch)."""
    return gamma ** sum(epoch >= m for m in milestones)


@dataclass
class DFADConfig(GeneratorConfig):
    name: str = "dfad"
    # generator (the benchmark: LargeGenerator, nz 256, PyTorch's default init, Adam betas (0.5, 0.999);
    # the original: generator dfad, nz 256, Adam's default betas)
    lr_g_milestones: list[int] = field(default_factory=list)  # 0-based epochs where lr_g is multiplied by gamma
    lr_g_gamma: float = 0.1


@METHODS.register("dfad")
class DFAD(GeneratorMethod):
    name = "dfad"
    Config = DFADConfig

    # 1. generator step: maximise the teacher-student L1 discrepancy
    def generator_loss(self, x: Tensor, prog: Progress) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        t = self.ctx.teacher(x)
        return adv_l1(self.ctx.student(x), t), t, {}

    def generator_lr(self, prog: Progress) -> float:
        return self.cfg.lr_g * step_decay(prog.epoch, self.cfg.lr_g_milestones, self.cfg.lr_g_gamma)

    # 2. the L1 imitation loss, on fresh generator batches
    def imitation_loss(self, s: Tensor, t: Tensor) -> Tensor:
        return kd_l1(s, t)
