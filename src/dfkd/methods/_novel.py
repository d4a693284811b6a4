"""The novel-generator step that MB-DFKD and PRE-DFKD share (``kuluhan/PRE-DFKD@0b39f6a:distillation.py:45-70``).

x = G(z), teacher and student frozen (the student in train mode by default, as in the references);
L_G = oh * CE(T(x), argmax) + ie * sum p_bar log10 p_bar + act * (-mean |f_T|) + adv * (1 - clip(JS_3(S(x), T(x)))).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

from dfkd.config import choice
from dfkd.losses import kd_l1
from dfkd.losses.replay import novel_generator_loss
from dfkd.methods.base import Ctx, GeneratorConfig, GeneratorMethod, Progress
from dfkd.models.replay import replay_generator


@dataclass
class NovelGeneratorConfig(GeneratorConfig):
    generator: str = "pre_dfkd"  # the official novel generator (spectral norm, tanh -> affine-free BN output)
    nz: int = 1000
    lr_g: float = 0.02
    betas_g: list[float] = field(default_factory=lambda: [0.9, 0.999])
    oh: float = 1.0
    ie: float = 5.0
    act: float = 0.1
    adv: float = 1.0
    tau_adv: float = 3.0
    sample_mode: str = choice("train", "train", "eval")  # novel generator BN mode when drawing student batches
    g_student_mode: str = choice("train", "eval", "train")  # the references leave the student in train mode
    replay_batch_size: int | None = None  # replayed images per student step; null = train.batch_size // 8


class NovelGeneratorMethod(GeneratorMethod):
    """A persistent novel generator trained by ``novel_generator_loss``; subclasses add their replay memory."""

    def __init__(self, cfg: NovelGeneratorConfig, ctx: Ctx):
        super().__init__(cfg, ctx, generator=replay_generator(cfg.generator, cfg.nz, cfg.ngf, ctx.info.image_shape))
        self.replay_batch_size = cfg.replay_batch_size or max(1, ctx.batch_size // 8)
        self.refuse_student_batch_options(f"{self.name}'s replay memory")
        self.feature_hook = self.penultimate_features(cfg.act)

    def generator_loss(self, x: Tensor, prog: Progress) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        c = self.cfg
        t = self.ctx.teacher(x)
        features = self.feature_hook.pop() if self.feature_hook is not None else None
        s = self.ctx.student(x) if c.adv != 0 else None
        terms = novel_generator_loss(t, s, features, c.oh, c.ie, c.act, c.adv, c.tau_adv)
        return terms.pop("loss"), t, terms

    def imitation_loss(self, s: Tensor, t: Tensor) -> Tensor:
        """The references' student loss: L1 between the logits (on novel and replayed images alike)."""
        return kd_l1(s, t)
