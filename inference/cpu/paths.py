"""The one place that decides how a CPU runs the model's forward passes: the CPU's features, capped by CPU_ISA, and
the settings (PACK_CPU_WEIGHTS, GGUF_INT4, FAST_DECODE) give the path in force. Every other module asks here.

- `native`: the embedded model (Llama, Q4_1 GGUF) on x86-64 with AVX2+FMA+F16C and a C compiler, GGUF_INT4 on. Every
  pass (decoding rows and prompts) is one C call over the GGUF's own 4-bit blocks (inference/cpu/native_forward.py).
- `lean`: a Llama model without the native path (GGUF_INT4=false, no compiler, not x86-64 with AVX2), in bf16 where
  the CPU has native bf16 matmuls or in float32, PACK_CPU_WEIGHTS and FAST_DECODE on. The batched engine's lean
  passes on oneDNN-prepacked weights (inference/cpu/lean_forward.py).
- `transformers`: everything else (Gemma2, bitsandbytes models, GPUs, PACK_CPU_WEIGHTS or FAST_DECODE off):
  transformers' forward (on prepacked linears where PACK_CPU_WEIGHTS).

The model's dtype follows the same features: bf16 where the CPU has native bf16 matmuls, else float32 (the native
path's caches follow it). Measured per CPU class: docs/cpu-paths.md.

Nothing here imports torch at module level: the decision is plain data (`CpuPath`), named in the ready log line,
in the model info (`decode_path`) and in /metrics.
"""

from __future__ import annotations

import os
import platform
import shutil
from dataclasses import dataclass
from enum import StrEnum
from functools import cache
from pathlib import Path

# CPU_ISA: which instruction sets the service may use. `auto`: all the CPU has (AMX excepted where it faults: that
# is oneDNN's and ggml's business, not ours); `avx512`: AVX-512 and below (no AMX); `avx2`: AVX2+FMA+F16C and below,
# as on an AVX2-only CPU (the dtype becomes float32, no bf16 prepack, the native build targets x86-64-v3). The values
# are the CPU_ISA setting's (inference/settings.py).
NATIVE_NEEDS = frozenset({"avx2", "fma", "f16c"})
# The environment that caps torch's own kernels the same way; it must be set before torch is imported (app.py does
# it for CPU_ISA=avx2 when the variables are unset; `make test` sets them for its capped pass).
TORCH_CAPS = {"avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}}


@cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (/proc/cpuinfo), empty where there is none."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def usable_flags(isa: str, flags: frozenset[str] | None = None) -> frozenset[str]:
    """The CPU's flags that CPU_ISA `isa` lets the service use."""
    flags = cpu_flags() if flags is None else flags
    if isa == "avx2":
        return frozenset(f for f in flags if not f.startswith(("avx512", "amx", "avx_vnni", "avx_ne")))
    if isa == "avx512":
        return frozenset(f for f in flags if not f.startswith("amx"))
    return flags


def isa_in_force(isa: str, flags: frozenset[str] | None = None) -> str:
    """The instruction-set class the service runs at: `amx`, `avx512-bf16`, `avx512`, `avx2` or `baseline`."""
    usable = usable_flags(isa, flags)
    if "amx_bf16" in usable:
        return "amx"
    if "avx512_bf16" in usable:
        return "avx512-bf16"
    if {"avx512f", "avx512bw", "avx512vl"} <= usable:
        return "avx512"
    if usable >= NATIVE_NEEDS:
        return "avx2"
    return "baseline"


def native_bf16(isa: str, flags: frozenset[str] | None = None) -> bool:
    """True where bf16 matmuls run natively (AVX-512 BF16 or AMX) under CPU_ISA `isa`."""
    return isa_in_force(isa, flags) in ("amx", "avx512-bf16")


def native_march(isa: str) -> str:
    """The native build's -march: this CPU, or x86-64-v3 (AVX2, FMA, F16C, BMI2) under CPU_ISA=avx2."""
    return "x86-64-v3" if isa == "avx2" else "native"


def c_compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def native_possible(isa: str, flags: frozenset[str] | None = None) -> str | None:
    """None where the native path can be built here, else why not."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return f"not x86-64 ({platform.machine()})"
    if not usable_flags(isa, flags) >= NATIVE_NEEDS:
        return "the CPU lacks AVX2, FMA or F16C"
    if c_compiler() is None:
        return "no C compiler (cc, gcc or $CC)"
    return None


class DecodePath(StrEnum):
    """The forward paths a CPU can take (the module docstring says when each applies)."""

    NATIVE = "native"
    LEAN = "lean"
    TRANSFORMERS = "transformers"


@dataclass(frozen=True)
class CpuPath:
    """The forward path in force, and why: named in the ready log, the model info and /metrics."""

    name: DecodePath
    reason: str
    isa: str  # isa_in_force: the instruction-set class the service uses

    def __str__(self) -> str:
        return f"{self.name.value} ({self.isa}: {self.reason})"


def wanted(
    *,
    isa: str,
    embedded: bool,
    llama: bool,
    cpu: bool,
    quantized: bool,
    bf16: bool,
    gguf_int4: bool,
    pack_cpu_weights: bool,
    fast_decode: bool,
    flags: frozenset[str] | None = None,
) -> CpuPath:
    """The path to take for a model with these facts, before the native forward is built (`fell_back` gives the path
    when that build fails).

    `native` for the embedded GGUF wherever it can be built; `lean` for another Llama model whose weights oneDNN can
    prepack here (float32, or bf16 where bf16 matmuls are native); `transformers` otherwise.
    """
    level = isa_in_force(isa, flags)
    if not cpu:
        return CpuPath(DecodePath.TRANSFORMERS, "not on a CPU", level)
    if quantized:
        return CpuPath(DecodePath.TRANSFORMERS, "bitsandbytes layers run their own kernels", level)
    if embedded and gguf_int4:
        why_not = native_possible(isa, flags)
        if why_not is None:
            return CpuPath(DecodePath.NATIVE, "the GGUF's 4-bit blocks, one C call per pass", level)
        fallback = _lean_or_not(llama, bf16, pack_cpu_weights, fast_decode, isa, flags)
        return CpuPath(fallback.name, f"native path off: {why_not}; {fallback.reason}", level)
    reason = "GGUF_INT4=false" if embedded else "not the embedded GGUF"
    fallback = _lean_or_not(llama, bf16, pack_cpu_weights, fast_decode, isa, flags)
    return CpuPath(fallback.name, f"{reason}; {fallback.reason}", level)


def _lean_or_not(
    llama: bool, bf16: bool, pack: bool, fast_decode: bool, isa: str, flags: frozenset[str] | None
) -> CpuPath:
    level = isa_in_force(isa, flags)
    if not llama:
        return CpuPath(DecodePath.TRANSFORMERS, "not a Llama model", level)
    if bf16 and not native_bf16(isa, flags):
        return CpuPath(DecodePath.TRANSFORMERS, "bf16 without native bf16 matmuls", level)
    if not pack:
        return CpuPath(DecodePath.TRANSFORMERS, "PACK_CPU_WEIGHTS=false", level)
    dtype = "bf16" if bf16 else "float32"
    if not fast_decode:
        return CpuPath(DecodePath.TRANSFORMERS, f"FAST_DECODE=false ({dtype} prepacked linears)", level)
    return CpuPath(DecodePath.LEAN, f"lean passes on prepacked {dtype} weights", level)


def packs_weights(path_name: DecodePath, bf16: bool, llama: bool, pack_cpu_weights: bool, isa: str) -> bool:
    """Whether the model's linears are prepacked for oneDNN (a second copy of their weights): never on the native
    path; bf16 weights where bf16 matmuls are native (as before issue 25); float32 weights of a Llama model, the
    lean path's (~2x faster matmuls on the AVX2 class). Other float32 models (sahabat-ai's Gemma2 on an AVX2 CPU)
    keep one copy: its 3.7 GB head alone would double."""
    if path_name == DecodePath.NATIVE or not pack_cpu_weights:
        return False
    return native_bf16(isa) if bf16 else llama


def fell_back(path: CpuPath, why: str, *, llama: bool, bf16: bool, pack: bool, fast_decode: bool, isa: str) -> CpuPath:
    """The path once the native forward could not be built after all (`why`)."""
    fallback = _lean_or_not(llama, bf16, pack, fast_decode, isa, None)
    return CpuPath(fallback.name, f"native path off: {why}; {fallback.reason}", path.isa)


def apply_torch_caps(isa: str, environ: dict[str, str] | None = None) -> dict[str, str]:
    """Set the environment variables that cap torch's kernels for CPU_ISA `isa` where they are unset; returns what
    was set. Only effective before torch is imported."""
    environ = os.environ if environ is None else environ
    done = {}
    for name, value in TORCH_CAPS.get(isa, {}).items():
        if name not in environ:
            environ[name] = value
            done[name] = value
    return done
