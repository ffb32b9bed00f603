"""inference/cpu/paths.py: the one place that decides the CPU forward path, for every CPU class a user may have.

Pure decisions on given CPU flags (no model): which instruction-set class CPU_ISA leaves, the dtype's bf16 rule, and
the path for each model and setting. What each path then does is tested where it runs (test_native_forward.py,
test_lean_forward.py); `make test` also runs those under CPU_ISA=avx2.
"""

from __future__ import annotations

import pytest

from inference.cpu import paths as cpu_path

AVX2 = {"avx2", "fma", "f16c"}
AVX512 = AVX2 | {"avx512f", "avx512bw", "avx512vl"}
AMX = frozenset(AVX512 | {"avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8"})  # Sapphire Rapids
ZEN4 = frozenset(AVX512 | {"avx512_vnni", "avx512_bf16"})
SKYLAKE_X = frozenset(AVX512)
ZEN3 = frozenset(AVX2 | {"bmi2"})
OLD = frozenset({"sse4_2", "avx"})  # an x86-64 CPU without AVX2 (Sandy Bridge class)


@pytest.mark.parametrize(
    ("flags", "isa", "level"),
    [
        (AMX, "auto", "amx"),
        (AMX, "avx512", "avx512-bf16"),  # AMX capped away
        (AMX, "avx2", "avx2"),
        (ZEN4, "auto", "avx512-bf16"),
        (ZEN4, "avx2", "avx2"),
        (SKYLAKE_X, "auto", "avx512"),
        (ZEN3, "auto", "avx2"),
        (ZEN3, "avx512", "avx2"),  # a cap above the CPU changes nothing
        (OLD, "auto", "baseline"),
        (frozenset(), "auto", "baseline"),  # no /proc/cpuinfo
    ],
)
def test_cpu_isa_caps_the_instruction_set_class(flags: frozenset[str], isa: str, level: str) -> None:
    assert cpu_path.isa_in_force(isa, flags) == level
    assert cpu_path.native_bf16(isa, flags) == (level in ("amx", "avx512-bf16"))
    assert not any(flag.startswith(("avx512", "amx")) for flag in cpu_path.usable_flags("avx2", flags))


def facts(**changes: object) -> dict[str, object]:
    base: dict[str, object] = {
        "isa": "auto",
        "embedded": True,
        "llama": True,
        "cpu": True,
        "quantized": False,
        "bf16": True,
        "gguf_int4": True,
        "pack_cpu_weights": True,
        "fast_decode": True,
    }
    return base | changes


@pytest.mark.parametrize(
    ("flags", "changes", "name", "reason"),
    [
        (ZEN4, {}, "native", "4-bit blocks"),
        (ZEN3, {"bf16": False}, "native", "4-bit blocks"),  # AVX2-only: native too, in float32
        (AMX, {"isa": "avx2", "bf16": False}, "native", "4-bit blocks"),
        (OLD, {"bf16": False}, "lean", "lacks AVX2"),  # the fallback: float32 prepacked
        (ZEN4, {"gguf_int4": False}, "lean", "GGUF_INT4=false"),
        (ZEN3, {"gguf_int4": False, "bf16": True}, "transformers", "without native bf16"),  # DTYPE=bfloat16 forced
        (ZEN4, {"gguf_int4": False, "fast_decode": False}, "transformers", "FAST_DECODE=false"),
        (ZEN4, {"gguf_int4": False, "pack_cpu_weights": False}, "transformers", "PACK_CPU_WEIGHTS=false"),
        (ZEN4, {"quantized": True}, "transformers", "bitsandbytes"),
        (ZEN4, {"embedded": False, "llama": False}, "transformers", "not a Llama model"),  # the tiny Gemma2
        (ZEN4, {"embedded": False}, "lean", "not the embedded GGUF"),
        (ZEN4, {"cpu": False}, "transformers", "not on a CPU"),
    ],
)
def test_the_path_for_each_model_and_setting(
    flags: frozenset[str], changes: dict[str, object], name: str, reason: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cpu_path, "c_compiler", lambda: "/usr/bin/cc")
    monkeypatch.setattr(cpu_path.platform, "machine", lambda: "x86_64")
    path = cpu_path.wanted(**facts(**changes), flags=flags)  # type: ignore[arg-type]
    assert (path.name, path.isa) == (name, cpu_path.isa_in_force(str(facts(**changes)["isa"]), flags))
    assert reason in path.reason and path.name in str(path)


def test_no_compiler_or_another_architecture_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu_path, "c_compiler", lambda: None)
    assert cpu_path.native_possible("auto", ZEN4) == "no C compiler (cc, gcc or $CC)"
    assert cpu_path.wanted(**facts(), flags=ZEN4).name == "lean"  # type: ignore[arg-type]
    monkeypatch.setattr(cpu_path, "c_compiler", lambda: "/usr/bin/cc")
    monkeypatch.setattr(cpu_path.platform, "machine", lambda: "aarch64")
    assert cpu_path.native_possible("auto", ZEN4) == "not x86-64 (aarch64)"


def test_the_native_build_and_torch_follow_the_cap() -> None:
    assert cpu_path.native_march("avx2") == "x86-64-v3" and cpu_path.native_march("auto") == "native"
    environ: dict[str, str] = {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE"}  # an operator's own choice is kept
    assert cpu_path.apply_torch_caps("avx2", environ) == {"ATEN_CPU_CAPABILITY": "avx2"}
    assert environ == {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE", "ATEN_CPU_CAPABILITY": "avx2"}
    assert cpu_path.apply_torch_caps("auto", environ) == {}


@pytest.mark.parametrize(
    ("path", "bf16", "llama", "flags", "packs"),
    [
        ("native", True, True, ZEN4, False),  # the native path reads the GGUF's blocks: no second copy
        ("lean", True, True, ZEN4, True),
        ("lean", False, True, ZEN3, True),  # float32 Llama (the fallback): ~2x faster matmuls on AVX2
        ("transformers", True, False, ZEN4, True),  # bf16 sahabat-ai where bf16 is native, as before issue 25
        ("transformers", False, False, ZEN3, False),  # float32 Gemma2: its 3.7 GB head is not doubled
        ("transformers", True, False, ZEN3, False),  # bf16 forced on a CPU whose oneDNN cannot pack it
    ],
)
def test_which_weights_get_a_prepacked_copy(
    path: str, bf16: bool, llama: bool, flags: frozenset[str], packs: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cpu_path, "cpu_flags", lambda: flags)
    assert cpu_path.packs_weights(path, bf16, llama, True, "auto") is packs
    assert not cpu_path.packs_weights(path, bf16, llama, False, "auto")  # PACK_CPU_WEIGHTS=false
