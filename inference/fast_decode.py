"""A lean decoding step for Llama-architecture models on CPU (the embedded SmolLM2), for the batched engine.

On the 2-core CPU a decoding step of the embedded model spent ~20 ms reading weights and ~15 ms more in the
~2,100 small tensor ops and Python calls of transformers' modules (norms, rotary, masks, cache bookkeeping,
attention dispatch). This runs the same arithmetic, op for op in the same dtypes as transformers' Llama code,
with far fewer calls: q/k/v and gate/up are each one prepacked oneDNN matmul over concatenated weights, rotary
embedding is applied to queries and keys together, and the attention mask and rotary tables are built once
per step instead of once per layer. Outputs match transformers' forward to bf16 rounding (tested).

It is used only where it applies (`LlamaDecoder.supports`): a bf16 Llama model on CPU with plain linears and
default rotary embedding. Everything else (Gemma2, quantized weights, GPUs) runs transformers' forward.
Prefill (many tokens per row, compute-bound) stays on transformers' forward too: its per-op overhead is
amortised over the prompt.

The decoder snapshots the weights when it is built: it is for serving, not for a model being edited.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from inference.cpu_kernels import packed_weight, packing_available


def _linear_pointwise(input: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(input, packed, None, "none", [], "")


class LlamaDecoder:
    """One decoding step (one new token per row) over a transformers cache, for a bf16 Llama model on CPU."""

    @staticmethod
    def supports(model: Any) -> bool:
        config = getattr(model, "config", None)
        if config is None or getattr(config, "model_type", None) != "llama" or not packing_available():
            return False
        rope = getattr(config, "rope_parameters", None) or {}
        if rope.get("rope_type", "default") != "default" or config.hidden_act != "silu":
            return False
        if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
            return False
        if getattr(config, "pretraining_tp", 1) != 1:
            return False
        try:
            decoder = model.model
            layers = decoder.layers
        except AttributeError:
            return False
        weights = [model.lm_head.weight, decoder.embed_tokens.weight]
        for layer in layers:
            attention, mlp = layer.self_attn, layer.mlp
            linears = [attention.q_proj, attention.k_proj, attention.v_proj, attention.o_proj]
            linears += [mlp.gate_proj, mlp.up_proj, mlp.down_proj]
            if any(not isinstance(linear, torch.nn.Linear) for linear in linears):  # e.g. bitsandbytes layers
                return False
            weights += [linear.weight for linear in linears]
        return all(w.device.type == "cpu" and w.dtype == torch.bfloat16 for w in weights)

    def __init__(self, model: Any) -> None:
        if not self.supports(model):
            raise ValueError("LlamaDecoder needs a bf16 Llama model on CPU with plain linear layers")
        config = model.config
        decoder = model.model
        self.head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)
        self.query_heads = int(config.num_attention_heads)
        self.kv_heads = int(config.num_key_value_heads)
        self.groups = self.query_heads // self.kv_heads
        self.scaling = self.head_dim**-0.5
        self.embedding = decoder.embed_tokens.weight
        self.final_norm = (decoder.norm.weight, float(decoder.norm.variance_epsilon))
        self.lm_head = self._packed(model.lm_head)
        rotary = decoder.rotary_emb
        self.inv_freq = rotary.inv_freq.float()
        self.rotary_scaling = float(rotary.attention_scaling)
        self.layers: list[tuple[Any, ...]] = []
        with torch.no_grad():
            for layer in decoder.layers:
                attention, mlp = layer.self_attn, layer.mlp
                qkv = torch.cat([attention.q_proj.weight, attention.k_proj.weight, attention.v_proj.weight])
                gate_up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])
                self.layers.append(
                    (
                        layer.input_layernorm.weight,
                        float(layer.input_layernorm.variance_epsilon),
                        self._pack(qkv),
                        self._packed(attention.o_proj),
                        layer.post_attention_layernorm.weight,
                        float(layer.post_attention_layernorm.variance_epsilon),
                        self._pack(gate_up),
                        int(mlp.gate_proj.weight.shape[0]),
                        self._packed(mlp.down_proj),
                    )
                )

    @classmethod
    def _packed(cls, linear: torch.nn.Linear) -> torch.Tensor:
        """The linear's weight in oneDNN's layout: the one PACK_CPU_WEIGHTS made at load, else a new one."""
        packed = packed_weight(linear)
        return cls._pack(linear.weight) if packed is None else packed

    @staticmethod
    def _pack(weight: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous())

    @staticmethod
    def _rms_norm(hidden: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        # transformers' LlamaRMSNorm, op for op (float32 statistics, then back to bf16 before the weight).
        # F.rms_norm is one kernel for the pow/mean/rsqrt/mul chain and gives the same bits.
        states = F.rms_norm(hidden.to(torch.float32), (hidden.shape[-1],), eps=eps)
        return weight * states.to(hidden.dtype)

    def _rotary_tables(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sign-folded sin, (rows, 1, head_dim): x*cos + roll(x)*sin equals transformers' rotate_half form."""
        freqs = positions[:, None].float() * self.inv_freq
        angles = torch.cat((freqs, freqs), dim=-1)
        cos = (angles.cos() * self.rotary_scaling).to(dtype)
        sin = (angles.sin() * self.rotary_scaling).to(dtype)
        half = self.head_dim // 2
        # rotate_half(x) = cat(-x2, x1) = roll(x, half) with the first half negated; fold the sign into sin
        # (negation is exact, so the products round exactly as transformers' do).
        sin = torch.cat((-sin[:, :half], sin[:, half:]), dim=-1)
        return cos[:, None, :], sin[:, None, :]

    def step(self, tokens: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, cache: Any) -> torch.Tensor:
        """Logits (rows, vocab) for one new token per row.

        `tokens` and `positions` are (rows,); `mask` is (rows, columns) with 1 for real tokens, the new token's
        column included (the cache holds columns - 1); `cache` is the transformers cache the rows share.
        """
        rows = tokens.shape[0]
        hidden = F.embedding(tokens, self.embedding)  # (rows, hidden)
        cos, sin = self._rotary_tables(positions, hidden.dtype)
        # Without padding, transformers attends with no mask and grouped-query heads inside sdpa; with padding, a
        # boolean mask and the queries grouped per key/value head. Same kernels here, so greedy outputs match.
        attend = None
        if not bool(mask.all()):  # an additive mask, (rows, 1, 1, columns): sdpa's result is the same as a bool mask's
            attend = torch.zeros(mask.shape, dtype=hidden.dtype).masked_fill_(mask == 0, float("-inf"))[:, None, None]
        head_dim, query_heads, kv_heads = self.head_dim, self.query_heads, self.kv_heads
        rotated_heads = query_heads + kv_heads
        for layer, cache_layer in zip(self.layers, cache.layers, strict=True):
            norm1, eps1, qkv_weight, o_weight, norm2, eps2, gate_up_weight, intermediate, down_weight = layer
            normed = self._rms_norm(hidden, norm1, eps1)
            qkv = _linear_pointwise(normed, qkv_weight).view(rows, rotated_heads + kv_heads, head_dim)
            query_key = qkv[:, :rotated_heads]
            query_key = query_key * cos + query_key.roll(head_dim // 2, dims=-1) * sin
            key = query_key[:, query_heads:, None, :]  # (rows, kv_heads, 1, head_dim)
            value = qkv[:, rotated_heads:, None, :]
            keys, values = cache_layer.update(key, value)
            if attend is None:
                query = query_key[:, :query_heads, None, :]  # (rows, query_heads, 1, head_dim)
                attention = F.scaled_dot_product_attention(query, keys, values, scale=self.scaling, enable_gqa=True)
            else:
                query = query_key[:, :query_heads].reshape(rows, kv_heads, self.groups, head_dim)
                attention = F.scaled_dot_product_attention(query, keys, values, attn_mask=attend, scale=self.scaling)
            hidden = hidden + _linear_pointwise(attention.reshape(rows, query_heads * head_dim), o_weight)
            normed = self._rms_norm(hidden, norm2, eps2)
            gate_up = _linear_pointwise(normed, gate_up_weight)
            activated = F.silu(gate_up[:, :intermediate]) * gate_up[:, intermediate:]
            hidden = hidden + _linear_pointwise(activated, down_weight)
        hidden = self._rms_norm(hidden, *self.final_norm)
        return _linear_pointwise(hidden, self.lm_head)
