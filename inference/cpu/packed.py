"""oneDNN-prepacked linear layers (bf16 or float32) for CPU passes: the `lean` path (inference/cpu/paths.py).

`F.linear` hands oneDNN the plain row-major matrix, which it re-blocks on every call; prepacking it once into
oneDNN's own blocked layout (`torch.ops.mkldnn._reorder_linear_weight`, what `torch.compile`'s CPU weight freezing
uses) gives the same output bit for bit, faster (docs/cpu-paths.md#the-measurements-behind-the-code). oneDNN's bf16
kernels need AVX-512 (BW/VL/DQ) or AVX-NE-CONVERT, so bf16 weights are prepacked only where the CPU has native bf16
matmuls; float32 weights anywhere.

Imported only where torch is loaded (CPU models), so the remote engine and the web layer never import it.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
import torch.nn.functional as F

PACKED_DTYPES = (torch.bfloat16, torch.float32)

# module -> (packed weight, data pointer and version counter of the weight it was packed from). Kept outside the
# module so a deepcopy (or `.to(torch.float32)`) of the model gets plain linears again, not stale packed weights.
_packed: weakref.WeakKeyDictionary[torch.nn.Module, tuple[torch.Tensor, int, int]] = weakref.WeakKeyDictionary()


def packing_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


class PackedLinear(torch.nn.Linear):
    """An `nn.Linear` that runs oneDNN's prepacked kernel when it can, and `F.linear` otherwise.

    It falls back when gradients are on (the packed kernel has no backward), when the input is not in the weight's
    dtype, or when the weight was replaced, moved or changed in place since it was packed (then it is repacked at
    the next call without gradients). The `weight` Parameter stays as it was,
    so tied weights, `state_dict` and the model cache are unaffected.
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        if self in _packed and input.dtype == weight.dtype and not torch.is_grad_enabled():
            packed = packed_weight(self)
            if packed is None and weight.dtype == _packed[self][0].dtype and weight.device.type == "cpu":
                packed = _pack(self)[0]  # the weight changed since it was packed (same dtype: packable here)
            if packed is not None:
                return linear_pointwise(input, packed, self.bias)
        return F.linear(input, weight, self.bias)


def linear_pointwise(input: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`input @ weight.T + bias` with a weight prepacked by `torch.ops.mkldnn._reorder_linear_weight`."""
    return torch.ops.mkldnn._linear_pointwise(input, packed, bias, "none", [], "")


def _pack(module: torch.nn.Linear) -> tuple[torch.Tensor, int, int]:
    weight = module.weight
    entry = (torch.ops.mkldnn._reorder_linear_weight(weight.detach()), weight.data_ptr(), weight._version)
    _packed[module] = entry
    return entry


def pack_linears(model: Any, dtypes: tuple[torch.dtype, ...] = PACKED_DTYPES) -> int:
    """Prepack every CPU `nn.Linear` of `model` whose weight is in one of `dtypes` (in place: inference/cpu/paths.py
    says which this CPU packs); returns how many were packed."""
    if not packing_available():
        return 0
    count = 0
    with torch.no_grad():
        for module in model.modules():
            if type(module) is not torch.nn.Linear:  # quantized or custom linears keep their own kernels
                continue
            weight = module.weight
            if weight.device.type != "cpu" or weight.dtype not in dtypes or weight.dtype not in PACKED_DTYPES:
                continue
            _pack(module)
            module.__class__ = PackedLinear
            count += 1
    return count


def packed_weight(module: Any) -> torch.Tensor | None:
    """`module`'s current prepacked weight, if it has one that matches its weight."""
    entry = _packed.get(module)
    if entry is None or module.weight.data_ptr() != entry[1] or module.weight._version != entry[2]:
        return None
    return entry[0]


def is_packed(module: Any) -> bool:
    return module in _packed
