"""What CPU the engine runs on: the facts that select kernels and precision.

Read once from ``/proc/cpuinfo``, ``lscpu``'s sysfs sources and torch. The
engine logs it at start-up and puts it in ``stats()``; the benchmarks record
it beside every figure, because figures from different CPUs do not compare
(an AVX2-only EPYC has no bf16 units; a Sapphire Rapids Xeon has AMX, whose
bf16 matmuls run 2-3x fp32, and a 300 MiB L3 that holds a small model).
"""

from __future__ import annotations

import functools
import os
import platform
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

# The /proc/cpuinfo flags that change which kernels torch, oneDNN and MKL run.
KERNEL_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
                "avx512_fp16", "amx_bf16", "amx_int8", "amx_tile", "avx_vnni")


@dataclass(frozen=True)
class CpuInfo:
    model_name: str
    flags: tuple[str, ...]  # the KERNEL_FLAGS this CPU has
    torch_capability: str  # torch.backends.cpu.get_cpu_capability(): DEFAULT, AVX2, AVX512, ...
    l3_bytes: int  # 0 when unknown
    logical_cpus: int
    threads: int  # torch intra-op threads now

    def has(self, flag: str) -> bool:
        return flag in self.flags

    @property
    def native_bf16(self) -> bool:
        """bf16 matmuls in hardware (AMX or AVX512-BF16); elsewhere torch emulates them in fp32."""
        return self.has("amx_bf16") or self.has("avx512_bf16")

    def as_dict(self) -> dict:
        d = asdict(self)
        d["flags"] = list(self.flags)
        d["native_bf16"] = self.native_bf16
        return d

    def summary(self) -> str:
        l3 = f"{self.l3_bytes >> 20} MiB L3" if self.l3_bytes else "L3 unknown"
        return (f"{self.model_name}; torch capability {self.torch_capability}; "
                f"flags {' '.join(self.flags) or 'none of ' + '/'.join(KERNEL_FLAGS)}; {l3}; "
                f"{self.threads} threads of {self.logical_cpus} CPUs")


def cpuinfo_fields() -> tuple[str, set[str]]:
    """The CPU's model name and every ISA flag /proc/cpuinfo lists (ARM calls them "Features")."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return model, flags
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and value.strip():
            model = value.strip()
        elif key in ("flags", "Features") and not flags:
            flags = set(value.split())
    return model, flags


def _l3_bytes() -> int:
    """The largest L3 in sysfs (what ``lscpu`` reports as L3 per instance)."""
    best = 0
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            if (index / "level").read_text().strip() != "3":
                continue
            size = (index / "size").read_text().strip()
        except OSError:
            continue
        units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
        best = max(best, int(size[:-1]) * units[size[-1]] if size[-1] in units else int(size))
    return best


@functools.cache
def _static() -> tuple[str, tuple[str, ...], str, int]:
    model, flags = cpuinfo_fields()
    return (model, tuple(f for f in KERNEL_FLAGS if f in flags),
            torch.backends.cpu.get_cpu_capability(), _l3_bytes())


def cpu_info() -> CpuInfo:
    model, flags, capability, l3 = _static()
    return CpuInfo(model_name=model, flags=flags, torch_capability=capability, l3_bytes=l3,
                   logical_cpus=os.cpu_count() or 1, threads=torch.get_num_threads())


OPENMP_RUNTIMES = ("libgomp", "libiomp5", "libomp")


def release_openmp_pool() -> str:
    """Free the calling thread's OpenMP worker threads (``omp_pause_resource_all``); returns what it did.

    Why: the engine loads (and probes its kernels) in the thread that builds it
    and then steps in its own thread, and each thread that starts OpenMP work
    keeps its own team of workers. With more OpenMP threads alive than CPUs,
    libgomp stops spinning between parallel regions and every region wakes its
    workers from sleep: measured on a 2-vCPU Xeon (KVM), the same int4 decode
    matmuls ran 3x slower in the engine thread (15.2 vs 5.6 ms a token) until
    the loading thread's team was released. A later parallel op in the loading
    thread makes a new team (correct, only slower).
    """
    import ctypes

    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError as e:
        return f"not released (no /proc/self/maps: {e})"
    paths = {line.split()[-1] for line in maps.splitlines()
             if any(f"/{name}" in line for name in OPENMP_RUNTIMES) and ".so" in line}
    if not paths:
        return "no OpenMP runtime loaded"
    released = []
    for path in sorted(paths):
        try:
            pause = ctypes.CDLL(path).omp_pause_resource_all
        except (OSError, AttributeError):
            continue
        pause.argtypes, pause.restype = [ctypes.c_int], ctypes.c_int
        if pause(1) == 0:  # omp_pause_soft
            released.append(Path(path).name)
    return f"released the loading thread's workers ({', '.join(released)})" if released else \
        f"not released ({', '.join(Path(p).name for p in sorted(paths))} lacks omp_pause_resource_all)"
