"""Builds inference/cpu/native/forward.c for this CPU, at load, with the system C compiler: the native path's library.

Compiled (`cc -O3 -march=... -fopenmp`, ~1 s; the -march follows CPU_ISA, inference/cpu/paths.py) into
MODEL_CACHE_DIR, keyed by its sources, the compiler, the flags, the CPU's flags and torch's version, and loaded with
ctypes. `_Model` mirrors forward.c's `native_model`.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

from inference.cpu.paths import c_compiler, cpu_flags, native_march, native_possible

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "native" / "forward.c"
# -mprefer-vector-width=256: the float loops (norms, attention) vectorise 8 wide on every build, so an AVX-512 CPU
# sums in the same order as an AVX2 one and both give the same bits (tests/test_native_step.py).
_FLAGS = ["-O3", "-fopenmp", "-fno-math-errno", "-mprefer-vector-width=256", "-shared", "-fPIC", "-std=c11"]


class _Model(ctypes.Structure):
    _fields_ = [
        ("layers", ctypes.c_int),
        ("hidden", ctypes.c_int),
        ("heads", ctypes.c_int),
        ("kv_heads", ctypes.c_int),
        ("head_dim", ctypes.c_int),
        ("inter", ctypes.c_int),
        ("threads", ctypes.c_int),
        ("rope_scaling", ctypes.c_float),
        ("attn_scale", ctypes.c_float),
        ("inv_freq", ctypes.c_void_p),
        ("embedding", ctypes.c_void_p),
        ("final_norm", ctypes.c_void_p),
        ("final_eps", ctypes.c_float),
        ("norm1", ctypes.c_void_p),
        ("norm2", ctypes.c_void_p),
        ("eps1", ctypes.c_void_p),
        ("eps2", ctypes.c_void_p),
        ("qkv", ctypes.c_void_p),
        ("o", ctypes.c_void_p),
        ("gate_up", ctypes.c_void_p),
        ("down", ctypes.c_void_p),
        ("head", ctypes.c_void_p),
        ("vocab", ctypes.c_int),
        ("embedding_f32", ctypes.c_int),
        ("cache_f32", ctypes.c_int),
    ]


class NativeBuildError(RuntimeError):
    """The native library cannot be built or loaded here; the message says why (for the log and the path's reason)."""


def build_library(cache_dir: Path | None, isa: str = "auto", extra_flags: Sequence[str] = ()) -> ctypes.CDLL:
    """forward.c compiled for CPU_ISA `isa` (cached in `cache_dir`); NativeBuildError when it cannot be.

    `extra_flags` go to the compiler after the others (tests build other variants with them)."""
    why_not = native_possible(isa)
    if why_not is not None:
        raise NativeBuildError(why_not)
    compiler = c_compiler()
    assert compiler is not None
    flags = [*_FLAGS, f"-march={native_march(isa)}", *extra_flags]
    try:
        sources = [path.read_text() for path in sorted(SOURCE.parent.iterdir()) if path.suffix in (".c", ".h")]
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
        recipe = [*sources, version, " ".join(flags), " ".join(sorted(cpu_flags())), torch.__version__]
        key = hashlib.sha256("\n".join(recipe).encode()).hexdigest()[:16]
        directory = _writable_directory(cache_dir)
        target = directory / f"native-forward-{key}.so"
        if not target.exists():
            with tempfile.TemporaryDirectory(dir=directory) as scratch:
                built = Path(scratch) / target.name
                command = [compiler, *flags, "-o", str(built), str(SOURCE), "-lm"]
                result = subprocess.run(command, capture_output=True, text=True, timeout=300)
                if result.returncode != 0:
                    logger.warning("building the native forward pass failed:\n%s", result.stderr[-2000:])
                    raise NativeBuildError(f"the C compiler failed ({compiler})")
                os.replace(built, target)
        library = ctypes.CDLL(str(target))
    except (OSError, subprocess.SubprocessError) as error:
        raise NativeBuildError(f"{type(error).__name__}: {error}") from None
    library.native_new.restype = ctypes.c_void_p
    library.native_new.argtypes = [ctypes.POINTER(_Model)]
    library.native_free.argtypes = [ctypes.c_void_p]
    library.native_forward.restype = ctypes.c_int
    pointer, int_ = ctypes.c_void_p, ctypes.c_int
    # ctx, n, tokens, positions, segment, column, start, segments, keys, values, capacity, n_out, out_rows, out
    library.native_forward.argtypes = [pointer, int_, *[pointer] * 5, int_, *[pointer] * 3, int_, pointer, pointer]
    return library


def _writable_directory(cache_dir: Path | None) -> Path:
    """MODEL_CACHE_DIR where it can be written, else the temporary directory (the build takes ~1 s either way)."""
    if cache_dir is not None:
        try:
            Path(cache_dir).mkdir(parents=True, exist_ok=True)
            if os.access(cache_dir, os.W_OK):
                return Path(cache_dir)
        except OSError:
            pass
        logger.info(
            "MODEL_CACHE_DIR %s cannot be written: the native library is built in the temporary directory", cache_dir
        )
    return Path(tempfile.gettempdir())
