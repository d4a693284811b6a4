"""MB-DFKD: Preventing Catastrophic Forgetting and Distribution Mismatch in Knowledge Distillation via Synthetic Data.

Binici et al., WACV 2022 (arXiv 2108.05698). No official code was found; followed here: the re-implementation in
``gaurav104/LRA@5a5dd67`` (``src/agents/predfkd_memory.py``, ``src/utils/replay_memory_DFKD.py``,
``src/configs/MB-DFKD.json``; the loop ``train`` L233-282, the student step ``distill_knowledge`` L284, the
generator step ``train_novel_generator`` L308-335), whose novel-generator step is that of the official PRE-DFKD code
(``kuluhan/PRE-DFKD@0b39f6a:distillation.py:45-70``).

Algorithm (one round = ``g_steps`` generator steps + ``kd_steps`` student steps; the reference runs 36 rounds of 1 + 10
per epoch):

1. Novel generator step (persistent G, T and S frozen): x = G(z);
   L_G = oh * CE(T(x), argmax) + ie * sum p_bar log10 p_bar + act * (-mean |f_T|) + adv * (1 - clip(JS_3(S(x), T(x)))),
   the JS averaged over batch and classes, the teacher detached in it.
2. Student steps: a fresh novel batch G(z) (B images, G in train mode as in the reference) plus ``replay_batch_size``
   (B/8) images drawn from the replay memory; L_S = mean |S(x) - T(x)| over the union.
3. Replay memory: ``memory_pushes`` times over the run (the reference: after every 5th of its 400 epochs, 80 times),
   the first B/8 images of the last novel batch join the memory, which keeps the latest ``memory_size`` images
   (10 such batches by default).

Deviations:
- Generator: the reference's by default (``pre_dfkd``: spectral-norm convolutions, BN eps 0.8, tanh -> affine-free
  BatchNorm in normalised space, uniform(-0.08, 0.08) init); its images are mapped to [0, 1] with the dataset's mean
  and std and clamped to the valid image range (clamped pixels pass no gradient).
- The student runs in train mode during the generator step by default, as in the reference (its BatchNorm updates
  its running statistics on the generator's batch); ``g_student_mode: eval`` freezes them.
- The memory is a uint8 ring of images on the device (the reference keeps float batches on the CPU), sampled
  uniformly across entries (the reference picks one stored batch per step); it is saved in the checkpoint.
- The push schedule is a number of pushes over the run (every ``rounds // memory_pushes`` rounds), so that runs of
  any length fill and refresh the memory as the reference's 400 epochs do; the reference pushes after epochs 0, 5,
  10, ... (the first push at the end of the first epoch), here after every interval (the first one interval in).
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
from dfkd.methods._novel import NovelGeneratorConfig, NovelGeneratorMethod
from dfkd.methods.base import Batch, Ctx, Progress
from dfkd.methods.registry import METHODS


@dataclass
class MBDFKDConfig(NovelGeneratorConfig):
    name: str = "mb_dfkd"
    # replay memory
    memory_size: int | None = None  # images kept; null = 10 pushes of replay_batch_size
    memory_pushes: int = 80  # pushes over the run (the reference: every 5 of 400 epochs)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.memory_pushes < 1:
            raise ValueError(f"memory_pushes={self.memory_pushes}: give the number of memory pushes, >= 1")


@METHODS.register("mb_dfkd")
class MBDFKD(NovelGeneratorMethod):
    name = "mb_dfkd"
    Config = MBDFKDConfig

    def __init__(self, cfg: MBDFKDConfig, ctx: Ctx):
        super().__init__(cfg, ctx)
        memory_size = cfg.memory_size or 10 * self.replay_batch_size
        self.memory = SyntheticPool(ctx.info.image_shape, memory_size, ctx.env.device)

    # 1. the novel generator step: GeneratorMethod.synthesize on NovelGeneratorMethod.generator_loss

    def push_interval(self, prog: Progress) -> int:
        """Rounds between memory pushes: the run's rounds spread over ``memory_pushes`` pushes."""
        return max(1, prog.epochs * prog.rounds_per_epoch // self.cfg.memory_pushes)

    # 2. a fresh novel batch plus replayed images; 3. the memory update after every push_interval rounds
    @torch.no_grad()
    def next_batch(self, prog: Progress) -> Batch:
        self.generator.train(self.cfg.sample_mode == "train")
        novel = self.generate(self.ctx.batch_size)
        x = torch.cat([novel, self.memory.sample(self.replay_batch_size)]) if len(self.memory) else novel
        rounds_done = prog.epoch * prog.rounds_per_epoch + prog.round + 1
        if prog.step_in_round == prog.kd_steps - 1 and rounds_done % self.push_interval(prog) == 0:
            self.memory.add(novel[: self.replay_batch_size])
        return Batch(x=self.ctx.env.images(x))

    def student_loss(self, batch: Batch, student: torch.nn.Module, prog: Progress) -> dict[str, Tensor]:
        return {**super().student_loss(batch, student, prog), "memory_size": len(self.memory)}
