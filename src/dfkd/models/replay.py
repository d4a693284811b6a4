"""Networks of the replay methods (Binici et al., MB-DFKD and PRE-DFKD): PRE-DFKD's VAE encoder and the uniform
initialisation of its generators (official code ``kuluhan/PRE-DFKD@0b39f6a`` ``networks/generator.py``).

The novel and memory generators themselves are registered generators (:func:`~dfkd.models.create_generator`): the
official ones are ``pre_dfkd`` (spectral-norm convolutions) and ``pre_dfkd_memory``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from dfkd.models.generators import create_generator


@torch.no_grad()
def init_uniform_(module: nn.Module, bound: float = 0.08) -> nn.Module:
    """Conv and linear weights ~ U(-bound, bound), biases 0, as the official PRE-DFKD networks; return ``module``.

    A spectrally normalised weight is initialised through its unnormalised original (the official code's init writes
    the same storage), so the normalisation still applies.
    """
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            if parametrize.is_parametrized(m, "weight"):
                nn.init.uniform_(m.parametrizations.weight.original, -bound, bound)
            else:
                nn.init.uniform_(m.weight, -bound, bound)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return module


def replay_generator(name: str, nz: int, ngf: int, image_shape: tuple[int, int, int]) -> nn.Module:
    """A novel or memory generator: the registered generator ``name`` with the official uniform initialisation."""
    c, h, _ = image_shape
    return init_uniform_(create_generator(name, nz=nz, ngf=ngf, img_size=h, nc=c))


def _conv_bn(c_in: int, c_out: int, stride: int = 1, act: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1), nn.BatchNorm2d(c_out)]
    if act:
        layers.append(nn.LeakyReLU(0.2))
    return nn.Sequential(*layers)


class ReplayEncoder(nn.Module):
    """PRE-DFKD's VAE encoder: images -> (reparameterised z, mu, logvar).

    ``F.normalize`` along the image height (as the official encoder does), conv(C->ngf)-BN-LReLU,
    conv(ngf->2ngf)-BN-LReLU, downsample x0.5, conv(2ngf->2ngf, stride 2)-BN, downsample x0.5, then two linear heads
    for mu and log-variance. ``ngf=64`` is the official encoder (the mirror of its ngf-64 generator); its BN eps of
    0.8 (the DAFL momentum/eps slip) is the default 1e-5 here.

    Args:
        nc: image channels.
        img_size: image height and width.
        latent_dim: size of z.
        ngf: base width.
    """

    def __init__(self, nc: int, img_size: int, latent_dim: int, ngf: int = 64):
        super().__init__()
        self.features = nn.Sequential(
            _conv_bn(nc, ngf), _conv_bn(ngf, 2 * ngf), nn.Upsample(scale_factor=0.5),
            _conv_bn(2 * ngf, 2 * ngf, 2, act=False), nn.Upsample(scale_factor=0.5), nn.Flatten(),
        )  # fmt: skip
        with torch.no_grad():
            width = self.features.eval()(torch.zeros(1, nc, img_size, img_size)).shape[1]
        self.features.train()
        self.fc_mu = nn.Linear(width, latent_dim)
        self.fc_logvar = nn.Linear(width, latent_dim)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        h = self.features(F.normalize(x, p=2, dim=2))
        mu, logvar = self.fc_mu(h), self.fc_logvar(h)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)  # the reparameterisation trick
        return z, mu, logvar
