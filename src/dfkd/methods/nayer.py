"""NAYER: Noisy Layer Data Generation for Efficient and Effective Data-free Knowledge Distillation.

Tran et al., CVPR 2024 (arXiv 2310.00258). Reference code: ``tmtuan1307/NAYER@c6bedcd``,
``datafree/synthesis/nayer.py`` (``NAYER.synthesize`` L147-243, ``generate_ys`` L259), ``datafree/models/generator.py``
(``NLGenerator`` L15-80), ``datafree/hooks.py`` (DeepInversionHook with momentum), ``datafree_kd.py`` (the epoch loop
with its synthesis-only warm-up, L378-398; the student step ``train`` L442), ``label_embedding/label_embedding.py``
and ``scripts/nayer_{100,200,300}.sh``.

Algorithm (one synthesis per round; the reference runs one round and 400 student steps per epoch, after W = 20 epochs
of synthesis only, ``train.synthesis_warmup_epochs``; n counts synthesis rounds from the very first, warm-up
included):

1. The generator (:class:`~dfkd.models.conditional.NoisyLayerGenerator`): a constant label-embedding table E [C, d]
   -> BatchNorm1d (batch statistics) -> noisy layer i for the i-th chunk of C samples (``Linear(d -> le_emb_size)``)
   -> the G-S body -> sigmoid. It is re-created (PyTorch's default init) when (n - W) mod g_life = 0 or
   n mod g_life = 0, and otherwise persists across rounds.
2. ``gwp_loops`` generation loops during the warm-up, ``g_loops`` after it. Each loop:
   a. re-initialise the noisy layers (weights ~ N(0, noisy_std), biases 0);
   b. labels: floor(B_s / C) copies of 0..C-1 in order, then B_s mod C uniform labels;
   c. a fresh Adam over every generator parameter (body, BatchNorm1d, noisy layers), lr_g, betas (0.5, 0.999);
   d. ``g_steps`` times: x = G(y) in [0, 1]; x_a = flip(crop_pad4(x)) per sample; t = T(x_a);
      L = bn * L_bn^mmt + oh * CE(t, y) + adv * L_adv(S(x_a), t), with L_bn^mmt the BatchNorm-statistics loss
      against the batch statistics blended with their moving average over earlier loops (momentum ``bn_momentum``)
      and L_adv the decision-masked adversarial KL at tau 1, only after the warm-up; the lowest-L iterate is kept;
   e. the moving average takes the last step's statistics; the best batch joins the pool.
3. After the warm-up: the student trains on random pool batches (the dataset's training augmentation), KD at
   temperature T (20).

Label-text embeddings. In the paper E holds CLIP ViT-B/32 text features (``encode_text`` of "a image of {class}",
512-d, not normalised). They are outside knowledge, not from the teacher (as the issue's reviewers noted), and they
need a text encoder this package does not ship. ``embeddings`` therefore takes:

- ``random`` (default): a fixed N(0, 1) table [C, embed_dim] drawn from its own seed, the same in every run whatever
  the run's seed. It keeps the architecture, the per-class constant input, the noisy-layer diversity and the whole
  loop, and loses the inter-class similarity the paper credits for its speed. Results with it are **NAYER-noLTE**,
  not NAYER.
- ``onehot``: E = I_C (d = C); also NAYER-noLTE.
- a path to a ``.pt`` (a tensor, loaded weights-only) or ``.npy`` (no pickles) file holding a [C, d] float table,
  one row per class in the dataset's class order. With CLIP available elsewhere, the paper's table is::

      import clip  # OpenAI CLIP: pip install git+https://github.com/openai/CLIP
      import torch
      from dfkd.data import dataset_info

      model, _ = clip.load("ViT-B/32", device="cpu")
      names = [n.replace("_", " ").replace("-", " ") for n in dataset_info("cifar100").classes]
      with torch.no_grad():
          table = model.encode_text(clip.tokenize(["a image of " + n for n in names])).float()
      torch.save(table, "cifar100-clip-vitb32.pt")  # then method.embeddings=cifar100-clip-vitb32.pt

The table's short sha256 is logged once per run.

Deviations:
- The student stays in eval mode in every generation loop. The reference calls ``student.train()`` at the end of
  each loop, so from the second loop of an epoch on its adversarial forward uses batch statistics and moves the
  student's BatchNorm running statistics; ``student_mode_leak: true`` reproduces that.
- The counters are synthesis rounds, warm-up included (the reference counts synthesize() calls, one per epoch in every
  shipped script); ``g_life`` and the re-creation rule count rounds. The rule is the reference's as written: when W is
  not a multiple of g_life it fires twice per g_life window.
- The BatchNorm1d keeps no running statistics (the reference's does, but never leaves train mode, so they are unused).
- The generator is re-initialised in place (same parameters) instead of being rebuilt; the noisy layers are one
  ``Linear`` each, as in the reference.
- The label-embedding table is one of the data-free fallbacks above unless a file is given (the reference loads
  CUDA float16 pickles of CLIP features, which this package never unpickles).
- The pool is in memory on the device (uint8, rounded instead of truncated), saved with checkpoints; student batches
  are independent uniform draws (the reference writes PNGs and rebuilds a loader after every loop).
- Everything carried across rounds (generator with its BatchNorm statistics, moving averages, pool) is checkpointed
  every epoch, so a run resumes exactly (the reference saves only the best student).
- The BatchNorm hooks compute their loss only during synthesis; teacher and student get no parameter gradients
  during synthesis; dead reference options (``bnt``, ``oht``, ``cr_loop``, ``reset_l0``, the ImageNet label list)
  are not ported.
- Under DDP the generator and the pool are per rank (ranks are seeded apart, so they synthesise different images);
  the moving averages are averaged across ranks after each update. The reference is single-GPU.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from dfkd.errors import ConfigError
from dfkd.losses import class_entropy
from dfkd.methods.base import BestIterate, Ctx, MomentumInversionConfig, MomentumInversionMethod, Progress, frozen
from dfkd.methods.registry import METHODS
from dfkd.models.conditional import NoisyLayerGenerator

log = logging.getLogger(__name__)

# The random table's own seed: every run, whatever its seed, conditions on the same codes.
RANDOM_EMBEDDINGS_SEED = 0
TABLE_FILES = (".pt", ".pth", ".npy")


# -- pure functions (tested in tests/test_nayer.py) ------------------------------------------------------------------


def nayer_labels(n: int, num_classes: int, device: torch.device | str | None = None) -> Tensor:
    """``n // C`` copies of 0..C-1 in order, then ``n % C`` uniform labels (the reference's ``generate_ys``): each
    full chunk of C samples holds every class once."""
    full = torch.arange(num_classes, device=device).repeat(n // num_classes)
    rest = torch.randint(0, num_classes, (n % num_classes,), device=device)
    return torch.cat([full, rest])


def recreate_generator(n: int, warmup: int, g_life: int) -> bool:
    """Whether synthesis round ``n`` (0-based, warm-up included) starts with a brand-new generator: the reference's
    ``(n - W) % g_life == 0 or n % g_life == 0`` (Python's modulo, so it holds for n < W too)."""
    return (n - warmup) % g_life == 0 or n % g_life == 0


def label_embeddings(spec: str, num_classes: int, embed_dim: int) -> Tensor:
    """The [C, d] float32 table ``method.embeddings`` names: ``random``, ``onehot`` or a ``.pt``/``.npy`` file."""
    if spec == "random":
        generator = torch.Generator().manual_seed(RANDOM_EMBEDDINGS_SEED)
        return torch.randn(num_classes, embed_dim, generator=generator)
    if spec == "onehot":
        return torch.eye(num_classes)
    return load_embedding_table(spec, num_classes)


def load_embedding_table(spec: str, num_classes: int) -> Tensor:
    """A [num_classes, d] float table from a ``.pt`` file (a tensor, loaded weights-only) or a ``.npy`` file
    (pickles refused); every problem is a one-line :class:`~dfkd.errors.ConfigError`."""
    path = Path(spec).expanduser()
    what = f"give random, onehot or a {'/'.join(TABLE_FILES)} file holding a [{num_classes}, dim] float tensor"
    if path.suffix not in TABLE_FILES:
        raise ConfigError(f"method.embeddings='{spec}' is not random, onehot or a table file: {what}")
    if not path.is_file():
        raise ConfigError(f"method.embeddings: no file {path}; {what}")
    try:
        if path.suffix == ".npy":
            table = torch.from_numpy(np.load(path, allow_pickle=False))
        else:
            table = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any unreadable file is a config problem, reported in one line
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"method.embeddings: cannot read {path} without pickles ({reason}); {what}") from None
    if not torch.is_tensor(table):
        raise ConfigError(f"method.embeddings: {path} holds a {type(table).__name__}, not a tensor; {what}")
    if not table.is_floating_point():
        raise ConfigError(f"method.embeddings: {path} holds a {table.dtype} tensor; {what}")
    if table.dim() != 2 or table.shape[0] != num_classes:
        raise ConfigError(
            f"method.embeddings: {path} holds a table of shape {tuple(table.shape)} but the dataset has "
            f"{num_classes} classes; {what} (one row per class, in the dataset's class order)"
        )
    table = table.float()
    if not torch.isfinite(table).all():
        raise ConfigError(f"method.embeddings: {path} holds NaN or infinite values; {what}")
    return table


def table_digest(table: Tensor) -> str:
    """The first 12 hex digits of the sha256 of the float32 table's bytes (row-major)."""
    data = table.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()
    return hashlib.sha256(data).hexdigest()[:12]


@dataclass
class NAYERConfig(MomentumInversionConfig):
    name: str = "nayer"
    # the label-embedding table: random | onehot | a .pt/.npy file [C, d] (CLIP text features for the paper's LTE)
    embeddings: str = "random"
    embed_dim: int = 512  # width of the random table (onehot: C; a file: its own)
    # generator: noisy layers d -> le_emb_size, then G-S at latent size le_emb_size
    le_emb_size: int = 1000
    noisy_std: float = 1.0
    ngf: int = 64
    synthesis_batch_size: int | None = 400  # images per loop; one noisy layer per started chunk of C
    # generation loops: g_steps Adam steps each (CIFAR-10 30, CIFAR-100 40); loops per round: gwp_loops in the
    # warm-up, g_loops after; a new generator every g_life rounds (the reference's rule, recreate_generator)
    g_steps: int = 30
    lr_g: float = 4e-3
    betas_g: list[float] = field(default_factory=lambda: [0.5, 0.999])
    g_life: int = 10
    g_loops: int = 2
    gwp_loops: int = 10
    # the reference leaves the student in train mode after each loop (see Deviations); false keeps it in eval mode
    student_mode_leak: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("g_life", "g_loops", "gwp_loops", "embed_dim", "le_emb_size", "ngf"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: give {name} >= 1")
        if self.noisy_std <= 0:
            raise ValueError(f"noisy_std={self.noisy_std}: give a positive standard deviation")


@METHODS.register("nayer")
class NAYER(MomentumInversionMethod):
    name = "nayer"
    Config = NAYERConfig

    def __init__(self, cfg: NAYERConfig, ctx: Ctx):
        super().__init__(cfg, ctx)
        c, h, _ = ctx.info.image_shape
        classes = ctx.info.num_classes
        table = label_embeddings(cfg.embeddings, classes, cfg.embed_dim)
        label = "NAYER-noLTE" if cfg.embeddings in ("random", "onehot") else "a user table"
        log.info(
            "nayer: label embeddings %s [%d x %d], sha256 %s (%s)",
            cfg.embeddings,
            *table.shape,
            table_digest(table),
            label,
        )
        n_noisy = NoisyLayerGenerator.layers_for(self.synthesis_batch_size, classes)
        generator = NoisyLayerGenerator(table, n_noisy, cfg.le_emb_size, cfg.ngf, h, c, cfg.noisy_std)
        self.generator = ctx.env.prepare(generator)

    def loops(self, prog: Progress) -> int:
        return self.cfg.gwp_loops if prog.in_warmup else self.cfg.g_loops

    def adversarial_on(self, prog: Progress) -> bool:
        return self.cfg.adv > 0 and not prog.in_warmup

    def synthesize(self, prog: Progress) -> dict[str, Tensor | float]:
        c, env, student = self.cfg, self.ctx.env, self.ctx.student
        generator = self.generator
        # Step 1: a brand-new generator by the reference's lifetime rule
        recreated = recreate_generator(prog.synthesis_round, prog.warmup_rounds, c.g_life)
        if recreated:
            generator.reinit_all()
        generator.train()
        adversarial = self.adversarial_on(prog)
        loops = self.loops(prog)
        with frozen(student):
            for loop in range(loops):
                student.train(c.student_mode_leak and loop > 0)
                # Step 2a-c: fresh noise, the label layout, a fresh optimiser over the whole generator
                generator.reinit_noisy()
                y = nayer_labels(self.synthesis_batch_size, self.ctx.info.num_classes, self.device)
                opt = torch.optim.Adam(generator.parameters(), lr=c.lr_g, betas=tuple(c.betas_g))
                best = BestIterate()
                # Step 2d: g_steps steps on the synthesis loss, keeping the lowest-loss batch
                for _ in range(c.g_steps):
                    with env.autocast():
                        x = env.images(generator(y))
                        loss, t, terms = self.inversion_loss(x, y, adversarial)
                    best.offer(loss, x)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                # Step 2e: the moving averages take the last step's statistics; the best batch joins the pool
                self.update_bn_statistics()
                pool_log = self.add_to_pool(best.values[0])
        return {
            "loss_g": loss.detach(),
            **{k: v.detach() for k, v in terms.items()},
            "best_loss": best.loss,
            "class_entropy": class_entropy(t.detach()),
            "loops": float(loops),
            "generator_recreated": float(recreated),
            **pool_log,
        }
