"""Will the model fit? The weights' size for each QUANTIZATION, from the model's config, against free memory; and the
memory hygiene after loading (the heap's free pages given back, memory-mapped weights copied into aligned memory).

Checked before any weight is read (`inference.model.loading.load_model`), so a model that cannot fit is refused with
one line naming both numbers and the QUANTIZATION that would fit, instead of the kernel's OOM killer ending the
process mid-load (or accelerate quietly offloading a GPU model to the CPU).

The estimate counts what loading keeps in memory: every parameter in the load dtype, except the linear layers
bitsandbytes quantizes (every `nn.Linear` but the output head): 8bit stores 1 byte per weight and one fp32
scale per output row; 4bit (nf4) half a byte per weight and one fp32 absmax per block of 64. On CPU with
PACK_CPU_WEIGHTS, each linear that stays a plain `nn.Linear` is also kept as a prepacked copy where the path in force
packs it (inference/cpu/paths.py, inference/cpu/packed.py). On top comes a reserve for the runtime (activations, KV
cache, the process itself): RESERVE_BYTES plus RESERVE_FRACTION of the weights.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

QUANTIZATIONS = ("none", "8bit", "4bit")  # from the largest to the smallest footprint
RESERVE_BYTES = 1 << 30
RESERVE_FRACTION = 0.05
NF4_BLOCK = 64
GB = 1e9
# After a request of at least this many tokens (prompt and output) ends, the engines give the heap's free pages back
# (`release_free_heap`): its KV cache and prefill leave holes glibc keeps (an 8k-token prompt: RSS 0.75 GB at ready,
# 1.12 GB after, 0.78 GB trimmed; docs/operations.md#memory). Shorter ones leave little, and trimming is not free.
TRIM_AFTER_TOKENS = 1024


@dataclass(frozen=True)
class WeightCounts:
    """Elements of a model's weights, by what quantization does to them."""

    quantizable: int  # weights of linear layers bitsandbytes replaces
    quantizable_rows: int  # their output rows (8bit keeps one fp32 scale per row)
    kept: int  # everything else (embeddings, norms, biases, the output head unless tied), in the load dtype
    head: int  # the output head's weights (a plain linear in every mode, prepacked on CPU; maybe tied)


def count_weights(config: Any, trust_remote_code: bool = False) -> WeightCounts:
    """Count the weights of `config`'s causal LM on the meta device (no memory used, ~2 s for a 9B model)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    head = model.get_output_embeddings()
    head_weight = getattr(head, "weight", None)
    seen: set[int] = set()
    quantizable = rows = kept = 0
    for module in model.modules():
        for name, parameter in module.named_parameters(recurse=False):
            if id(parameter) in seen:  # tied weights count once
                continue
            seen.add(id(parameter))
            if isinstance(module, torch.nn.Linear) and module is not head and name == "weight":
                quantizable += parameter.numel()
                rows += parameter.shape[0]
            else:
                kept += parameter.numel()
    head_count = head_weight.numel() if isinstance(head, torch.nn.Linear) and head_weight is not None else 0
    return WeightCounts(quantizable=quantizable, quantizable_rows=rows, kept=kept, head=head_count)


def weight_bytes(counts: WeightCounts, quantization: str, dtype_bytes: int = 2, packed_copies: bool = False) -> int:
    """Bytes the loaded weights take for `quantization` (`none`, `8bit`, `4bit`).

    `packed_copies`: bf16 on CPU with PACK_CPU_WEIGHTS, where every plain bf16 linear is also kept prepacked.
    The output head is a plain linear in every mode; when tied to the embeddings its weight is counted once but
    still packed once.
    """
    kept = counts.kept * dtype_bytes
    if quantization == "none":
        linear = counts.quantizable * dtype_bytes
        packed = (counts.quantizable + counts.head) * dtype_bytes if packed_copies else 0
    elif quantization == "8bit":
        linear = counts.quantizable + 4 * counts.quantizable_rows
        packed = counts.head * dtype_bytes if packed_copies else 0
    elif quantization == "4bit":
        linear = counts.quantizable // 2 + 4 * -(-counts.quantizable // NF4_BLOCK)
        packed = counts.head * dtype_bytes if packed_copies else 0
    else:
        raise ValueError(f"unknown quantization {quantization!r}")
    return kept + linear + packed


def required_bytes(weights: int) -> int:
    """Weights plus the runtime reserve."""
    return weights + RESERVE_BYTES + int(RESERVE_FRACTION * weights)


UNLIMITED = 1 << 62  # cgroup v1 writes "no limit" as a page-rounded 2**63 - 1


def cgroup_available_bytes(
    root: Path = Path("/sys/fs/cgroup"), proc_cgroup: Path = Path("/proc/self/cgroup")
) -> int | None:
    """Memory left under this process's cgroup limit (a container's `--memory`), if it has one: cgroup v2's
    `memory.max`, else cgroup v1's `memory.limit_in_bytes` (a container on a cgroup v1 host, where v2 reads nothing
    and the host's RAM would be taken for this container's), in the process's own cgroup or at the mount's root."""
    with contextlib.suppress(OSError, ValueError):
        limit = (root / "memory.max").read_text().strip()
        if limit != "max":
            return max(0, int(limit) - int((root / "memory.current").read_text().strip()))
        return None
    v1 = root / "memory"
    candidates = [v1]
    with contextlib.suppress(OSError):
        for line in proc_cgroup.read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            if "memory" in controllers.split(","):
                candidates.insert(0, v1 / path.lstrip("/"))
    for directory in candidates:
        with contextlib.suppress(OSError, ValueError):
            limit_v1 = int((directory / "memory.limit_in_bytes").read_text().strip())
            if limit_v1 < UNLIMITED:
                return max(0, limit_v1 - int((directory / "memory.usage_in_bytes").read_text().strip()))
    return None


def address_space_left(status: Path = Path("/proc/self/status")) -> int | None:
    """Bytes of address space left under RLIMIT_AS (`ulimit -v`), if one is set: the limit minus VmSize."""
    import resource

    soft, _hard = resource.getrlimit(resource.RLIMIT_AS)
    if soft == resource.RLIM_INFINITY:
        return None
    with contextlib.suppress(OSError, ValueError, StopIteration):
        line = next(line for line in status.read_text().splitlines() if line.startswith("VmSize:"))
        return max(0, soft - int(line.split()[1]) * 1024)
    return None


def available_bytes(has_cuda: bool) -> tuple[int, str]:
    """(bytes, what they are): free GPU memory over all visible GPUs on CUDA, else available RAM, capped by a
    cgroup limit (v1 or v2) and an address-space limit."""
    if has_cuda:
        import torch

        free = sum(torch.cuda.mem_get_info(index)[0] for index in range(torch.cuda.device_count()))
        return free, "free GPU memory"
    import psutil

    found = [(psutil.virtual_memory().available, "available RAM")]
    limit = cgroup_available_bytes()
    if limit is not None:
        found.append((limit, "memory left under this container's limit"))
    space = address_space_left()
    if space is not None:
        found.append((space, "address space left under this process's limit (RLIMIT_AS)"))
    return min(found, key=lambda item: item[0])


def gb(value: int) -> str:
    return f"{value / GB:.1f} GB"


def options(counts: WeightCounts, dtype_bytes: int, packing: bool) -> list[tuple[str, int]]:
    """(settings, required bytes) for each way to load the model, from the most to the least memory.

    With prepacking on (CPU, bf16, PACK_CPU_WEIGHTS), each QUANTIZATION is followed by the same one without it.
    """
    found: list[tuple[str, int]] = []
    for quantization in QUANTIZATIONS:
        found.append(
            (f"QUANTIZATION={quantization}", required_bytes(weight_bytes(counts, quantization, dtype_bytes, packing)))
        )
        if packing:
            label = f"QUANTIZATION={quantization} PACK_CPU_WEIGHTS=false"
            found.append((label, required_bytes(weight_bytes(counts, quantization, dtype_bytes, False))))
    return found


def check_fits(source: str, requested: str, choices: list[tuple[str, int]], available: int, where: str) -> None:
    """Raise ModelLoadError (one line) when the `requested` entry of `choices` needs more than `available`.

    The message names the first of `choices` (the least compressed) that fits, or says that none does.
    """
    from inference.types import ModelLoadError

    needs = dict(choices)
    required = needs[requested]
    if required <= available:
        return
    fitting = [(label, need) for label, need in choices if need <= available]
    if fitting:
        advice = f"set {fitting[0][0]} (about {gb(fitting[0][1])})"
    else:
        label, need = min(choices, key=lambda choice: choice[1])
        advice = (
            f"nothing fits ({label} needs about {gb(need)}): free memory, or use a smaller model or a larger machine"
        )
    raise ModelLoadError(
        f"model {source!r} needs about {gb(required)} with {requested} (weights and runtime reserve), but only "
        f"{gb(available)} of {where} is left: {advice}; MEMORY_CHECK=false skips this check"
    )


def release_free_heap() -> bool:
    """Give the C heap's free pages back to the kernel (glibc's `malloc_trim`); False where there is none.

    Quantizing while loading allocates and frees temporaries of every weight's size. Those under glibc's mmap
    threshold (up to 32 MB: the attention projections of a 9B model) come from the heap, and the holes they leave
    between the kept int8/nf4 weights stay counted in the process's RSS: measured with sahabat-ai's shape in 8-bit,
    ~75 MB per layer, ~3 GB over 42 layers. `malloc_trim(0)` returns them (bench/cpu_shape.py).
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.malloc_trim(0))
    except (OSError, AttributeError):  # not glibc (musl, macOS, Windows)
        return False


MMAP_THRESHOLD_BYTES = 4 << 20
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def pin_mmap_threshold(threshold: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Serve every allocation of `threshold` bytes or more with a mapping of its own, unmapped when freed (glibc's
    `mallopt(M_MMAP_THRESHOLD)`); False where there is no glibc, or MALLOC_MMAP_THRESHOLD_ is set (the operator's).

    By default glibc raises that threshold up to 32 MB as large blocks are freed, so a prefill's transients (int32
    matmul outputs, casts, attention scores: 4-30 MB each for the 9B shape) come from the heap, and the KV cache
    blocks allocated between them pin the holes they leave: measured with the 9B shape in 8-bit, RSS grew ~58 MB per
    layer over one 512-token chunk, +2.4 GB in all, freed memory the kernel could not have back
    (docs/operations.md#memory). Mapping them is not free: on that shape a lone stream's 512-token prefill took ~15 %
    longer and its decode ran ~10 % slower than at 32 MB, with 4 streams no difference (same page): the price of
    halving a long prompt's growth there.
    """
    import ctypes
    import ctypes.util
    import os

    if os.environ.get("MALLOC_MMAP_THRESHOLD_"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, threshold))
    except (OSError, AttributeError):  # not glibc
        return False


def align_cpu_weights(model: Any, alignment: int = 64, copy_unquantized: bool = False) -> int:
    """Copy CPU weights that are not `alignment`-byte aligned into fresh (aligned) memory; returns how many.

    safetensors files are memory-mapped, so weights loaded from one (the model cache, a local directory) sit
    at the file's offsets: measured here, every tensor of the cached embedded model was 8 bytes off a 64-byte
    boundary and each decoding step took 5-10x longer (~600 ms instead of ~90 ms: oneDNN's bf16 matmuls
    fall off their fast path). Tied weights stay tied (the Parameter object is kept; only its data moves).

    `copy_unquantized` (bitsandbytes models): copy every floating-point tensor, aligned or not. The quantized
    weights are new memory, and what still points into the checkpoint (norms, biases) keeps each whole shard
    mapped: with sahabat-ai's shape in 8-bit, 6 GB of the bf16 shards' pages stayed in the process's RSS
    (file-backed: reclaimable, but counted by `ps`, cgroups and dashboards). After the copy the shards are unmapped.
    """
    import itertools

    import torch

    moved = 0
    with torch.no_grad():
        for tensor in itertools.chain(model.parameters(), model.buffers()):
            if tensor.device.type != "cpu" or not tensor.numel():
                continue
            if tensor.data_ptr() % alignment or (copy_unquantized and tensor.is_floating_point()):
                tensor.data = tensor.data.clone()
                moved += 1
    if moved:
        logger.debug("copied %d memory-mapped CPU tensors into aligned memory", moved)
    return moved
