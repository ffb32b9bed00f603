#!/usr/bin/env bash
# Install llama-cpp-python's OpenAI-compatible server (CPU only, compiled from the PyPI sdist) into its own
# venv under bench/_build (git-ignored), for the benchmark baseline. Several minutes on 2 cores.
# Prints the venv's python as its last line. Re-running is a no-op once installed.
#
#   bench/build_llama_cpp_python.sh
#   JOBS=1 PYTHON=python3.11 bench/build_llama_cpp_python.sh
set -euo pipefail

VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
JOBS="${JOBS:-2}"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="$HERE/_build/venv-llcpp"
PYTHON="${PYTHON:-python3}"

mkdir -p "$HERE/_build"
CPU_FLAGS="$("$HERE/ggml_cpu_flags.sh")"  # this machine's instruction sets without AMX (see that script)
STAMP="$VENV/.built-with-$(echo "$VERSION $CPU_FLAGS" | cksum | cut -d' ' -f1)"
if [[ ! -f "$STAMP" ]] || ! "$VENV/bin/python" -c "import llama_cpp.server" 2>/dev/null; then
    "$PYTHON" -m venv "$VENV"
    # --no-cache-dir: pip's wheel cache does not know CMAKE_ARGS and would hand back a wheel built otherwise.
    CMAKE_BUILD_PARALLEL_LEVEL="$JOBS" CMAKE_ARGS="-DGGML_CUDA=OFF $CPU_FLAGS" \
        "$VENV/bin/pip" install --no-cache-dir --force-reinstall "llama-cpp-python[server]==$VERSION" >&2
    rm -f "$VENV"/.built-with-*
    touch "$STAMP"
fi
echo "$VENV/bin/python"
