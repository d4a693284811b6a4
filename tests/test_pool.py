"""The synthetic-image pool and its ring store: uint8 quantisation, capacity, sampling, checkpoint round trip."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from dfkd.data import RingStore, SyntheticPool, to_uint8


def numbered(first: int, n: int, shape=(1, 2, 2)) -> torch.Tensor:
    """Images whose every pixel is (index / 255): each image is identified by its value."""
    return (torch.arange(first, first + n, dtype=torch.float32) / 255).view(n, 1, 1, 1).expand(n, *shape).clone()


def ids(images01: torch.Tensor) -> list[int]:
    return [round(v) for v in (images01[:, 0, 0, 0] * 255).tolist()]


def save_load(module: nn.Module, fresh: nn.Module) -> None:
    buffer = io.BytesIO()
    torch.save(module.state_dict(), buffer)
    buffer.seek(0)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))


def test_a_new_pool_is_empty():
    pool = SyntheticPool((3, 4, 4), capacity=10)
    assert len(pool) == 0 and pool.storage.numel() == 0
    with pytest.raises(RuntimeError, match="empty"):
        pool.sample(2)
    other = SyntheticPool((3, 4, 4))
    other.add(torch.rand(5, 3, 4, 4))
    assert len(SyntheticPool((3, 4, 4))) == 0  # nothing is shared between pools (no directory to re-read)


def test_add_quantises_to_uint8_and_sample_returns_those_levels():
    pool = SyntheticPool((3, 5, 5))
    x = torch.rand(6, 3, 5, 5) * 1.2 - 0.1  # out-of-range values are clamped
    pool.add(x.requires_grad_())
    assert pool.storage.dtype == torch.uint8
    assert torch.equal(pool.rows(), to_uint8(x))
    out = pool.sample(6)
    assert out.dtype == torch.float32 and not out.requires_grad and 0 <= out.min() and out.max() <= 1
    levels = torch.sort((out * 255).round().flatten()).values
    assert torch.equal(levels, torch.sort(to_uint8(x).float().flatten()).values)


def test_capacity_replaces_the_oldest_images_across_the_wrap():
    pool = SyntheticPool((1, 2, 2), capacity=7)
    for first in range(0, 15, 5):  # three batches of 5 into 7 slots: no batch size divides the capacity
        pool.add(numbered(first, 5))
    assert len(pool) == 7 and pool.full and pool.n_added == 15
    assert sorted(ids(pool.sample(100))) == list(range(8, 15))
    assert ids(pool.latest(3)) == [12, 13, 14]
    pool.add(numbered(100, 9))  # a batch larger than the capacity keeps its last 7 images
    assert sorted(ids(pool.sample(100))) == list(range(102, 109)) and pool.n_added == 24


def test_unbounded_pool_keeps_every_image_and_grows_geometrically():
    pool = SyntheticPool((1, 2, 2))
    allocations = set()
    for first in range(0, 250, 10):
        pool.add(numbered(first, 10))
        allocations.add(pool.storage.shape[0])
        assert len(pool) <= pool.storage.shape[0] <= 2 * len(pool)
    assert len(pool) == 250 and ids(pool.latest(250)) == list(range(250))
    assert len(allocations) <= 6  # doubling, not one reallocation per batch


def test_sample_is_without_replacement_uniform_and_never_rebuilds():
    torch.manual_seed(0)
    pool = SyntheticPool((1, 2, 2), capacity=50)
    pool.add(numbered(0, 20))
    storage = pool.storage.data_ptr()
    counts = torch.zeros(20)
    for _ in range(400):
        batch = ids(pool.sample(8))
        assert len(set(batch)) == 8
        counts[batch] += 1
    assert pool.storage.data_ptr() == storage
    assert len(pool.sample(64)) == 20  # a pool smaller than the batch gives all it has
    expected = 400 * 8 / 20
    assert ((counts - expected).abs() < 0.25 * expected).all()  # 160 per image; 4 sigma is about 0.2 of it


def test_sampling_follows_a_seeded_generator():
    pool = SyntheticPool((1, 2, 2))
    pool.add(numbered(0, 30))
    a = pool.sample(10, torch.Generator().manual_seed(3))
    b = pool.sample(10, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


@pytest.mark.parametrize("capacity, batches", [(None, 3), (7, 1), (7, 3)])
def test_checkpoint_round_trip_restores_contents_and_ring_position(capacity, batches):
    owner = nn.Module()
    owner.pool = SyntheticPool((1, 2, 2), capacity=capacity)
    for b in range(batches):
        owner.pool.add(numbered(10 * b, 5))
    state = owner.state_dict()
    assert list(state) == ["pool._extra_state"]  # the buffer itself is not saved in full
    assert state["pool._extra_state"]["rows"].shape[0] == len(owner.pool)  # only the filled part

    fresh = nn.Module()
    fresh.pool = SyntheticPool((1, 2, 2), capacity=capacity)
    fresh.pool.add(numbered(200, 3))  # whatever was there is replaced, not mixed in
    save_load(owner, fresh)
    assert torch.equal(fresh.pool.rows(), owner.pool.rows()) and fresh.pool.n_added == owner.pool.n_added
    for pool in (owner.pool, fresh.pool):  # continuing writes to the same slots
        pool.add(numbered(90, 4))
    assert torch.equal(fresh.pool.rows(), owner.pool.rows())
    assert ids(fresh.pool.latest(4)) == [90, 91, 92, 93]


def test_loading_a_mismatched_pool_fails_loudly():
    src, dst = nn.Module(), nn.Module()
    src.pool, dst.pool = SyntheticPool((1, 2, 2)), SyntheticPool((3, 2, 2))
    src.pool.add(numbered(0, 4))
    with pytest.raises(ValueError, match="do not fit"):
        save_load(src, dst)
    dst.pool = SyntheticPool((1, 2, 2), capacity=2)
    with pytest.raises(ValueError, match="capacity"):
        save_load(src, dst)


def test_the_pool_moves_with_its_module_unless_pinned():
    pool = SyntheticPool((1, 2, 2))
    assert "storage" in dict(pool.named_buffers())
    pinned = RingStore((4,), torch.float32, capacity=8, movable=False)
    pinned.append(torch.ones(3, 4))
    assert "storage" not in dict(pinned.named_buffers())
    pinned.to(torch.float64)
    assert pinned.storage.dtype == torch.float32 and len(pinned) == 3


def test_append_rejects_rows_of_the_wrong_shape():
    with pytest.raises(ValueError, match="do not fit"):
        RingStore((4,), torch.float32).append(torch.ones(2, 5))
    with pytest.raises(ValueError, match="capacity"):
        RingStore((4,), torch.float32, capacity=0)
