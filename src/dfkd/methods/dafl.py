"""DAFL: Data-Free Learning of Student Networks.

Chen et al., ICCV 2019 (arXiv 1904.01186). Reference code followed by default: the CMI benchmark's re-implementation,
which produced the numbers of the CuDFKD paper's tables, github.com/zju-vipa/CMI @ 9e79fa9,
``datafree/synthesis/generative.py`` (``GenerativeSynthesizer``: the generator step ``synthesize`` L52-75, the
student's batches ``sample`` L78-82), ``datafree_kd.py`` (method ``dafl``: set-up L255-265, the student step ``train``
L369-400) and ``scripts/dafl/dafl_cifar10_wrn402_wrn161.sh`` (the settings). The original code
(huawei-noah/Efficient-Computing, ``DAFL_train.py``, read in its verbatim copy happen2me/DAFL_train @ 13b5fec,
``DAFL/DAFL_train.py``: the generator L55-77, the joint step L169-186) is ``step: joint`` with ``generator: dafl``.

The fixed teacher plays the discriminator: G learns to produce images on which the teacher's outputs look like those
on real data (confident, strongly activated, balanced over classes), and the student imitates the teacher on them.

Algorithm, ``step: alternating`` (the CMI benchmark; one round, ``rounds_per_epoch`` rounds per epoch):

1. Generator step (G train mode, T eval mode), ``g_steps`` times, on a fresh batch x = G(z), z ~ N(0, I):
   L_G = oh * CE(t, argmax t) + act * (-mean |f_T|) + balance * sum_c p_c log p_c
   with t = T(x), f_T the teacher's penultimate feature, p the batch-mean softmax of t (natural log).
2. Student steps (``kd_steps``), each on a fresh batch x = G(z) with G in eval mode:
   L_S = T^2 * KL(softmax(T(x)/T) || softmax(S(x)/T)), T = 1.

Algorithm, ``step: joint`` (the paper's Alg. 1; one student step per round in its recipes):
   x = G(z) (G train mode); L_G as above on T(x); L_S = KL(T(x) || S(x.detach())) on the same batch;
   one update of G and one of S per iteration.

Deviations:
- The temperature is the config's ``T`` (default 1). The CMI benchmark passes ``--T 20`` but silently uses T = 1
  (``zju-vipa/CMI@9e79fa9:datafree_kd.py:259`` rebinds the criterion, built with ``--T`` at L239, to ``KLDiv()``);
  the default reproduces what it ran.
- ``step: joint`` runs the generator update inside ``student_loss`` (its own backward and Adam step) and returns the
  student loss to the engine, which steps the student. The original sums both losses and calls one backward; as the
  student loss sees only detached images and teacher outputs, the two losses share no gradient and the updates are
  the same. ``synthesize`` does nothing in this mode, so the generator's time is counted as student time.
- The original generator (``generator: dafl``) emits normalised-space images; they are mapped to [0, 1] with the
  dataset's mean and std and clamped to the valid image range (pixels beyond about 2.4 std on CIFAR; the original
  fed them unclamped, and clamped pixels pass no gradient).
- Every dataset uses its own normalisation; the original's CIFAR-100 teacher used the CIFAR-10 constants.
- The teacher's penultimate feature is captured by a forward hook on its classifier (the input of the last linear
  layer; a LeNet's 120-d conv feature), not by a ``return_features`` forward; same tensor.
- The activation hook is installed only when ``act != 0``.
- Under DDP the persistent generator's gradients are all-reduced before each step, so it stays identical on every
  rank (the references have no distributed path for this method).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from dfkd.config import choice
from dfkd.losses import class_balance, kd_kl
from dfkd.methods.base import Batch, Ctx, GeneratorConfig, GeneratorMethod, Progress
from dfkd.methods.registry import METHODS


@dataclass
class DAFLConfig(GeneratorConfig):
    name: str = "dafl"
    # generator (the CMI benchmark: LargeGenerator, nz 512, PyTorch's default init, Adam betas (0.5, 0.999);
    # the original: generator dafl, nz 1000 on CIFAR / 100 on MNIST, Adam's default betas)
    nz: int = 512
    # generator loss weights (CMI scripts/dafl; the original: oh 0.05, act 0.01, balance 5 on CIFAR-10)
    oh: float = 1.0
    act: float = 0.001
    balance: float = 20.0
    T: float = 1.0  # KD temperature of the student loss
    step: str = choice("alternating", "alternating", "joint")


@METHODS.register("dafl")
class DAFL(GeneratorMethod):
    name = "dafl"
    Config = DAFLConfig

    def __init__(self, cfg: DAFLConfig, ctx: Ctx):
        super().__init__(cfg, ctx)
        if cfg.step == "joint":
            self.refuse_student_batch_options("step=joint")
        self.feature_hook = self.penultimate_features(cfg.act)
        self._joint: tuple[Tensor, Tensor] | None = None  # (student batch, the same images with their graph to G)

    # 1. the generator loss (run by GeneratorMethod.synthesize, or by student_loss in the joint step)
    def generator_loss(self, x: Tensor, prog: Progress) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        c = self.cfg
        t, priors = self.teacher_priors(x, feature_hook=self.feature_hook)
        loss_balance = class_balance(t)
        loss = c.oh * priors["loss_oh"] + c.act * priors["loss_act"] + c.balance * loss_balance
        return loss, t, {"loss_oh": priors["loss_oh"], "loss_act": priors["loss_act"], "loss_balance": loss_balance}

    def synthesize(self, prog: Progress) -> dict[str, Tensor]:
        if self.cfg.step == "joint":  # the generator is stepped in student_loss, on the student's batch
            return {}
        return super().synthesize(prog)

    # 2. student batches
    def next_batch(self, prog: Progress) -> Batch:
        if self.cfg.step == "joint":  # Alg. 1: one batch for both updates, G in train mode, graph kept for L_G
            self.generator.train()
            x = self.generate(self.ctx.batch_size)
            self._joint = (x.detach(), x)
            return Batch(x=self._joint[0])
        return super().next_batch(prog)

    def student_loss(self, batch: Batch, student: torch.nn.Module, prog: Progress) -> dict[str, Tensor]:
        if self.cfg.step == "alternating":
            return super().student_loss(batch, student, prog)
        if self._joint is None or batch.x is not self._joint[0]:
            raise RuntimeError("DAFL step=joint: student_loss must get the batch of the preceding next_batch")
        x_graph, self._joint = self._joint[1], None
        logs, t = self.generator_step(x_graph, prog)  # Alg. 1: update G (its teacher forward serves the student)
        loss = kd_kl(student(batch.x), t, self.cfg.T)  # Alg. 1: update S (the engine steps it)
        return {"loss": loss, **logs}
