"""DCGAN-style generators of the CMI benchmark (z in R^nz -> images in [0, 1]) and the original papers' generators.

Both generators project z with a linear layer onto a small feature map, then alternate nearest-neighbour x2
upsampling with conv-BN-LeakyReLU, and end in a 3x3 conv and a sigmoid. Normalisation is applied outside (by the
:class:`~dfkd.models.Normalized` wrapper of the networks), never inside the generator. Parameter names
(``l1.0``, ``conv_blocks.N``) follow CMI's ``Generator``/``LargeGenerator``.

The generators of DAFL, DFAD and ZSKT (``dafl``, ``dfad``, ``zskt``) end in an affine-free BatchNorm and emit images
in the classifiers' normalised input space; :func:`in_unit_range` maps them to [0, 1] for the rest of the library.

Builders have the signature ``fn(nz, ngf, img_size, nc, **kw) -> nn.Module``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from dfkd.errors import ConfigError
from dfkd.registry import Registry

GENERATORS: Registry[Callable[..., nn.Module]] = Registry("generator")


class DCGANGenerator(nn.Module):
    """Linear projection to ``channels[0]`` maps of ``img_size / 2**k``, then ``k`` upsampling stages.

    Stage ``i`` is ``Upsample x2 -> Conv3x3(channels[i] -> channels[i+1], no bias) -> BN -> LeakyReLU(0.2)``, with
    ``k = len(channels) - 1``; a BN on the projected map comes first and ``Conv3x3(channels[-1] -> nc) -> Sigmoid``
    last.

    Args:
        nz: Latent size.
        nc: Image channels.
        img_size: Output height and width; divisible by ``2**k``.
        channels: Feature widths, from the projected map to the last hidden stage.
    """

    def __init__(self, nz: int, nc: int, img_size: int, channels: Sequence[int]):
        super().__init__()
        self.nz, self.img_size = nz, img_size
        self.init_size = img_size // 2 ** (len(channels) - 1)
        self.l1 = nn.Sequential(nn.Linear(nz, channels[0] * self.init_size**2))
        layers: list[nn.Module] = [nn.BatchNorm2d(channels[0])]
        for c_in, c_out in zip(channels[:-1], channels[1:]):
            layers += [
                nn.Upsample(scale_factor=2),
                nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, bias=False),
                nn.BatchNorm2d(c_out),
                nn.LeakyReLU(0.2),
            ]
        layers += [nn.Conv2d(channels[-1], nc, kernel_size=3, padding=1), nn.Sigmoid()]
        self.conv_blocks = nn.Sequential(*layers)
        self.first_conv = next(i for i, m in enumerate(layers) if isinstance(m, nn.Conv2d))  # an index, not a module

    def forward(self, z: Tensor) -> Tensor:
        # Flatten so that DCGAN-style [B, nz, 1, 1] noise works too.
        out = self.l1(torch.flatten(z, 1))
        x = out.view(out.shape[0], -1, self.init_size, self.init_size)
        if self.conv_blocks[self.first_conv].weight.is_contiguous(memory_format=torch.channels_last):
            # A channels_last generator starts its maps in that format; a plain view would make every stage
            # convert its input and gradient (three copies of an upsampled map per stage).
            x = x.contiguous(memory_format=torch.channels_last)
        return self.conv_blocks(x)


def _check(name: str, nz: int, ngf: int, img_size: int, nc: int, factor: int, extra: dict[str, Any]) -> None:
    if extra:
        raise ConfigError(f"generator '{name}' has no option(s) {sorted(extra)}; remove them from the config")
    if min(nz, ngf, nc) < 1:
        raise ConfigError(f"generator '{name}' needs nz, ngf and nc >= 1, got nz={nz}, ngf={ngf}, nc={nc}")
    if img_size < factor or img_size % factor:
        raise ConfigError(f"generator '{name}' needs img_size divisible by {factor}, got {img_size}")


@GENERATORS.register("dcgan")
def dcgan(nz: int, ngf: int, img_size: int, nc: int, **kw: Any) -> nn.Module:
    """CMI's standard ``Generator`` (G-S): projection to 2*ngf maps at img/4, two upsampling stages (2*ngf, ngf).

    Used by CMI (nz 256), FastDFKD and NAYER. ``img_size`` must be divisible by 4 (28 and 32 both work).
    """
    _check("dcgan", nz, ngf, img_size, nc, 4, kw)
    return DCGANGenerator(nz, nc, img_size, (2 * ngf, 2 * ngf, ngf))


@GENERATORS.register("dcgan_large")
def dcgan_large(nz: int, ngf: int, img_size: int, nc: int, depth: int = 2, **kw: Any) -> nn.Module:
    """CMI's ``LargeGenerator`` (G-L) = CuDFKD's ``DCGAN_Generator_CIFAR10`` (G-Cu).

    Projection to ngf*2**depth maps at img/2**depth, then ``depth`` upsampling stages that halve the width down to
    ngf. ``depth=2`` is LargeGenerator layer for layer (CIFAR); CuDFKD uses ``depth=3`` at 64 px (Tiny-ImageNet).
    ``img_size`` must be divisible by ``2**depth``.
    """
    if depth < 1:
        raise ConfigError(f"generator 'dcgan_large' needs depth >= 1, got {depth}")
    _check("dcgan_large", nz, ngf, img_size, nc, 2**depth, kw)
    return DCGANGenerator(nz, nc, img_size, tuple(ngf * 2**i for i in range(depth, -1, -1)))


def create_generator(name: str, nz: int, ngf: int, img_size: int, nc: int, **kw: Any) -> nn.Module:
    """Build a registered generator with PyTorch's default init (call :func:`init_dcgan_` for CMI's).

    Args:
        name: Registry name, e.g. ``"dcgan"`` or ``"dcgan_large"``.
        nz: Latent size.
        ngf: Base feature width.
        img_size: Output height and width.
        nc: Output channels.
        **kw: Generator-specific options (``depth`` for ``dcgan_large``).

    Returns:
        A module mapping ``z`` of shape [B, nz] to images of shape [B, nc, img_size, img_size] in [0, 1].

    Example:
        >>> import torch
        >>> from dfkd.models import create_generator
        >>> g = create_generator("dcgan", nz=64, ngf=16, img_size=32, nc=3)
        >>> g(torch.randn(2, 64)).shape
        torch.Size([2, 3, 32, 32])
    """
    return GENERATORS.build(name, nz, ngf, img_size, nc, **kw)


@torch.no_grad()
def init_dcgan_(module: nn.Module) -> nn.Module:
    """Re-initialise ``module`` in place as CMI's ``reset_model`` does; return it.

    Conv, transposed-conv and linear weights ~ N(0, 0.02) with zero bias; BatchNorm weights ~ N(1, 0.02) with
    zero bias.

    Args:
        module: Any module; its submodules of the listed types are re-initialised.

    Returns:
        The same module.
    """
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d) and m.affine:
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)
    return module


# -- the original papers' generators: they end in BatchNorm2d(affine=False) and emit normalised-space images ----------


class GeneratorA(nn.Module):
    """DAFL's and DFAD's "GeneratorA": Linear, BN, then (up x2, conv-BN-LReLU) twice, conv, Tanh, BN.

    The last layer is ``BatchNorm2d(nc, affine=False)``, so each batch comes out with zero mean and unit variance
    per channel: images in the classifier's normalised input space (wrap with :func:`in_unit_range`). Parameter
    names (``l1``, ``conv_blocks0..2``) follow the DAFL code.

    Args:
        nz: Latent size.
        nc: Image channels.
        img_size: Output height and width, divisible by 4.
        ngf: Width of the last hidden stage (the projected map has 2 * ngf channels; 64 in both papers).
        bn_eps: eps of the two hidden BatchNorms (DAFL passes 0.8 where a momentum was presumably meant).
        spectral_norm: spectral normalisation of the three convolutions (PRE-DFKD's novel generator).
    """

    output_space = "normalized"

    def __init__(self, nz: int, nc: int, img_size: int, ngf: int, bn_eps: float, spectral_norm: bool = False):
        super().__init__()
        self.init_size = img_size // 4
        self.l1 = nn.Sequential(nn.Linear(nz, 2 * ngf * self.init_size**2))
        self.conv_blocks0 = nn.Sequential(nn.BatchNorm2d(2 * ngf))
        self.conv_blocks1 = nn.Sequential(
            nn.Conv2d(2 * ngf, 2 * ngf, 3, stride=1, padding=1),
            nn.BatchNorm2d(2 * ngf, eps=bn_eps),
            nn.LeakyReLU(0.2),
        )
        self.conv_blocks2 = nn.Sequential(
            nn.Conv2d(2 * ngf, ngf, 3, stride=1, padding=1),
            nn.BatchNorm2d(ngf, eps=bn_eps),
            nn.LeakyReLU(0.2),
            nn.Conv2d(ngf, nc, 3, stride=1, padding=1),
            nn.Tanh(),
            nn.BatchNorm2d(nc, affine=False),
        )
        if spectral_norm:
            for conv in (self.conv_blocks1[0], self.conv_blocks2[0], self.conv_blocks2[3]):
                nn.utils.parametrizations.spectral_norm(conv)

    def forward(self, z: Tensor) -> Tensor:
        out = self.l1(torch.flatten(z, 1))
        img = self.conv_blocks0(out.view(out.shape[0], -1, self.init_size, self.init_size))
        img = self.conv_blocks1(nn.functional.interpolate(img, scale_factor=2))
        return self.conv_blocks2(nn.functional.interpolate(img, scale_factor=2))


class ZSKTGenerator(nn.Module):
    """ZSKT's generator: Linear -> BN -> up to img/2 -> conv-BN-LReLU -> up x2 -> conv-BN-LReLU -> conv -> BN.

    At 32 px the projected map is 10x10 and the first upsampling is x1.6 (10 -> 16), as in the ZSKT code; other sizes
    scale the same way (``init = img_size * 5 // 16``). The last layer is ``BatchNorm2d(nc, affine=False)``: images in
    the normalised input space (wrap with :func:`in_unit_range`).
    """

    output_space = "normalized"

    def __init__(self, nz: int, nc: int, img_size: int, ngf: int):
        super().__init__()
        self.init_size = img_size * 5 // 16
        self.layers = nn.Sequential(
            nn.Linear(nz, 2 * ngf * self.init_size**2),
            nn.Unflatten(1, (2 * ngf, self.init_size, self.init_size)),
            nn.BatchNorm2d(2 * ngf),
            nn.Upsample(size=(img_size // 2, img_size // 2)),
            nn.Conv2d(2 * ngf, 2 * ngf, 3, stride=1, padding=1),
            nn.BatchNorm2d(2 * ngf),
            nn.LeakyReLU(0.2),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(2 * ngf, ngf, 3, stride=1, padding=1),
            nn.BatchNorm2d(ngf),
            nn.LeakyReLU(0.2),
            nn.Conv2d(ngf, nc, 3, stride=1, padding=1),
            nn.BatchNorm2d(nc, affine=False),
        )

    def forward(self, z: Tensor) -> Tensor:
        return self.layers(torch.flatten(z, 1))


@GENERATORS.register("dafl")
def dafl(nz: int, ngf: int, img_size: int, nc: int, **kw: Any) -> nn.Module:
    """DAFL's GeneratorA (Chen et al. 2019): hidden BatchNorms with eps 0.8; nz 100 (MNIST) / 1000 (CIFAR), ngf 64."""
    _check("dafl", nz, ngf, img_size, nc, 4, kw)
    return GeneratorA(nz, nc, img_size, ngf, bn_eps=0.8)


@GENERATORS.register("dfad")
def dfad(nz: int, ngf: int, img_size: int, nc: int, **kw: Any) -> nn.Module:
    """DFAD's GeneratorA (Fang et al. 2019): DAFL's layout with default BatchNorm eps; nz 256, ngf 64."""
    _check("dfad", nz, ngf, img_size, nc, 4, kw)
    return GeneratorA(nz, nc, img_size, ngf, bn_eps=1e-5)


@GENERATORS.register("pre_dfkd")
def pre_dfkd(nz: int, ngf: int, img_size: int, nc: int, **kw: Any) -> nn.Module:
    """PRE-DFKD's (and MB-DFKD's) novel generator (Binici et al. 2022): DAFL's GeneratorA with spectral-norm
    convolutions, hidden BatchNorm eps 0.8, Tanh then an affine-free BatchNorm at the output; latent 1000, ngf 64."""
    _check("pre_dfkd", nz, ngf, img_size, nc, 4, kw)
    return GeneratorA(nz, nc, img_size, ngf, bn_eps=0.8, spectral_norm=True)


@GENERATORS.register("pre_dfkd_memory")
def pre_dfkd_memory(nz: int, ngf: int, img_size: int, nc: int, **kw: Any) -> nn.Module:
    """PRE-DFKD's memory generator (the VAE decoder): the novel generator's layout without spectral normalisation."""
    _check("pre_dfkd_memory", nz, ngf, img_size, nc, 4, kw)
    return GeneratorA(nz, nc, img_size, ngf, bn_eps=0.8)


@GENERATORS.register("zskt")
def zskt(nz: int, ngf: int, img_size: int, nc: int, **kw: Any) -> nn.Module:
    """ZSKT's generator (Micaelli & Storkey 2019): 10x10 projection at 32 px, affine-free BN output; nz 100, ngf 64."""
    _check("zskt", nz, ngf, img_size, nc, 2, kw)
    if img_size < 8:
        raise ConfigError(f"generator 'zskt' needs img_size >= 8, got {img_size}")
    return ZSKTGenerator(nz, nc, img_size, ngf)


class UnitRange(nn.Module):
    """Images in [0, 1] from a generator that emits normalised-space images: clamp(x_n * std + mean, 0, 1).

    The :class:`~dfkd.models.Normalized` classifiers map such an image back to x_n exactly wherever no clamping
    happened, so the teacher sees what the original code fed it, except for values outside the valid image range.
    """

    mean: Tensor
    std: Tensor

    def __init__(self, net: nn.Module, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, z: Tensor) -> Tensor:
        return (self.net(z) * self.std + self.mean).clamp(0.0, 1.0)


def in_unit_range(generator: nn.Module, mean: Sequence[float], std: Sequence[float]) -> nn.Module:
    """``generator`` if it already emits [0, 1] images, else wrapped in :class:`UnitRange` (the original generators).

    Args:
        generator: A generator; those with ``output_space == "normalized"`` are wrapped.
        mean: The dataset's per-channel mean (the normalisation the classifiers apply).
        std: The dataset's per-channel std.

    Example:
        >>> import torch
        >>> from dfkd.models.generators import create_generator, in_unit_range
        >>> g = in_unit_range(create_generator("dfad", nz=8, ngf=4, img_size=16, nc=1), (0.5,), (0.25,))
        >>> x = g(torch.randn(4, 8))
        >>> bool(x.min() >= 0 and x.max() <= 1)
        True
    """
    if getattr(generator, "output_space", "unit") == "normalized":
        return UnitRange(generator, mean, std)
    return generator
