"""CMI's contrastive machinery: golden loss values, the head, instance-mean hooks and the memory bank's wrap-around."""

from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dfkd.losses import contrastive
from dfkd.losses.contrastive import ContrastHead, InstanceMeanHooks, MemoryBank, contrastive_loss


def close(a, b, tol=1e-6):
    assert abs(float(a) - float(b)) < tol, (float(a), float(b))


def test_contrastive_loss_golden_identity_case():
    # logits = I / 1: every row's CE is log(1 + e^-1)
    q = torch.eye(2)
    close(contrastive_loss(q, q, T=1.0), math.log(1 + math.exp(-1)))
    close(contrastive_loss(q, q, T=1.0, n_current=1), 2 * math.log(1 + math.exp(-1)))


def test_contrastive_loss_golden_values():
    # expected values computed independently in float64 numpy: logits = q k^T / T, CE against the diagonal
    q = F.normalize(torch.tensor([[1.0, 2.0], [3.0, -1.0], [0.0, 1.0]]), dim=1)
    k = F.normalize(torch.tensor([[2.0, 1.0], [1.0, -1.0], [-1.0, 1.0]]), dim=1)
    close(contrastive_loss(q, k, T=0.5), 0.4798955700941574)  # (0.39694878 + 0.53969049 + 0.50304744) / 3
    close(contrastive_loss(q, k, T=0.5, n_current=1), 0.9183177442545909)  # 0.39694878 + mean of the other two
    close(contrastive_loss(q, k, T=0.5, n_current=3), 0.4798955700941574)  # no cached rows: a single mean


def test_contrastive_loss_stops_the_gradient_at_the_keys():
    q = F.normalize(torch.randn(5, 4), dim=1).requires_grad_()
    k = F.normalize(torch.randn(5, 4), dim=1).requires_grad_()
    contrastive_loss(q, k, T=0.1, n_current=2).backward()
    assert q.grad is not None and q.grad.abs().sum() > 0 and k.grad is None


def test_head_projects_to_unit_vectors():
    head = ContrastHead(12, head_dim=5)
    out = head(torch.randn(7, 12))
    assert out.shape == (7, 5) and torch.allclose(out.norm(dim=1), torch.ones(7))
    assert [tuple(p.shape) for p in head.parameters()] == [(12, 12), (12,), (5, 12), (5,)]


def test_instance_mean_hooks_record_input_means_only_while_capturing():
    layers = [nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 6, 1), nn.BatchNorm2d(6)]
    net = nn.Sequential(*layers)
    net.eval()
    hooks = InstanceMeanHooks([net[1], net[4]])
    x = torch.randn(2, 3, 5, 5)
    net(x)
    with pytest.raises(RuntimeError, match="capture"):
        hooks.features()
    with hooks.capture():
        net(x)
    a = net[0](x)
    b = net[3](net[2](net[1](a)))
    assert torch.allclose(hooks.features(), torch.cat([a.mean(dim=(2, 3)), b.mean(dim=(2, 3))], dim=1), atol=1e-6)
    hooks.remove()


def rows(first: int, n: int, dim: int = 3) -> torch.Tensor:
    return torch.arange(first, first + n, dtype=torch.float32)[:, None].repeat(1, dim)


def test_bank_wraps_with_any_batch_size_and_is_never_empty():
    bank = MemoryBank(3, capacity=10)
    assert bank.sample(4).shape == (0, 3)  # empty: no rows, no error
    seen = []
    for first in range(0, 30, 3):  # batches of 3 into 10 rows: the reference's assertion would reject this
        bank.add(rows(first, 3))
        seen.extend(range(first, first + 3))
        sample = bank.sample(100)
        assert len(sample) == min(len(seen), 10)  # never empty, including when the pointer is back at 0
        assert sorted(sample[:, 0].long().tolist()) == seen[-10:]
        assert torch.equal(sample[:, 0:1].expand(-1, 3), sample)


def test_bank_at_the_exact_wrap_point_still_gives_negatives():
    # the round after exactly `capacity` rows: the reference samples range(0) and gets no rows
    # (zju-vipa/CMI@9e79fa9:datafree/synthesis/contrastive.py:163-166)
    bank = MemoryBank(3, capacity=8)
    bank.add(rows(0, 4))
    bank.add(rows(4, 4))
    assert bank.n_added == 8 and len(bank.sample(5)) == 5 and len(bank.sample(50)) == 8


def test_bank_sample_is_uniform_without_replacement():
    torch.manual_seed(0)
    bank = MemoryBank(2, capacity=16)
    bank.add(rows(0, 16, dim=2))
    counts = torch.zeros(16)
    for _ in range(300):
        idx = bank.sample(6)[:, 0].long()
        assert len(set(idx.tolist())) == 6
        counts[idx] += 1
    assert ((counts - 300 * 6 / 16).abs() < 0.3 * 300 * 6 / 16).all()


def test_bank_batch_larger_than_capacity_keeps_the_latest_rows():
    bank = MemoryBank(3, capacity=5)
    bank.add(rows(0, 7))
    assert sorted(bank.sample(10)[:, 0].long().tolist()) == [2, 3, 4, 5, 6]


def test_bank_round_trips_through_a_checkpoint():
    owner, fresh = nn.Module(), nn.Module()
    owner.bank, fresh.bank = MemoryBank(3, capacity=6), MemoryBank(3, capacity=6)
    owner.bank.add(rows(0, 4))
    owner.bank.add(rows(4, 4))
    buffer = io.BytesIO()
    torch.save(owner.state_dict(), buffer)
    buffer.seek(0)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    assert torch.equal(fresh.bank.rows(), owner.bank.rows()) and fresh.bank.n_added == 8
    owner.bank.add(rows(50, 3))
    fresh.bank.add(rows(50, 3))
    assert torch.equal(fresh.bank.rows(), owner.bank.rows())


def test_a_bank_too_large_for_the_device_stays_in_host_memory(monkeypatch):
    monkeypatch.setattr(contrastive, "BANK_DEVICE_LIMIT_BYTES", 100)
    bank = MemoryBank(4, capacity=10, device="meta")  # 160 bytes > 100: kept on the CPU, handed out on "meta"
    assert bank.storage.device.type == "cpu" and "storage" not in dict(bank.named_buffers())
    bank.add(torch.ones(3, 4))
    assert bank.sample(2).device.type == "meta"
    small = MemoryBank(4, capacity=2, device="meta")
    assert small.storage.device.type == "meta"
