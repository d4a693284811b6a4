"""NAYER's label-conditioned generator with re-initialisable noisy layers (Tran et al., CVPR 2024).

The generator's input is not a latent z but a constant embedding per class (a row of a fixed table). The randomness
that makes two samples of one class differ comes from *noisy layers*: linear maps between the embedding and the G-S
body that are re-initialised (weights ~ N(0, noisy_std), biases 0) at the start of every generation loop and then
trained with the rest of the generator. One noisy layer serves one consecutive chunk of ``num_classes`` samples.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from dfkd.models.generators import DCGANGenerator


class NoisyLayerGenerator(nn.Module):
    """Labels -> E[y] -> BatchNorm1d -> noisy layer of the sample's chunk -> G-S body -> images in [0, 1].

    * ``embeddings`` [C, d] is a constant buffer (never trained).
    * The BatchNorm1d over the batch of embeddings always normalises with the batch's statistics (it keeps no
      running statistics): per dimension it removes what all classes share and keeps their differences.
    * Chunk i of the batch (rows ``[i*C, (i+1)*C)``, the last chunk whatever is left) goes through noisy layer i,
      a ``Linear(d -> nz)``; a batch may hold at most ``n_noisy`` chunks.
    * The body is dfkd's G-S (:func:`~dfkd.models.generators.dcgan`) at latent size ``nz``: projection to 2*ngf maps
      at img/4, two upsampling stages, a sigmoid at the end.

    Args:
        embeddings: The class-embedding table [C, d].
        n_noisy: Number of noisy layers (NAYER: ceil(synthesis batch / C)).
        nz: Output width of the noisy layers = the body's latent size (NAYER's ``le_emb_size``, 1000).
        ngf: The body's base width.
        img_size: Output height and width, divisible by 4.
        nc: Image channels.
        noisy_std: Standard deviation of the noisy layers' weights after :meth:`reinit_noisy` (NAYER: 1).

    Example:
        >>> import torch
        >>> g = NoisyLayerGenerator(torch.randn(10, 32), n_noisy=2, nz=16, ngf=8, img_size=32, nc=3)
        >>> g(torch.arange(10).repeat(2)).shape
        torch.Size([20, 3, 32, 32])
    """

    embeddings: Tensor

    def __init__(
        self, embeddings: Tensor, n_noisy: int, nz: int, ngf: int, img_size: int, nc: int, noisy_std: float = 1.0
    ):
        super().__init__()
        if embeddings.dim() != 2:
            raise ValueError(f"embeddings must be a [classes, dim] table, got shape {tuple(embeddings.shape)}")
        if n_noisy < 1:
            raise ValueError(f"n_noisy={n_noisy}: the generator needs at least one noisy layer")
        classes, dim = embeddings.shape
        self.chunk = classes
        self.noisy_std = noisy_std
        self.register_buffer("embeddings", embeddings.detach().float().clone())
        self.norm = nn.BatchNorm1d(dim, track_running_stats=False)
        self.noisy = nn.ModuleList(nn.Linear(dim, nz) for _ in range(n_noisy))
        self.body = DCGANGenerator(nz, nc, img_size, (2 * ngf, 2 * ngf, ngf))

    @staticmethod
    def layers_for(batch: int, classes: int) -> int:
        """The noisy layers a batch of ``batch`` samples needs: one per started chunk of ``classes``."""
        return math.ceil(batch / classes)

    def forward(self, labels: Tensor) -> Tensor:
        e = self.norm(self.embeddings[labels])
        chunks = e.split(self.chunk)
        if len(chunks) > len(self.noisy):
            raise ValueError(
                f"a batch of {labels.numel()} labels needs {len(chunks)} noisy layers; the generator has "
                f"{len(self.noisy)}"
            )
        return self.body(torch.cat([layer(chunk) for layer, chunk in zip(self.noisy, chunks)]))

    @torch.no_grad()
    def reinit_noisy(self) -> None:
        """Fresh noise: every noisy layer's weights ~ N(0, noisy_std), biases 0 (in place)."""
        for layer in self.noisy:
            nn.init.normal_(layer.weight, 0.0, self.noisy_std)
            nn.init.zeros_(layer.bias)

    @torch.no_grad()
    def reinit_all(self) -> None:
        """A brand-new generator in place: PyTorch's default init for every layer, BatchNorm running statistics
        reset. Parameters keep their identity, so the device, memory format and compilation the caller gave the
        module still apply."""
        for module in self.modules():
            if module is not self and hasattr(module, "reset_parameters"):
                module.reset_parameters()
