#!/usr/bin/env bash
# Build llama.cpp's own `llama-server` (CPU only) for the benchmark baselines, from the llama.cpp source
# vendored in the llama-cpp-python sdist on PyPI (the only registry this project reaches).
# Everything goes to bench/_build (git-ignored); nothing of llama.cpp is committed.
# Prints the binary's path as its last line. Re-running reuses the download and the build directory.
#
#   bench/build_llama_server.sh            # JOBS=2 by default
#   JOBS=1 PYTHON=.venv/bin/python bench/build_llama_server.sh
set -euo pipefail

VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
JOBS="${JOBS:-2}"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
BUILD="$HERE/_build"
PYTHON="${PYTHON:-python3}"
SDIST="$BUILD/llama_cpp_python-$VERSION.tar.gz"
SRC="$BUILD/llama_cpp_python-$VERSION/vendor/llama.cpp"
OUT="$BUILD/llama-server-build${CPU_ISA:+-$CPU_ISA}"  # CPU_ISA=avx2: a separate, capped build
[[ "${CPU_ISA:-auto}" != "auto" ]] || OUT="$BUILD/llama-server-build"
BIN="$OUT/bin/llama-server"

mkdir -p "$BUILD"
if [[ ! -f "$SDIST" ]]; then
    "$PYTHON" -m pip download --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$BUILD" >&2
fi
if [[ ! -f "$SRC/CMakeLists.txt" ]]; then
    tar -xzf "$SDIST" -C "$BUILD"
fi

# Release, CPU only (this machine's instruction sets without AMX: see ggml_cpu_flags.sh), static,
# no web UI (the prebuilt UI would be fetched from a model hub), no HTTPS.
# shellcheck disable=SC2046  # the flags are words
cmake -S "$SRC" -B "$OUT" \
    -DCMAKE_BUILD_TYPE=Release \
    -DBUILD_SHARED_LIBS=OFF \
    $("$HERE/ggml_cpu_flags.sh") \
    -DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_VULKAN=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON \
    -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF >&2
cmake --build "$OUT" --config Release --target llama-server -j "$JOBS" >&2

test -x "$BIN"
echo "$BIN"
