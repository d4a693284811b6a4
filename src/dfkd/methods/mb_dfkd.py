"""MB-DFKD: Preventing Catastrophic Forgetting and Distribution Mismatch in Knowledge Distillation via Synthetic Data.

Binici et al., WACV 2022 (arXiv 2108.05698). No official code was found; followed here: the re-implementation in
``gaurav104/LRA@5a5dd67`` (``src/agents/predfkd_memory.py``, ``src/utils/replay_memory_DFKD.py``,
``src/configs/MB-DFKD.json``), whose novel-generator step is that of the official PRE-DFKD code
(``kuluhan/PRE-DFKD@0b39f6a`` ``distillation.py``); methods-spec.md §9.

Algorithm (one round = ``g_steps`` generator steps + ``kd_steps`` student steps; the reference runs 36 rounds of 1 + 10
per epoch):

1. Novel generator step (persistent G, T and S frozen): x = G(z);
   L_G = oh * CE(T(x), argmax) + ie * sum p_bar log10 p_bar + act * (-mean |f_T|) + adv * (1 - clip(JS_3(S(x), T(x)))),
   the JS averaged over batch and classes, the teacher detached in it.
2. Student steps: a fresh novel batch G(z) (B images, G in train mode as in the reference) plus ``replay_batch_size``
   (B/8) images drawn from the replay memory; L_S = mean |S(x) - T(x)| over the union.
3. Replay memory: after every ``memory_every``-th epoch (epochs 0, 5, 10, ...) the first B/8 images of the epoch's last
   novel batch join the memory, which keeps the latest ``memory_size`` images (10 such batches by default).

Deviations:
- Generator: the library's DCGAN generator (``dcgan`` = CMI's G-S layout, which is the reference's layout) with a
  sigmoid output in [0, 1] under the teacher's normaliser; the reference ends in tanh + an affine-free BatchNorm in
  normalised space, uses spectral-norm convolutions with bias and BN eps 0.8. The reference's uniform(-0.08, 0.08)
  initialisation is kept.
- The student is frozen in eval mode during the generator step (the reference runs it in train mode there, which
  updates its BN statistics on the generator's batch).
- The memory is a uint8 ring of images on the device (the reference keeps float batches on the CPU), sampled
  uniformly across entries (the reference picks one stored batch per step); it is saved in the checkpoint.
- The memory holds images of the novel generator only; the paper's real-distribution-matching constraint is not in
  the re-implementation and not here.
- Under DDP the novel generator's gradients are averaged across ranks (it persists); each rank keeps its own memory.
- ``images_synthesized`` counts novel-generator outputs (generator steps and student batches); replayed images
  were counted when they were generated.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from dfkd.data.pool import SyntheticPool
from dfkd.losses import kd_l1
from dfkd.methods._novel import NovelGeneratorConfig, NovelGeneratorMethod
from dfkd.methods.base import Batch, Ctx, Progress
from dfkd.methods.registry import METHODS


@dataclass
class MBDFKDConfig(NovelGeneratorConfig):
    name: str = "mb_dfkd"
    # replay memory
    memory_size: int | None = None  # images kept; null = 10 pushes of replay_batch_size
    memory_every: int = 5  # epochs between pushes


@METHODS.register("mb_dfkd")
class MBDFKD(NovelGeneratorMethod):
    name = "mb_dfkd"
    Config = MBDFKDConfig

    def __init__(self, cfg: MBDFKDConfig, ctx: Ctx):
        if cfg.memory_every < 1:
            raise ValueError(f"method.memory_every must be >= 1, got {cfg.memory_every}")
        super().__init__(cfg, ctx)
        memory_size = cfg.memory_size or 10 * self.replay_batch_size
        self.memory = SyntheticPool(ctx.info.image_shape, memory_size, ctx.env.device)

    # 1. the novel generator step: NovelGeneratorMethod.synthesize

    # 2. a fresh novel batch plus replayed images; 3. the memory update at the end of every memory_every-th epoch
    @torch.no_grad()
    def next_batch(self, prog: Progress) -> Batch:
        k = prog.step_in_round
        self.generator.train(self.cfg.sample_mode == "train")
        novel = self.generate(self.ctx.batch_size)
        x = torch.cat([novel, self.memory.sample(self.replay_batch_size)]) if len(self.memory) else novel
        end_of_epoch = prog.round == prog.rounds_per_epoch - 1 and k == prog.kd_steps - 1
        if end_of_epoch and prog.epoch % self.cfg.memory_every == 0:
            self.memory.add(novel[: self.replay_batch_size])
        return Batch(x=self.ctx.env.images(x))

    def student_loss(self, batch: Batch, student: torch.nn.Module, prog: Progress) -> dict[str, Tensor]:
        with torch.no_grad():
            t = self.ctx.teacher(batch.x)
        return {"loss": kd_l1(student(batch.x), t), "memory_size": len(self.memory)}
