"""The novel-generator step that MB-DFKD and PRE-DFKD share (PRE-DFKD's ``train_novel_generator``; methods-spec §9).

x = G(z), teacher and student frozen;
L_G = oh * CE(T(x), argmax) + ie * sum p_bar log10 p_bar + act * (-mean |f_T|) + adv * (1 - clip(JS_3(S(x), T(x)))).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

from dfkd.config import choice
from dfkd.losses.replay import novel_generator_loss
from dfkd.methods.base import Ctx, GeneratorConfig, GeneratorMethod, Progress, frozen, optimizer_step
from dfkd.models.replay import replay_generator


@dataclass
class NovelGeneratorConfig(GeneratorConfig):
    generator: str = "dcgan"
    nz: int = 1000
    lr_g: float = 0.02
    betas_g: list[float] = field(default_factory=lambda: [0.9, 0.999])
    oh: float = 1.0
    ie: float = 5.0
    act: float = 0.1
    adv: float = 1.0
    tau_adv: float = 3.0
    sample_mode: str = choice("train", "train", "eval")  # novel generator BN mode when drawing student batches
    replay_batch_size: int | None = None  # replayed images per student step; null = train.batch_size // 8


class NovelGeneratorMethod(GeneratorMethod):
    """A persistent novel generator trained by ``novel_generator_loss``; subclasses add their replay memory."""

    def __init__(self, cfg: NovelGeneratorConfig, ctx: Ctx):
        super().__init__(cfg, ctx, generator=replay_generator(cfg.generator, cfg.nz, cfg.ngf, ctx.info.image_shape))
        self.replay_batch_size = cfg.replay_batch_size or max(1, ctx.batch_size // 8)
        self.feature_hook = self.penultimate_features(cfg.act)

    def synthesize(self, prog: Progress) -> dict[str, Tensor]:
        c, teacher, student = self.cfg, self.ctx.teacher, self.ctx.student
        self.generator.train()
        with frozen(student):
            for _ in range(c.g_steps):
                x = self.generate(self.synthesis_batch_size)
                with self.ctx.env.autocast():
                    t = teacher(x)
                    features = self.feature_hook.pop() if self.feature_hook is not None else None
                    s = student(x) if c.adv != 0 else None
                    terms = novel_generator_loss(t, s, features, c.oh, c.ie, c.act, c.adv, c.tau_adv)
                optimizer_step(self.opt_g, terms["loss"], self.ctx.env, self.generator)
        return {("loss_g" if k == "loss" else k): v.detach() for k, v in terms.items()}
