"""FastDFKD: Up to 100x Faster Data-free Knowledge Distillation.

Fang et al., AAAI 2022 (arXiv 2112.06253). Reference code: ``zju-vipa/Fast-Datafree@0dcecbc``,
``datafree/synthesis/fast_meta.py`` (reptile_grad L16, fomaml_grad L23, reset_l0 L30; FastMetaSynthesizer, whose
round is ``synthesize`` L101-194), ``datafree/synthesis/fast.py`` (the non-meta variant), ``datafree/hooks.py``
(DeepInversionHook with momentum, L76-117), ``datafree_kd.py`` (set-up L304-316; the epoch loop with its synthesis-only
warm-up, L366-374; the student step ``train`` L408) and ``scripts/fast_cifar.sh``.

Algorithm (one round = one synthesis batch; the reference runs one round and 400 student steps per epoch, after 20
epochs of synthesis only, ``train.synthesis_warmup_epochs``):

1. A meta-generator theta (G-S, PyTorch's default init) persists for the whole run with its own Adam (lr K * lr_g).
   Each round starts from a copy theta' <- theta, a fresh trainable latent z ~ N(0, I) and uniform labels y, with a
   fresh inner Adam over {theta' at lr_g, z at lr_z}.
2. K = ``g_steps`` inner steps: x = G_theta'(z); x_a = flip(crop_pad4(x)); t = T(x_a);
   L = bn * L_bn^mmt + oh * CE(t, y) + adv * L_adv(S(x_a), t), with L_bn^mmt the BatchNorm-statistics loss against
   the batch statistics blended with their moving average over earlier rounds (momentum ``bn_momentum``) and
   L_adv the decision-masked adversarial KL at tau 1 (from one round before the first student step on); the
   lowest-L iterate is kept. First-order MAML: the gradient of every inner step, taken at theta'_k, is added to
   theta's gradient, and theta takes one Adam step after the K-th (``meta: reptile`` instead steps theta along
   ``reptile_scale`` * (theta - theta'_K); ``meta: none`` is the paper's non-meta "Fast" baseline: theta <- theta'_K).
3. The moving average takes the statistics of the last inner step; the best batch joins the pool, and the student
   trains on random pool batches with crop (pad 4) + flip, KD at temperature T (20).
4. Once, ``reset_l0_after`` rounds after the warm-up, theta's first linear layer and first BatchNorm are
   re-initialised (weights ~ N(0, 0.02), biases 0).

Deviations:
- The adversarial term's start is explicit: ``adv_early_rounds`` (default 1, the reference, whose round counter is
  one ahead of its warm-up test, so its generator is pushed against the untrained student in the last warm-up round;
  0 lines it up with the first student step).
- The counters are synthesis rounds, warm-up included (the reference counts synthesize() calls: equal to epochs in
  every shipped script, where there is one round per epoch).
- The pool is in memory on the device (uint8, rounded instead of truncated), saved with checkpoints; student batches
  are independent uniform draws (the reference rebuilds a PNG-folder loader every round and iterates it).
- Everything a round carries over (meta-generator, meta-optimiser, moving averages, pool) is checkpointed every epoch,
  so a run resumes exactly (the reference saves only the best student).
- The BatchNorm hooks compute their loss only during synthesis (the reference also computes it on every teacher
  forward of the student steps and discards it); teacher and student get no parameter gradients during synthesis.
- ``--reset_bn`` (parsed and never used by the reference) and its CMI-initialised pool (``--cmi_init``) are not
  ported; the Reptile factor and the meta learning rate are options (hard-coded 67 and K * lr_g in the reference).
- Under DDP the meta-gradient (and the Reptile step) is averaged across ranks before the meta step and the moving
  averages are averaged after each update, so theta stays identical on every rank; z, theta' and the pool are per rank
  (the reference's ``clone().cuda()`` breaks under DDP); with ``meta: none`` theta becomes the ranks' mean theta'_K.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from dfkd.config import choice
from dfkd.losses import class_entropy
from dfkd.methods.base import BestIterate, Ctx, MomentumInversionConfig, MomentumInversionMethod, Progress, frozen
from dfkd.methods.registry import METHODS
from dfkd.models import create_generator


def accumulate_meta_grad(meta: nn.Module, fast: nn.Module, first: bool) -> None:
    """First-order MAML: add ``fast``'s parameter gradients to ``meta``'s (replacing them when ``first``), so that
    after K inner steps theta.grad = sum_k grad L_k(theta'_k)."""
    for p_meta, p_fast in zip(meta.parameters(), fast.parameters()):
        if p_fast.grad is None:
            continue
        if first or p_meta.grad is None:
            p_meta.grad = p_fast.grad.detach().clone()
        else:
            p_meta.grad.add_(p_fast.grad)


def reptile_grad(meta: nn.Module, fast: nn.Module, scale: float) -> None:
    """Reptile: theta.grad = scale * (theta - theta'_K), so a gradient step moves theta toward the adapted weights."""
    for p_meta, p_fast in zip(meta.parameters(), fast.parameters()):
        p_meta.grad = scale * (p_meta.detach() - p_fast.detach())


@torch.no_grad()
def reset_first_layers(generator: nn.Module) -> None:
    """The reference's ``reset_l0``: the projection (``l1.0``) and the first BatchNorm (``conv_blocks.0``) get weights
    ~ N(0, 0.02) and zero biases (so the BN scale restarts near 0, not near 1, as in the reference)."""
    for name in ("l1.0", "conv_blocks.0"):
        module = generator.get_submodule(name)
        nn.init.normal_(module.weight, 0.0, 0.02)
        nn.init.zeros_(module.bias)


@dataclass
class FastDFKDConfig(MomentumInversionConfig):
    name: str = "fastdfkd"
    # generator (G-S, the CMI benchmark's standard generator)
    generator: str = "dcgan"
    nz: int = 256
    ngf: int = 64
    # inner loop: g_steps (K) Adam steps on {theta', z} per round; Fast-10 by default
    g_steps: int = 10
    lr_g: float = 2e-3
    lr_z: float = 0.01
    betas_g: list[float] = field(default_factory=lambda: [0.5, 0.999])
    # the meta step: first-order MAML (the scripts), Reptile, or none (the non-meta "Fast" variant)
    meta: str = choice("fomaml", "fomaml", "reptile", "none")
    meta_lr: float | None = None  # null = g_steps * lr_g (the reference)
    reptile_scale: float = 67.0
    # synthesis loss weights (CIFAR-100 WRN-40-2 pairs: adv 1.1, oh 0.4; ResNet-34 -> ResNet-18: 1.33, 0.5)
    oh: float = 0.4
    adv: float = 1.1
    adv_early_rounds: int = 1  # the adversarial term starts this many rounds before the first student step
    reset_l0_after: int | None = 120  # rounds after the warm-up at which the first layers restart; null = never

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.adv_early_rounds < 0:
            raise ValueError(f"adv_early_rounds={self.adv_early_rounds}: give 0 or more")


@METHODS.register("fastdfkd")
class FastDFKD(MomentumInversionMethod):
    name = "fastdfkd"
    Config = FastDFKDConfig

    def __init__(self, cfg: FastDFKDConfig, ctx: Ctx):
        super().__init__(cfg, ctx)
        c, h, _ = ctx.info.image_shape
        build = lambda: ctx.env.prepare(create_generator(cfg.generator, nz=cfg.nz, ngf=cfg.ngf, img_size=h, nc=c))  # noqa: E731
        self.generator = build()  # theta, the meta-generator
        self.fast_generator = build()  # theta', a scratch copy adapted in every round
        meta_lr = cfg.meta_lr if cfg.meta_lr is not None else cfg.g_steps * cfg.lr_g
        self.opt_meta = torch.optim.Adam(self.generator.parameters(), lr=meta_lr, betas=tuple(cfg.betas_g))

    def adversarial_on(self, prog: Progress) -> bool:
        return self.cfg.adv > 0 and prog.synthesis_round >= prog.warmup_rounds - self.cfg.adv_early_rounds

    def synthesize(self, prog: Progress) -> dict[str, Tensor]:
        c, env, student = self.cfg, self.ctx.env, self.ctx.student
        n = self.synthesis_batch_size
        if c.reset_l0_after is not None and prog.synthesis_round == prog.warmup_rounds + c.reset_l0_after - 1:
            reset_first_layers(self.generator)
        # Step 1: theta' <- theta, a fresh latent, labels and inner optimiser
        fast = self.fast_generator.train()
        fast.load_state_dict(self.generator.state_dict())
        z = torch.randn(n, c.nz, device=self.device, requires_grad=True)
        y = torch.randint(0, self.ctx.info.num_classes, (n,), device=self.device)
        inner = torch.optim.Adam(
            [{"params": fast.parameters()}, {"params": [z], "lr": c.lr_z}], lr=c.lr_g, betas=tuple(c.betas_g)
        )
        adversarial = self.adversarial_on(prog)
        best = BestIterate()
        # Step 2: K inner steps, their gradients summed into theta's (FOMAML)
        with frozen(student):
            for k in range(c.g_steps):
                with env.autocast():
                    x = env.images(fast(z))
                    loss, t, terms = self.inversion_loss(x, y, adversarial)
                best.offer(loss, x)
                inner.zero_grad(set_to_none=True)
                loss.backward()
                if c.meta == "fomaml":
                    accumulate_meta_grad(self.generator, fast, first=k == 0)
                inner.step()
        # Step 3: the moving averages take the last step's statistics; the meta step
        self.update_bn_statistics()
        self._meta_step(fast)
        return {
            "loss_g": loss.detach(),
            **{k: v.detach() for k, v in terms.items()},
            "best_loss": best.loss,
            "class_entropy": class_entropy(t.detach()),
            **self.add_to_pool(best.values[0]),
        }

    def _meta_step(self, fast: nn.Module) -> None:
        c, env = self.cfg, self.ctx.env
        if c.meta == "none":  # theta <- theta'_K, written as a unit step so that ranks average their theta'_K
            reptile_grad(self.generator, fast, 1.0)
            env.all_reduce_grads(self.generator)
            with torch.no_grad():
                for p in self.generator.parameters():
                    p.sub_(p.grad)
                    p.grad = None
                for mine, adapted in zip(self.generator.buffers(), fast.buffers()):
                    mine.copy_(adapted)
            env.average_buffers(self.generator)
            return
        if c.meta == "reptile":
            reptile_grad(self.generator, fast, c.reptile_scale)
        env.all_reduce_grads(self.generator)
        self.opt_meta.step()
        self.opt_meta.zero_grad(set_to_none=True)

    def checkpoint_state(self) -> dict:
        return {"opt_meta": self.opt_meta.state_dict()}

    def load_checkpoint_state(self, state: dict) -> None:
        self.opt_meta.load_state_dict(state["opt_meta"])
