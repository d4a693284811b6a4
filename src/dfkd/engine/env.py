"""Device, precision and process-group handling: the same code runs on CPU, one GPU and ``torchrun``.

Under ``torchrun`` (RANK/WORLD_SIZE/LOCAL_RANK in the environment) a process group is created with NCCL on CUDA
and gloo on CPU; each rank synthesises its own data (seeded ``seed + rank``), the student is wrapped in DDP, and
persistent generators are kept identical by all-reducing their gradients (:meth:`Env.all_reduce_grads`).
"""

from __future__ import annotations

import ctypes
import logging
import os
import resource
import shutil
import sys
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from dfkd.errors import ConfigError
from dfkd.sysinfo import cpu_flags

log = logging.getLogger(__name__)


@dataclass
class Env:
    device: torch.device
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    precision: str = "fp32"
    channels_last: bool = False
    compile: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def autocast(self) -> AbstractContextManager:
        """bf16 autocast when ``engine.precision=bf16``, else a no-op; losses upcast to fp32 themselves."""
        if self.precision == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def prepare(self, module: nn.Module) -> nn.Module:
        """Move a network to the device (and to channels_last, and compile it, when enabled).

        Compiling is in place (``nn.Module.compile``): parameter names, ``state_dict`` keys and hooks stay as they
        are; the first forward of each kind (train / eval, with / without gradients, each batch size) compiles.
        """
        module = module.to(self.device)
        if self.channels_last:
            module = module.to(memory_format=torch.channels_last)
        if self.compile:
            module.compile()
        return module

    def images(self, x: torch.Tensor) -> torch.Tensor:
        """Give an image batch the configured memory format, in fp32 whatever precision the generator ran in."""
        if self.channels_last and x.dim() == 4:
            return x.to(torch.float32, memory_format=torch.channels_last)
        return x.float()

    def all_reduce_grads(self, module: nn.Module) -> None:
        """Average gradients across ranks so that a persistent generator stays identical everywhere."""
        if not self.distributed:
            return
        for p in module.parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
                p.grad.div_(self.world_size)

    def average_buffers(self, module: nn.Module) -> None:
        """Average floating-point buffers (BN running statistics) across ranks, after a persistent module's step."""
        if not self.distributed:
            return
        for buffer in module.buffers():
            if buffer.is_floating_point():
                dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
                buffer.div_(self.world_size)

    def broadcast_state(self, module: nn.Module) -> None:
        """Copy rank 0's parameters and buffers to every rank."""
        if not self.distributed:
            return
        for tensor in module.state_dict().values():
            if torch.is_tensor(tensor):
                dist.broadcast(tensor, src=0)

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.distributed:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def main_decides(self, flag: bool) -> bool:
        """Rank 0's ``flag`` on every rank: for a decision each rank could take differently (its own clock), which
        must come out the same everywhere or the ranks leave the loop at different epochs and wait on each other."""
        if not self.distributed:
            return flag
        decision = torch.tensor(float(flag), device=self.device)
        dist.broadcast(decision, src=0)
        return bool(decision.item())

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every rank's ``tensor`` (same shape on every rank) concatenated along dim 0 in rank order; the tensor
        itself in a single process."""
        if not self.distributed:
            return tensor
        gathered = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(gathered, tensor.contiguous())
        return torch.cat(gathered)

    def all_gather_object(self, obj: object) -> list:
        """Every rank's ``obj``, in rank order (``[obj]`` in a single process)."""
        if not self.distributed:
            return [obj]
        gathered: list = [None] * self.world_size
        dist.all_gather_object(gathered, obj)
        return gathered

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def synchronize(self) -> None:
        """Wait for queued device work (for honest wall-clock accounting on CUDA; free on CPU)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def reset_peak_memory(self) -> None:
        """Start a new peak: CUDA's allocator statistics on GPU, the kernel's peak-RSS mark on CPU (Linux), so that
        each run in one process (``dfkd bench``) reports its own peak, not the largest of the runs before it."""
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            reset_peak_rss()

    def peak_memory_bytes(self) -> int:
        """CUDA max allocated on GPU; the peak resident set size since the last reset on CPU."""
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        return peak_rss_bytes()

    def memory_in_use_bytes(self) -> int:
        """CUDA memory allocated now on GPU; the resident set size now on CPU."""
        if self.device.type == "cuda":
            return int(torch.cuda.memory_allocated(self.device))
        return rss_bytes()

    def describe(self) -> str:
        if self.device.type == "cuda":
            name = torch.cuda.get_device_name(self.device)
        else:
            name = f"CPU, {torch.get_num_threads()} threads"
        extra = f", {self.world_size} processes" if self.distributed else ""
        return f"{self.device} ({name}){extra}, {self.precision}"

    def teardown(self) -> None:
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()


_GLIBC_M_TRIM_THRESHOLD, _GLIBC_M_MMAP_MAX = -1, -4
_heap_kept = False


def keep_freed_host_memory() -> bool:
    """Have glibc serve every block from its heap and keep freed memory there (Linux; once per process).

    By default glibc maps each block above 32 MiB afresh and unmaps it when freed, so every large activation (a
    1000-image evaluation batch of a WRN-16-2 allocates many of 130 MB) page-faults its memory in again: most of a
    teacher evaluation's time went to the kernel (14.7 s of 41 s; with this, 1.6 s of 25 s). Freed memory stays with
    the process during a run; :func:`reset_peak_rss` hands it back to the system before the next run.

    The price is memory: blocks of many sizes (generator steps, student steps, evaluations) fragment the heap. With
    glibc's usual policy during training, the WRN-16-2 -> WRN-16-1 run at batch 256 in bf16 + channels_last peaked
    lower (1.91 vs 2.21-2.31 GiB) but ran 11-15 % fewer student steps per second (1.18 vs 1.32-1.36) on an EPYC Zen 4
    (BENCHMARKS.md); speed wins here.
    """
    global _heap_kept
    libc = _glibc()
    if not _heap_kept and libc is not None:
        _heap_kept = bool(libc.mallopt(_GLIBC_M_MMAP_MAX, 0)) and bool(libc.mallopt(_GLIBC_M_TRIM_THRESHOLD, 2**30))
    return _heap_kept


def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # another C library
        return None


def reset_peak_rss() -> bool:
    """Hand freed heap memory back to the system, then reset the process's peak-RSS mark to its current RSS (Linux
    >= 4.0); False where the kernel cannot."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _proc_status_bytes(field: str) -> int | None:
    """A memory line of /proc/self/status (``VmRSS``, ``VmHWM``) in bytes; None where it cannot be read."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def rss_bytes() -> int:
    """The resident set size now (VmRSS on Linux; 0 where /proc is not readable)."""
    return _proc_status_bytes("VmRSS") or 0


def peak_rss_bytes() -> int:
    """The peak resident set size: VmHWM (resettable) on Linux, the lifetime ru_maxrss elsewhere."""
    peak = _proc_status_bytes("VmHWM")
    if peak is not None:
        return peak
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def resolve_device(
    spec: str, local_rank: int = 0, world_size: int = 1, cuda_available: bool | None = None
) -> torch.device:
    """The device of this process: ``auto``/``cuda`` take GPU ``local_rank``; ``cuda:N`` only in a single process
    (under torchrun every rank takes its own GPU, so a fixed index would put them all on one)."""
    spec = spec.strip().lower()
    cuda_available = torch.cuda.is_available() if cuda_available is None else cuda_available
    if spec == "auto":
        return torch.device("cuda", local_rank) if cuda_available else torch.device("cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise ConfigError(f"engine.device: '{spec}' is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not cuda_available:
            raise ConfigError("engine.device: CUDA was asked for but is not available here; use engine.device=cpu")
        if device.index is None:
            device = torch.device("cuda", local_rank)
        elif world_size > 1:
            raise ConfigError(
                f"engine.device={spec} under torchrun would put every process on one GPU: use engine.device=cuda "
                "(process k takes GPU k) and choose the GPUs with CUDA_VISIBLE_DEVICES"
            )
    elif device.type != "cpu":
        raise ConfigError(f"engine.device: '{spec}' is not supported; use auto, cpu, cuda or cuda:N")
    return device


def auto_precision(device: torch.device) -> tuple[str, str]:
    """The precision ``engine.precision=auto`` picks on ``device``, and why: bf16 on a GPU of compute capability 8.0
    or more (Ampere and later, bf16 tensor cores) and on a CPU with bf16 instructions (AMX-BF16 or AVX512-BF16,
    which oneDNN's convolutions use), fp32 elsewhere.

    On an AVX512-BF16 CPU without AMX (EPYC Zen 4) bf16 ran 1.51x the student steps per second of fp32 on the
    demo's LeNet pair and 1.8-2.0x on the WRN pair, both with channels_last (``dfkd bench throughput``,
    BENCHMARKS.md); on an AVX2-only CPU bf16 is emulated and slower."""
    if device.type == "cuda":
        # is_bf16_supported() is also true where bf16 is emulated (T4, V100: compute capability 7.x), slower than fp32
        name, (major, minor) = torch.cuda.get_device_name(device), torch.cuda.get_device_capability(device)
        if major >= 8 and torch.cuda.is_bf16_supported():
            return "bf16", f"{name} (compute capability {major}.{minor}) runs bfloat16 natively"
        return "fp32", f"{name} (compute capability {major}.{minor}) has no native bfloat16 (needs 8.0 or more)"
    flags = cpu_flags()
    for flag, name in (("amx_bf16", "AMX-BF16"), ("avx512_bf16", "AVX512-BF16")):
        if flag in flags:
            return "bf16", f"the CPU has {name}"
    return "fp32", "the CPU has neither AMX-BF16 nor AVX512-BF16"


def setup_env(
    device: str = "auto", precision: str = "fp32", channels_last: bool = False, threads: int = 0, compile: bool = False
) -> Env:
    """Create the run's :class:`Env`, joining the torchrun process group when launched by torchrun."""
    if threads > 0:
        torch.set_num_threads(threads)
    keep_freed_host_memory()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank, world_size)
    if rank > 0:
        logging.getLogger("dfkd").setLevel(logging.ERROR)  # rank 0 speaks for the run; the others only on errors
    if dev.type == "cuda":
        # Always, not only under torchrun: streams, events and new allocations go to the current device, so a run
        # on cuda:1 would otherwise time itself on cuda:0's stream and leave a context there.
        torch.cuda.set_device(dev)
    if precision == "auto":
        precision, why = auto_precision(dev)
        log.info("engine.precision=auto: %s (%s)", precision, why)
    if precision == "bf16" and dev.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("engine.precision=bf16 needs a GPU with bfloat16 support; use engine.precision=fp32")
    if compile:
        check_compiler(dev)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return Env(dev, rank, world_size, local_rank, precision, channels_last, compile)


def check_compiler(device: torch.device) -> None:
    """torch.compile's CPU code is C++ built on the fly: fail before the run, not at its first step."""
    if device.type == "cpu" and not (os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")):
        raise ConfigError(
            "engine.compile=true on a CPU needs a C++ compiler (g++): install one (apt-get install g++) or set "
            "engine.compile=false"
        )
    import torch._dynamo  # loaded on demand: importing it costs seconds that runs without compile need not pay

    # networks of different roles share forward code (teacher and student of one family), and each mode and
    # batch size is a compiled variant of it: allow more variants than torch's default of 8
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
