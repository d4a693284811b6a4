"""Per-sample batched augmentation: shapes, randomness per sample, correctness of the boxes, gradients, seeding."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dfkd.data import (
    AUGMENTATIONS,
    Augment,
    build_augment,
    crop_flip,
    random_crop,
    random_hflip,
    random_resized_crop,
)
from dfkd.errors import ConfigError

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

OPS = {
    "random_crop": lambda x, g: random_crop(x, 4, generator=g),
    "random_hflip": lambda x, g: random_hflip(x, generator=g),
    "crop_flip": lambda x, g: crop_flip(x, generator=g),
    "random_resized_crop": lambda x, g: random_resized_crop(x, x.shape[-1], scale=(0.25, 1.0), generator=g),
    **{f"augment:{name}": build_augment(name, scale=(0.25, 1.0)) for name in AUGMENTATIONS},
}


def gen(device, seed=0) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def ramp(n=8, c=3, h=16, w=16, device="cpu") -> torch.Tensor:
    """Distinct pixel values everywhere, the same image repeated n times."""
    img = torch.arange(c * h * w, dtype=torch.float32, device=device).reshape(1, c, h, w) / (c * h * w)
    return img.repeat(n, 1, 1, 1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", list(OPS))
def test_keeps_shape_dtype_device(op, device):
    for dtype in (torch.float32, torch.float64):
        x = torch.rand(5, 3, 12, 12, device=device, dtype=dtype)
        out = OPS[op](x, gen(device))
        assert out.shape == x.shape and out.dtype == dtype and out.device == x.device


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", list(OPS))
def test_gradients_reach_input(op, device):
    x = torch.rand(6, 3, 10, 10, device=device, requires_grad=True)
    weights = torch.rand(6, 3, 10, 10, device=device)
    (OPS[op](x, gen(device)) * weights).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


@pytest.mark.parametrize("op", list(OPS))
def test_seeded_generator_is_deterministic(op):
    x = ramp(16)
    first, again = OPS[op](x, gen("cpu", 1)), OPS[op](x, gen("cpu", 1))
    assert torch.equal(first, again)
    if op != "augment:none":
        assert not torch.equal(first, OPS[op](x, gen("cpu", 2)))


def test_random_crop_offsets_per_sample_and_correct():
    x = ramp(32, c=2, h=6, w=7)
    pad = 2
    out = random_crop(x, pad, generator=gen("cpu"))
    assert len({tuple(o.flatten().tolist()) for o in out}) > 5
    padded = F.pad(x[0], (pad, pad, pad, pad))
    windows = [padded[:, i : i + 6, j : j + 7] for i in range(2 * pad + 1) for j in range(2 * pad + 1)]
    for o in out:
        assert any(torch.equal(o, win) for win in windows)
    # Every offset, including the extremes, is reachable.
    many = random_crop(x.repeat(20, 1, 1, 1), pad, generator=gen("cpu"))
    hits = {next(k for k, win in enumerate(windows) if torch.equal(o, win)) for o in many}
    assert hits == set(range(len(windows)))


def test_random_crop_fill_padding_zero_and_integers():
    x = torch.rand(4, 3, 8, 8)
    assert torch.equal(random_crop(x, 0), x)
    filled = random_crop(torch.zeros(64, 1, 4, 4), 3, fill=1.0, generator=gen("cpu"))
    assert set(filled.unique().tolist()) == {0.0, 1.0}
    u8 = torch.randint(0, 256, (5, 3, 8, 8), dtype=torch.uint8)
    out = random_crop(u8, 2, generator=gen("cpu"))
    assert out.dtype == torch.uint8 and out.shape == u8.shape
    with pytest.raises(ValueError, match="padding"):
        random_crop(x, -1)
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        random_crop(x[0], 2)


def test_random_hflip_flips_about_half():
    x = ramp(2000, c=1, h=3, w=5)
    out = random_hflip(x, generator=gen("cpu"))
    flipped = (out == x.flip(-1)).flatten(1).all(1)
    kept = (out == x).flatten(1).all(1)
    assert torch.all(flipped ^ kept)
    assert 0.45 < flipped.float().mean() < 0.55
    assert torch.equal(random_hflip(x, p=0.0), x)
    assert torch.equal(random_hflip(x, p=1.0), x.flip(-1))


def test_resized_crop_full_box_is_identity():
    x = torch.rand(6, 3, 16, 16)
    out = random_resized_crop(x, 16, scale=(1.0, 1.0), ratio=(1.0, 1.0), generator=gen("cpu"))
    torch.testing.assert_close(out, x, atol=1e-5, rtol=0)


def test_resized_crop_samples_exact_integer_boxes():
    # An 8x8 box (area 1/4 of 16x16, ratio 1) resampled to 8x8 lands on pixel centres: an exact crop.
    x = ramp(24, c=2, h=16, w=16)
    out = random_resized_crop(x, 8, scale=(0.25, 0.25), ratio=(1.0, 1.0), generator=gen("cpu"))
    assert out.shape == (24, 2, 8, 8)
    crops = [x[0, :, i : i + 8, j : j + 8] for i in range(9) for j in range(9)]
    found = set()
    for o in out:
        matches = [k for k, crop in enumerate(crops) if torch.allclose(o, crop, atol=1e-5)]
        assert len(matches) == 1
        found.add(matches[0])
    assert len(found) > 5  # each sample its own box


def test_resized_crop_sizes_ranges_and_fallback():
    x = torch.rand(10, 3, 16, 16)
    assert random_resized_crop(x, 8).shape == (10, 3, 8, 8)
    assert random_resized_crop(x, (8, 12)).shape == (10, 3, 8, 12)
    out = random_resized_crop(x, 32, scale=(0.08, 0.3), generator=gen("cpu"))
    assert out.min() >= x.min() - 1e-6 and out.max() <= x.max() + 1e-6
    # No try can fit (ratio 4 on a square with the whole area): central crop of width 16, height 4.
    stripe = torch.arange(16.0).reshape(1, 1, 16, 1).expand(3, 1, 16, 16)
    fallback = random_resized_crop(stripe, (4, 16), scale=(1.0, 1.0), ratio=(4.0, 4.0), generator=gen("cpu"))
    torch.testing.assert_close(fallback, stripe[:, :, 6:10, :], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="floating-point"):
        random_resized_crop(x.to(torch.uint8), 8)


def test_build_augment():
    x = ramp(16)
    assert torch.equal(build_augment("none")(x), x)
    assert torch.equal(build_augment("crop", padding=0)(x), x)
    assert torch.equal(build_augment("flip", p=1.0)(x), x.flip(-1))
    aug = build_augment("crop_flip", padding=4)
    assert isinstance(aug, Augment) and "padding=4" in repr(aug)
    assert torch.equal(aug(x, gen("cpu", 5)), crop_flip(x, 4, generator=gen("cpu", 5)))
    local = build_augment("resized_crop_flip", scale=(0.25, 1.0), size=8)
    assert local(x).shape == (16, 3, 8, 8)
    with pytest.raises(ConfigError, match="did you mean 'crop_flip'"):
        build_augment("crop_flp")
    with pytest.raises(ConfigError, match="unknown augmentation 'jitter'"):
        build_augment("jitter")
    with pytest.raises(ConfigError, match="did you mean 'padding'"):
        build_augment("crop", pading=4)
    for bad in ({"padding": -1}, {"padding": 2.5}, {"scale": (0.0, 1.0)}, {"scale": (0.9, 0.5)},
                {"ratio": (2.0, 1.0)}, {"p": 1.5}):
        with pytest.raises(ConfigError):
            build_augment("crop_flip", **bad)
