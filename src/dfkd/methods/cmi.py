"""CMI: Contrastive Model Inversion for Data-Free Knowledge Distillation.

Fang et al., IJCAI 2021 (arXiv 2105.08584). Reference code: ``zju-vipa/CMI@9e79fa9``,
``datafree/synthesis/contrastive.py`` (MLPHead L17; MemoryBank L136-166; CMISynthesizer, whose round is
``synthesize`` L261-357), ``datafree_kd.py`` (set-up L266-281, the student step ``train`` L369-400) and
``scripts/cmi/*.sh``; the R34/VGG/WRN-16-2/WRN-40-1 scripts of ``ljrprocc/DataFree@bf3096b`` (``scripts/cmi/``).

Algorithm (one round = one synthesis batch; the reference runs one round of ``g_steps`` = 200 steps and 400 student
steps per epoch):

1. Re-initialise the generator G (``reset_model``), draw a new latent z ~ N(0, I) (trainable) and sorted uniform
   labels y; a fresh Adam over {G, z} (lr_g, betas (0.5, 0.999)). The projection head h persists across rounds.
2. ``g_steps`` times: x = G(z); global view x_g = flip(crop_pad4(x)), local view x_l = flip(resized_crop(x, scale
   0.25..1)), both per sample; t = T(x_g) gives L_bn and CE(t, y); s = S(x_g) gives the decision-masked adversarial
   KL; instance features f_g, f_l = spatial means of the inputs of the hooked teacher layers on each view; up to
   ``n_neg`` rows [F_l, F_g] from the memory bank; q = h([f_l; F_l]), k = stopgrad h([f_g; F_g]),
   L_cr = CE(q k^T / cr_T, diagonal);  L = bn L_bn + oh CE + adv L_adv + cr L_cr; track the lowest-L iterate;
   step (G, z) and h.
3. The lowest-loss batch goes into the synthetic pool, its [f_l, f_g] into the memory bank; the student trains on
   random pool batches with crop (pad 4) + flip, KD at temperature T.

Deviations:
- The memory bank accepts any synthesis batch size, samples across its wrap-around and never returns an empty
  sample once it holds rows. The reference asserts ``40960 % batch == 0``
  (``zju-vipa/CMI@9e79fa9:datafree/synthesis/contrastive.py:149``) and, in the round after exactly 40960 rows
  (pointer back at 0, ``n_updates == max_size``), samples ``range(self._ptr)`` = no negatives (L163-166); the mean of
  that empty slice makes the loss NaN (L323-324), so the best-iterate test (L330) never passes after iteration 0 and
  the pool gets the fresh generator's first batch. It lives on the device unless it exceeds 4 GiB (the reference
  keeps it on the CPU, L233); rows are allocated as they arrive.
- ``cr_reduction: split`` (default) keeps the reference's two means (current rows + cached rows, which doubles the
  weight of the loss once the bank holds rows); ``mean`` is a single mean over all rows.
- The pool is in memory on the device (uint8, rounded instead of truncated), starts empty in every run and is saved
  in the checkpoint; student batches are independent uniform draws (the reference iterates a loader in passes).
  ``--cmi_init`` (a pre-inverted image folder mixed into the pool) is not supported.
- The hooked layers are named by ``feature_layers``; empty applies the reference's rule (the inputs of
  ``layer1..layer4`` for its ResNet-34 teacher, of every BatchNorm2d otherwise) to any ResNet-staged teacher.
- Negatives are drawn with torch's generator (the reference uses Python's ``random``).
- Under DDP the generator, z, pool and bank are per rank (G is re-initialised every round); the persistent head's
  gradients are averaged across ranks so it stays identical everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from dfkd.config import choice
from dfkd.data import build_augment
from dfkd.errors import ConfigError, closest
from dfkd.losses import adv_masked_kl, class_entropy, onehot_ce
from dfkd.losses.contrastive import ContrastHead, InstanceMeanHooks, MemoryBank, contrastive_loss
from dfkd.methods.base import BestIterate, Ctx, PoolConfig, PoolMethod, Progress, frozen, refuse_torchscript_teacher
from dfkd.methods.registry import METHODS
from dfkd.models import create_generator, init_dcgan_

RESNET_STAGES = ("layer1", "layer2", "layer3", "layer4")


def feature_modules(teacher: nn.Module, names: list[str]) -> list[nn.Module]:
    """The teacher layers whose inputs make CMI's instance feature.

    ``names`` are module names inside the normalising wrapper. Empty means the reference's rule: the four stages of
    a ResNet (``layer1..layer4``, which the reference uses for its ResNet-34 teacher), every BatchNorm2d otherwise.
    """
    net = getattr(teacher, "net", teacher)
    if not names:
        if all(isinstance(getattr(net, stage, None), nn.Module) for stage in RESNET_STAGES):
            return [getattr(net, stage) for stage in RESNET_STAGES]
        bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
        if not bns:
            raise ConfigError("the teacher has no BatchNorm2d layer: name CMI's layers in method.feature_layers")
        return bns
    modules = []
    known = [n for n, _ in net.named_modules() if n]
    for name in names:
        try:
            modules.append(net.get_submodule(name))
        except AttributeError:
            hint = closest(name, known)
            raise ConfigError(f"method.feature_layers: the teacher has no layer '{name}'{hint}") from None
    return modules


@dataclass
class CMIConfig(PoolConfig):
    name: str = "cmi"
    # generator (G-S), re-initialised every round
    generator: str = "dcgan"
    nz: int = 256
    ngf: int = 64
    g_steps: int = 200
    lr_g: float = 1.0e-3
    betas_g: list[float] = field(default_factory=lambda: [0.5, 0.999])
    # inversion loss
    bn: float = 1.0
    oh: float = 1.0
    adv: float = 0.5
    tau_adv: float = 1.0
    # the two views of each synthetic batch: the inversion loss is scored on the global one, the contrastive loss
    # contrasts both (`none` = the plain image). The reference's crop + flip also regularise the inversion: they gave
    # better students than the plain image even for a teacher trained without augmentation (BENCHMARKS.md:
    # Fashion-MNIST LeNet pair, 3 epochs, 50.1 vs 38.6 % validation top-1, mean of 3 seeds)
    global_view: str = "crop_flip"
    global_padding: int = 4
    local_view: str = "resized_crop_flip"
    local_scale: list[float] = field(default_factory=lambda: [0.25, 1.0])
    # contrastive loss
    cr: float = 0.8
    cr_T: float = 0.1
    cr_reduction: str = choice("split", "split", "mean")
    head_dim: int = 256
    bank_size: int = 40960  # rows of the feature memory bank
    n_neg: int = 4096  # bank rows drawn per step
    feature_layers: list[str] = field(default_factory=list)  # empty = ResNet stages, else every BatchNorm2d


@METHODS.register("cmi")
class CMI(PoolMethod):
    name = "cmi"
    Config = CMIConfig

    def __init__(self, cfg: CMIConfig, ctx: Ctx):
        super().__init__(cfg, ctx)
        c, h, w = ctx.info.image_shape
        dev = ctx.env.device
        self.generator = ctx.env.prepare(create_generator(cfg.generator, nz=cfg.nz, ngf=cfg.ngf, img_size=h, nc=c))
        refuse_torchscript_teacher(ctx.teacher, self.name, "contrastive loss on layer features", None)
        self.bn_hooks = self.bn_statistics(cfg.bn)
        self.feature_hooks = self.track(InstanceMeanHooks(feature_modules(ctx.teacher, cfg.feature_layers)))
        with torch.no_grad(), self.feature_hooks.capture():
            ctx.teacher(torch.zeros(1, c, h, w, device=dev))
        dim = self.feature_hooks.features().shape[1]
        self.head = ctx.env.prepare(ContrastHead(dim, cfg.head_dim))
        self.opt_head = torch.optim.Adam(self.head.parameters(), lr=cfg.lr_g)
        self.bank = MemoryBank(2 * dim, cfg.bank_size, dev)
        self.global_view = build_augment(cfg.global_view, padding=cfg.global_padding)
        self.local_view = build_augment(cfg.local_view, scale=tuple(cfg.local_scale))

    def _teacher_features(self, x: Tensor) -> Tensor:
        with self.feature_hooks.capture():
            self.ctx.teacher(x)
        return self.feature_hooks.features()

    def synthesize(self, prog: Progress) -> dict[str, Tensor]:
        c, student, env = self.cfg, self.ctx.student, self.ctx.env
        n = self.synthesis_batch_size
        # Step 1: a fresh generator, latent and optimiser; random sorted labels
        init_dcgan_(self.generator).train()
        z = torch.randn(n, c.nz, device=self.device, requires_grad=True)
        y = torch.randint(0, self.ctx.info.num_classes, (n,), device=self.device).sort().values
        opt = torch.optim.Adam([*self.generator.parameters(), z], c.lr_g, betas=tuple(c.betas_g))
        best = BestIterate()
        with frozen(student):
            for _ in range(c.g_steps):
                # Step 2: two views, the inversion loss on the global one, the contrastive loss across both
                with env.autocast():
                    x = env.images(self.generator(z))
                    x_global, x_local = self.global_view(x), self.local_view(x)
                    with self.feature_hooks.capture():
                        t, loss_bn = self.teacher_with_bn(x_global, self.bn_hooks)
                    f_global = self.feature_hooks.features()
                    loss_oh = onehot_ce(t, y)
                    loss_adv = adv_masked_kl(student(x_global), t, c.tau_adv) if c.adv > 0 else t.new_zeros(())
                    f_local = self._teacher_features(x_local)
                    cached_local, cached_global = self.bank.sample(c.n_neg).chunk(2, dim=1)
                    proj = self.head(torch.cat([f_local, cached_local, f_global, cached_global]))
                    q, k = proj.chunk(2)
                    split = n if c.cr_reduction == "split" else None
                    loss_cr = contrastive_loss(q, k, c.cr_T, split)
                    loss = c.bn * loss_bn + c.oh * loss_oh + c.adv * loss_adv + c.cr * loss_cr
                best.offer(loss, x, torch.cat([f_local, f_global], dim=1))
                opt.zero_grad(set_to_none=True)
                self.opt_head.zero_grad(set_to_none=True)
                loss.backward()
                env.all_reduce_grads(self.head)
                opt.step()
                self.opt_head.step()
        # Step 3: the best batch into the pool, its features into the bank
        best_x, best_features = best.values
        self.bank.add(best_features)
        return {
            "loss_g": loss.detach(),
            "loss_bn": loss_bn.detach(),
            "loss_oh": loss_oh.detach(),
            "loss_adv": loss_adv.detach(),
            "loss_cr": loss_cr.detach(),
            "best_loss": best.loss,
            "class_entropy": class_entropy(t.detach()),
            **self.add_to_pool(best_x),
        }

    def checkpoint_state(self) -> dict:
        return {"opt_head": self.opt_head.state_dict()}

    def load_checkpoint_state(self, state: dict) -> None:
        self.opt_head.load_state_dict(state["opt_head"])
