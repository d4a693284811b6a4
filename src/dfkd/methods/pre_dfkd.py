"""PRE-DFKD: Robust and Resource-Efficient Data-Free Knowledge Distillation by Generative Pseudo Replay.

Binici et al., AAAI 2022 (arXiv 2201.03019). Official code ``kuluhan/PRE-DFKD@0b39f6a``: ``distillation.py``
(``distill_knowledge`` L8-43, ``train_novel_generator`` L45-70, ``train_memory_generator`` L72), ``main.py`` (settings;
the loop, 36 rounds per epoch, L90-108), ``networks/generator.py``.

Algorithm (one round = ``g_steps`` generator steps + ``kd_steps`` student steps; the reference runs 36 rounds of 1 + 10
per epoch):

1. Novel generator step, as MB-DFKD: x = G(z);
   L_G = oh * CE(T(x), argmax) + ie * sum p_bar log10 p_bar + act * (-mean |f_T|) + adv * (1 - clip(JS_3(S(x), T(x)))).
2. Student steps: a fresh novel batch G(z) (B images) plus B/8 pseudo-replay images G_m(z_m) from the memory generator
   (eval mode), whose latents z_m ~ N(0, I) first take ``replay_z_steps`` Adam steps (lr_g) on
   ie * sum p_bar log10 p_bar + oh * CE(T(G_m(z_m)), argmax) + MSE(var z_m, 1) + MSE(mean z_m, 0);
   L_S = mean |S(x) - T(x)| over the union.
3. Memory update on the first ``memory_steps`` (4) student steps of every round: x = [novel[:B/2]; B/8 fresh
   pseudo-replay images (G_m in train mode)] (novel[:B/2] alone in the very first round); (z, mu, logvar) = E(x);
   L_M = |G_m(z) - x| + |T(G_m(z)) - T(x)| + kld * KLD(mu, logvar); one Adam step on G_m and E (lr_memory).

Deviations:
- Generators: the official ones by default (``pre_dfkd``: spectral-norm convolutions, BN eps 0.8, tanh -> affine-free
  BatchNorm in normalised space; ``pre_dfkd_memory``: the same without spectral norm), with their uniform(-0.08, 0.08)
  init. Their normalised-space images are mapped to [0, 1] with the dataset's mean and std and clamped to the valid
  image range (clamped pixels pass no gradient); the VAE's image L1 and the encoder's input are computed on
  normalised images, as in the reference. The encoder's BatchNorms keep the default eps (the reference: 0.8).
- The latent tuning takes gradients with respect to z only (the reference's backward also fills G_m's gradients,
  which its next ``zero_grad`` discards).
- The memory's two Adam optimisers (G_m, E; same learning rate) are one Adam over both (identical updates).
- The memory update runs inside ``next_batch``, before the student step instead of after it; the student does not
  enter it, so the updates are the same.
- Under DDP the novel generator, memory generator and encoder gradients are averaged across ranks (all persist).
- ``images_synthesized`` counts novel-generator outputs (generator steps and student batches) and the pseudo-replay
  images that enter student batches (not the VAE's own training inputs and reconstructions).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from dfkd.losses import onehot_ce
from dfkd.losses.replay import balance_log10, latent_prior_loss, vae_loss
from dfkd.methods._novel import NovelGeneratorConfig, NovelGeneratorMethod
from dfkd.methods.base import Batch, Ctx, Progress, optimizer_step
from dfkd.methods.registry import METHODS
from dfkd.models.generators import in_unit_range
from dfkd.models.replay import ReplayEncoder, init_uniform_, replay_generator


@dataclass
class PREDFKDConfig(NovelGeneratorConfig):
    name: str = "pre_dfkd"
    # generative replay memory (a VAE: memory generator of the novel generator's layout + encoder)
    memory_generator: str = "pre_dfkd_memory"  # the official memory generator (no spectral norm)
    latent_dim: int = 1000
    lr_memory: float = 5.0e-4  # lr_g / 40 in the reference
    replay_z_steps: int = 1  # Adam steps on the replay latents
    memory_steps: int = 4  # student steps per round that also train the memory
    kld: float = 1.0e-5


@METHODS.register("pre_dfkd")
class PREDFKD(NovelGeneratorMethod):
    name = "pre_dfkd"
    Config = PREDFKDConfig

    def __init__(self, cfg: PREDFKDConfig, ctx: Ctx):
        shape, env = ctx.info.image_shape, ctx.env
        super().__init__(cfg, ctx)
        memory_generator = replay_generator(cfg.memory_generator, cfg.latent_dim, cfg.ngf, shape)
        # The generative memory (a VAE: decoder = memory generator, plus encoder), stepped and synchronised as one.
        self.memory = nn.ModuleDict({
            "generator": env.prepare(in_unit_range(memory_generator, ctx.info.mean, ctx.info.std)),
            "encoder": env.prepare(init_uniform_(ReplayEncoder(shape[0], shape[1], cfg.latent_dim, cfg.ngf))),
        })  # fmt: skip
        self.opt_memory = torch.optim.Adam(self.memory.parameters(), lr=cfg.lr_memory)
        self.register_buffer("mean", torch.tensor(ctx.info.mean, device=env.device).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(ctx.info.std, device=env.device).view(1, -1, 1, 1), persistent=False)
        self._memory_log: dict[str, Tensor] = {}

    def _normalize(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std

    def _pseudo_replay(self, n: int, train_mode: bool) -> Tensor:
        """Step 2's replay: latents tuned toward confident, balanced teacher outputs, then decoded (no gradient)."""
        c, teacher = self.cfg, self.ctx.teacher
        self.memory.generator.train(train_mode)
        z = torch.randn(n, c.latent_dim, device=self.device, requires_grad=True)
        opt_z = torch.optim.Adam([z], lr=c.lr_g)
        for _ in range(c.replay_z_steps):
            with torch.enable_grad():  # even if the caller runs without gradients
                with self.ctx.env.autocast():
                    t = teacher(self.ctx.env.images(self.memory.generator(z)))
                    loss = c.ie * balance_log10(t) + c.oh * onehot_ce(t) + latent_prior_loss(z)
                (z.grad,) = torch.autograd.grad(loss, [z])
            opt_z.step()
        with torch.no_grad():
            return self.ctx.env.images(self.memory.generator(z))

    def _train_memory(self, novel: Tensor, first_round: bool) -> None:
        """Step 3: one VAE step on half the novel batch and fresh pseudo-replay images."""
        c, teacher = self.cfg, self.ctx.teacher
        x = novel[: self.ctx.batch_size // 2]
        if not first_round:
            x = torch.cat([x, self._pseudo_replay(self.replay_batch_size, train_mode=True)])
        self.memory.train()
        with torch.enable_grad():
            with self.ctx.env.autocast():
                with torch.no_grad():
                    t = teacher(x)
                z, mu, logvar = self.memory.encoder(self._normalize(x))
                x_rec = self.ctx.env.images(self.memory.generator(z))
                terms = vae_loss(self._normalize(x_rec), self._normalize(x), teacher(x_rec), t, mu, logvar, c.kld)
            optimizer_step(self.opt_memory, terms["loss"], self.ctx.env, self.memory)
        self._memory_log = {f"memory/{k}": v.detach() for k, v in terms.items()}

    # 1. the novel generator step: GeneratorMethod.synthesize on NovelGeneratorMethod.generator_loss

    # 2. a fresh novel batch plus pseudo-replay; 3. the memory update on the round's first memory_steps steps
    def next_batch(self, prog: Progress) -> Batch:
        k = prog.step_in_round
        with torch.no_grad():
            self.generator.train(self.cfg.sample_mode == "train")
            novel = self.generate(self.ctx.batch_size)
        replay = self._pseudo_replay(self.replay_batch_size, train_mode=False)
        self.images_synthesized += replay.shape[0]
        if k < self.cfg.memory_steps:
            self._train_memory(novel, first_round=prog.epoch == 0 and prog.round == 0)
        return Batch(x=torch.cat([novel, replay]))

    def student_loss(self, batch: Batch, student: nn.Module, prog: Progress) -> dict[str, Tensor]:
        out = {**super().student_loss(batch, student, prog), **self._memory_log}
        self._memory_log = {}
        return out

    def checkpoint_state(self) -> dict:
        return {**super().checkpoint_state(), "opt_memory": self.opt_memory.state_dict()}

    def load_checkpoint_state(self, state: dict) -> None:
        super().load_checkpoint_state(state)
        self.opt_memory.load_state_dict(state["opt_memory"])
