"""oneDNN-prepacked bf16 linear layers for CPU decoding, and the int4 copy passes of few rows take.

A decoding step of a small model on a CPU is bound by reading the weights: every `nn.Linear` streams its
whole weight matrix for a handful of rows. `F.linear` hands oneDNN the plain row-major bf16 matrix, which
it re-blocks on every call; prepacking it once into oneDNN's own blocked layout
(`torch.ops.mkldnn._reorder_linear_weight`, what `torch.compile`'s CPU weight freezing uses) made each
linear ~1.5x faster for 1-16 rows on the 2-core CPU, bit for bit the same output (`bench/cpu_kernels.py --packed`).

Passes of fewer than INT4_BELOW_ROWS rows (a lone request, or a few, decoding) are bound by reading the weights
even when prepacked: where the native step (inference/native_step.py) cannot be built, those multiply by an int4
copy instead (`Int4Weight`, torch's CPU int4 kernel over the embedded GGUF's own Q4_1 blocks,
inference/gguf_int4.py), a quarter of the bytes.

Imported only where torch is loaded (CPU models), so the remote engine and the web layer never import it.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

# Measured on the 2-core CPU (`bench/cpu_kernels.py --int4`; us per matmul, bf16 prepacked / int4, by rows):
#   rows                1          2          4          6          8          12         16
#   gate 1536x576       64 / 23    68 / 30    67 / 41    67 / 51    74 / 65    66 / 78    80 / 97
#   down 576x1536       73 / 29    71 / 38    65 / 42    56 / 52    64 / 64    77 / 92    82 / 116
#   o 576x576           25 / 12    26 / 13    26 / 15    26 / 22    30 / 27    33 / 35    34 / 49
# and a whole lean decoding step, bf16 / int4: 14.0 / 8.3 ms at 1 row, 15.8 / 12.2 at 4, 17.3 / 15.3 at 6; at 8
# rows the two kernels are even, above it int4 loses. So passes of fewer than 8 rows take int4.
INT4_BELOW_ROWS = 8
INT4_GROUP = 32  # weights per scale and zero: a Q4_1 block


@dataclass(frozen=True)
class Int4Weight:
    """A linear's weight in torch's CPU int4 layout: `w = (q - 8) * scale + zero` per group of 32 inputs.

    `packed` is `_convert_weight_to_int4pack_for_cpu`'s (out, in / 2) uint8 matrix, `scales_zeros` (in / 32, out, 2)
    in the activations' dtype (bf16). Rows are independent: a row's output is the same bits whatever the other rows
    of the pass, and weights concatenated along the outputs give the concatenated outputs, bit for bit (tested).
    """

    packed: torch.Tensor
    scales_zeros: torch.Tensor

    def mm(self, input: torch.Tensor) -> torch.Tensor:
        rows = input.reshape(-1, input.shape[-1])
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(rows, self.packed, INT4_GROUP, self.scales_zeros)
        return out.view(*input.shape[:-1], out.shape[-1])

    @staticmethod
    def concat(weights: list[Int4Weight]) -> Int4Weight:
        if len(weights) == 1:
            return weights[0]
        return Int4Weight(torch.cat([w.packed for w in weights]), torch.cat([w.scales_zeros for w in weights], dim=1))


def int4_available() -> bool:
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and hasattr(
        torch.ops.aten, "_convert_weight_to_int4pack_for_cpu"
    )


# module -> (packed weight, data pointer and version counter of the weight it was packed from). Kept outside the
# module so a deepcopy (or `.to(torch.float32)`) of the model gets plain linears again, not stale packed weights.
_packed: weakref.WeakKeyDictionary[torch.nn.Module, tuple[torch.Tensor, int, int]] = weakref.WeakKeyDictionary()
# module -> (its int4 copy, data pointer and version counter of the bf16 weight it stands for): attach_int4.
_int4: weakref.WeakKeyDictionary[torch.nn.Module, tuple[Int4Weight, int, int]] = weakref.WeakKeyDictionary()


def packing_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


class PackedLinear(torch.nn.Linear):
    """An `nn.Linear` that runs oneDNN's prepacked kernel when it can, and `F.linear` otherwise.

    It falls back when gradients are on (the packed kernel has no backward), when the input is not bf16,
    or when the weight was replaced, moved or changed in place since it was packed (then it is repacked at
    the next call without gradients). A pass of fewer than INT4_BELOW_ROWS rows takes the int4 copy where
    `attach_int4` gave one (dropped once the weight changes). The `weight` Parameter stays as it was,
    so tied weights, `state_dict` and the model cache are unaffected.
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        if self in _int4 and input.dtype == torch.bfloat16 and not torch.is_grad_enabled():
            int4 = int4_weight(self)
            if int4 is not None and input.numel() < INT4_BELOW_ROWS * input.shape[-1]:
                out = int4.mm(input)
                return out if self.bias is None else out + self.bias
        if self in _packed and input.dtype == torch.bfloat16 and not torch.is_grad_enabled():
            packed = packed_weight(self)
            if packed is None and weight.dtype == torch.bfloat16 and weight.device.type == "cpu":
                packed = _pack(self)[0]  # the weight changed since it was packed
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


def pack_linears(model: Any) -> int:
    """Prepack every bf16 CPU `nn.Linear` of `model` (in place); returns how many were packed."""
    if not packing_available():
        return 0
    count = 0
    with torch.no_grad():
        for module in model.modules():
            if type(module) is not torch.nn.Linear:  # quantized or custom linears keep their own kernels
                continue
            weight = module.weight
            if weight.device.type != "cpu" or weight.dtype != torch.bfloat16:
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


def attach_int4(module: torch.nn.Module, weight: Int4Weight) -> None:
    """Give a prepacked linear (`pack_linears`) an int4 copy of its weight for passes of few rows."""
    if not isinstance(module, PackedLinear):
        raise TypeError(f"int4 copies go on prepacked linears, not {type(module).__name__}")
    _int4[module] = (weight, module.weight.data_ptr(), module.weight._version)


def int4_weight(module: Any) -> Int4Weight | None:
    """`module`'s int4 copy, if it has one and its weight has not changed since it was attached."""
    entry = _int4.get(module)
    if entry is None:
        return None
    if module.weight.data_ptr() != entry[1] or module.weight._version != entry[2]:
        del _int4[module]  # not the weight the copy stands for any more: bf16 from now on
        return None
    return entry[0]
