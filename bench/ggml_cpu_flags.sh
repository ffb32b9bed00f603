#!/usr/bin/env bash
# Print the cmake options that build ggml's CPU backend for this machine's instruction sets, WITHOUT AMX.
# Used by build_llama_server.sh and build_llama_cpp_python.sh.
#
# Why not GGML_NATIVE=ON (-march=native): this project's VMs advertise AMX in /proc/cpuinfo, but the first
# AMX instruction (ldtilecfg in ggml_backend_amx_mul_mat) dies with a general protection fault, so a native
# build segfaults on its first forward pass. GGML_AMX=1 in the environment restores -march=native.
# CPU_ISA=avx2 (the service's setting of that name) caps the build at AVX2+FMA+F16C: no AVX-512 or VNNI, as on an
# AVX2-only CPU (the benchmark's capped mode on a machine that has more).
set -euo pipefail

if [[ "${GGML_AMX:-0}" == "1" || ! -r /proc/cpuinfo ]]; then
    echo "-DGGML_NATIVE=ON"
    exit 0
fi
flags=" $(grep -m1 '^flags' /proc/cpuinfo | cut -d: -f2) "
has() {
    for f in "$@"; do
        [[ "$flags" == *" $f "* ]] || return 1
        [[ "${CPU_ISA:-auto}" != "avx2" || "$f" != *avx512* && "$f" != avx_vnni ]] || return 1
    done
}
onoff() { if has "$@"; then echo ON; else echo OFF; fi; }

echo "-DGGML_NATIVE=OFF" \
    "-DGGML_SSE42=$(onoff sse4_2)" "-DGGML_AVX=$(onoff avx)" "-DGGML_AVX2=$(onoff avx2)" \
    "-DGGML_FMA=$(onoff fma)" "-DGGML_F16C=$(onoff f16c)" "-DGGML_BMI2=$(onoff bmi2)" \
    "-DGGML_AVX_VNNI=$(onoff avx_vnni)" \
    "-DGGML_AVX512=$(onoff avx512f avx512cd avx512vl avx512dq avx512bw)" \
    "-DGGML_AVX512_VBMI=$(onoff avx512f avx512vbmi)" "-DGGML_AVX512_VNNI=$(onoff avx512f avx512_vnni)" \
    "-DGGML_AVX512_BF16=$(onoff avx512f avx512_bf16)" \
    "-DGGML_AMX_TILE=OFF" "-DGGML_AMX_INT8=OFF" "-DGGML_AMX_BF16=OFF"
