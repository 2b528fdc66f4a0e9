"""What this CPU computes fast, and so which dtype a model should run in on it.

bf16 matmuls are native only with AVX512-BF16 or AMX; elsewhere (AVX2 CPUs: AMD EPYC and Ryzen
before Zen 4, older Xeons, most laptops) torch and oneDNN emulate them, several times slower than
float32. The limits that emulate an AVX2 machine on a bigger one (ATEN_CPU_CAPABILITY for torch,
ONEDNN_MAX_CPU_ISA for oneDNN) count as the CPU's own.
"""

import functools
import logging
import os
import platform
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

# The flags the benchmarks and the start-up log report.
REPORTED_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16")
BF16_COMPUTE_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})
# ONEDNN_MAX_CPU_ISA values below AVX-512, and ATEN_CPU_CAPABILITY values without it.
_ONEDNN_BELOW_AVX512 = {"sse41", "avx", "avx2", "avx2_vnni", "avx2_vnni_2"}
_ATEN_BELOW_AVX512 = {"default", "avx2"}


@dataclass(frozen=True, slots=True)
class CpuFeatures:
    model: str
    flags: frozenset[str]
    limits: tuple[str, ...] = ()  # the emulation limits in force, as NAME=value

    @property
    def bf16_compute(self) -> bool:
        return bool(self.flags & BF16_COMPUTE_FLAGS)

    def describe(self) -> str:
        """`model: avx2 fma -avx512f ...`, with the limits applied after `under`."""
        flags = " ".join(flag if flag in self.flags else f"-{flag}" for flag in REPORTED_FLAGS)
        under = f" under {' '.join(self.limits)}" if self.limits else ""
        return f"{self.model}: {flags}{under}"


def limited(flags: frozenset[str], environ, torch_capability: str) -> tuple[frozenset[str], tuple[str, ...]]:
    """flags less AVX-512 and AMX where the environment or torch's dispatch keeps code below AVX-512."""
    limits = tuple(f"{name}={environ[name]}" for name, below in (("ATEN_CPU_CAPABILITY", _ATEN_BELOW_AVX512),
                                                                 ("ONEDNN_MAX_CPU_ISA", _ONEDNN_BELOW_AVX512))
                   if environ.get(name, "").strip().lower() in below)
    if not limits and "avx512f" in flags and "avx512" not in torch_capability.lower():
        limits = (f"torch capability {torch_capability}",)
    if not limits:
        return flags, ()
    return frozenset(f for f in flags if not f.startswith(("avx512", "amx"))), limits


@functools.cache
def host() -> CpuFeatures:
    """This CPU's name and flags as /proc/cpuinfo gives them, no limits applied."""
    fields = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())  # the first processor's
    except OSError:
        pass
    model = fields.get("model name") or platform.processor() or platform.machine()
    return CpuFeatures(model, frozenset((fields.get("flags") or fields.get("Features") or "").split()))


@functools.cache
def detect() -> CpuFeatures:
    """This CPU's features, as the code that runs here sees them (emulation limits applied)."""
    flags, limits = limited(host().flags, os.environ, torch.backends.cpu.get_cpu_capability())
    return CpuFeatures(host().model, flags, limits)


def choose_dtype(checkpoint_dtype: torch.dtype, features: CpuFeatures) -> tuple[torch.dtype, str]:
    """The dtype a model whose checkpoint holds `checkpoint_dtype` computes fastest in on a CPU
    with `features`, and why."""
    if checkpoint_dtype == torch.float32:
        return torch.float32, "the checkpoint is float32"
    if features.bf16_compute:
        return torch.bfloat16, "the CPU multiplies bf16 natively (AVX512-BF16 or AMX)"
    return torch.float32, ("the CPU has no AVX512-BF16 or AMX, where bf16 matmuls are emulated and several "
                           "times slower than float32 (decode steps still read bf16 weights, through the GEMV)")


@functools.cache
def resolve_cpu_dtype(asked: str, dtype: torch.dtype, features: CpuFeatures) -> torch.dtype:
    """`dtype` (the checkpoint's for `asked` == "auto") made the one a model runs in on this CPU;
    logged once a process: the choice for `auto`, a warning for a bf16 the CPU emulates."""
    if asked == "auto":
        chosen, why = choose_dtype(dtype, features)
        logger.info("CPU %s -> dtype %s: %s", features.describe(), str(chosen).removeprefix("torch."), why)
        return chosen
    if dtype == torch.bfloat16 and not features.bf16_compute:
        logger.warning("dtype bfloat16 on a CPU without AVX512-BF16 or AMX (%s) is slow: bf16 matmuls are emulated "
                       "there, several times slower than float32; dtype 'auto' picks float32", features.describe())
    return dtype
