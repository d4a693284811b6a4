"""The engine's environment: which device a process takes, and a peak-memory figure that belongs to one run."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from dfkd.engine import env as env_module
from dfkd.engine.env import Env, auto_precision, keep_freed_host_memory, reset_peak_rss, resolve_device, setup_env
from dfkd.errors import ConfigError


def test_each_process_takes_its_own_gpu():
    assert resolve_device("cuda", local_rank=1, world_size=2, cuda_available=True) == torch.device("cuda", 1)
    assert resolve_device("auto", local_rank=1, world_size=2, cuda_available=True) == torch.device("cuda", 1)
    assert resolve_device("cuda:1", local_rank=0, world_size=1, cuda_available=True) == torch.device("cuda", 1)
    with pytest.raises(ConfigError, match="under torchrun would put every process on one GPU"):
        resolve_device("cuda:0", local_rank=1, world_size=2, cuda_available=True)
    assert resolve_device("auto", cuda_available=False) == torch.device("cpu")


def test_a_single_process_on_a_named_gpu_makes_it_the_current_device(monkeypatch):
    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    env = setup_env("cuda:1")
    assert env.device == torch.device("cuda", 1) and chosen == [torch.device("cuda", 1)]


@pytest.mark.skipif(not sys.platform.startswith("linux") or not reset_peak_rss(), reason="needs Linux clear_refs")
def test_the_cpu_peak_starts_again_with_each_run():
    keep_freed_host_memory()  # as every run does: freed memory stays with the process until the next reset
    env = Env(torch.device("cpu"))
    env.reset_peak_memory()
    big = torch.ones(256 * 2**20 // 4)  # 256 MiB, touched
    first = env.peak_memory_bytes()
    del big
    env.reset_peak_memory()
    second = env.peak_memory_bytes()
    assert first - second > 200 * 2**20, (first, second)  # the second run does not inherit the first one's peak


FAULTS = """
import resource, sys, torch
from dfkd.engine.env import keep_freed_host_memory
if sys.argv[1] == "kept":
    assert keep_freed_host_memory()
torch.ones(64 * 2**20 // 4)  # warm up the allocator
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    torch.ones(64 * 2**20 // 4)  # 64 MiB, allocated, touched and freed: above glibc's largest mmap threshold
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_large_blocks_are_not_faulted_in_again_and_again():
    def faults(mode: str) -> int:
        out = subprocess.run([sys.executable, "-c", FAULTS, mode], capture_output=True, text=True, check=True)
        return int(out.stdout)

    pages = 64 * 2**20 // 4096
    assert faults("default") > 4 * pages  # every 64 MiB block is mapped afresh and faulted in page by page
    # kept on the heap: about one block is faulted in, once (plus a few pages of Python's own; a CI run saw one more)
    assert faults("kept") < 2 * pages


@pytest.mark.parametrize(
    ("flags", "picked"),
    [
        (["avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"], "bf16"),
        (["avx2", "avx512f", "avx512_bf16"], "bf16"),
        (["avx2", "avx512f"], "fp32"),
        (["avx2"], "fp32"),
        ([], "fp32"),
    ],
)
def test_auto_precision_takes_bf16_only_on_a_cpu_with_bf16_instructions(monkeypatch, caplog, flags, picked):
    monkeypatch.setattr(env_module, "cpu_flags", lambda: flags)
    precision, why = auto_precision(torch.device("cpu"))
    assert precision == picked and why
    with caplog.at_level("INFO", logger="dfkd"):
        env = setup_env("cpu", "auto")
    assert env.precision == picked
    assert f"engine.precision=auto: {picked}" in caplog.text
    assert env.describe().endswith(picked)


@pytest.mark.parametrize(
    ("name", "capability", "picked"),
    [("Tesla T4", (7, 5), "fp32"), ("Tesla V100", (7, 0), "fp32"), ("A100", (8, 0), "bf16"), ("H100", (9, 0), "bf16")],
)
def test_auto_precision_takes_bf16_only_on_a_gpu_that_runs_it_natively(monkeypatch, name, capability, picked):
    # torch.cuda.is_bf16_supported() is true on a T4 or V100 too, where bf16 is emulated and slower than fp32
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *args: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *args: name)
    precision, why = auto_precision(torch.device("cuda", 0))
    assert precision == picked
    assert name in why and f"compute capability {capability[0]}.{capability[1]}" in why
