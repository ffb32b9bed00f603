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
if ! "$VENV/bin/python" -c "import llama_cpp.server, sys; sys.exit(llama_cpp.__version__ != '$VERSION')" 2>/dev/null; then
    "$PYTHON" -m venv "$VENV"
    CMAKE_BUILD_PARALLEL_LEVEL="$JOBS" CMAKE_ARGS="-DGGML_CUDA=OFF -DGGML_NATIVE=ON" \
        "$VENV/bin/pip" install "llama-cpp-python[server]==$VERSION" >&2
fi
echo "$VENV/bin/python"
