"""Lean forward passes for Llama-architecture models on CPU (the embedded SmolLM2), for the batched engine.

On the 2-core CPU a decoding step of the embedded model spent ~20 ms reading weights and ~15 ms more in the
~2,100 small tensor ops and Python calls of transformers' modules (norms, rotary, masks, cache bookkeeping,
attention dispatch). This runs the same arithmetic, op for op in the same dtypes as transformers' Llama code,
with far fewer calls: q/k/v and gate/up are each one prepacked oneDNN matmul over concatenated weights, rotary
embedding is applied to queries and keys together, and the attention mask and rotary tables are built once
per pass instead of once per layer.

A pass also carries prompts next to the decoding rows (`LeanForward.forward`), whole or a chunk of a long one:
every token goes through the matmuls together, so a newcomer's prefill reads the weights once with the running
rows' step instead of in a pass of its own (~25-40 ms saved per joining request here), and prompts need no
padding (each attends over its own cache). A decoding step alone or a lone prompt gives exactly transformers'
bits (tested).

This is the `lean` path (inference/cpu/paths.py): a Llama model on CPU, in bf16 where the CPU has native bf16 matmuls
or in float32, where the native path (inference/cpu/native_forward.py, the embedded GGUF's own blocks) does not serve.
`LeanForward.supports` checks the model: bf16 or float32 on CPU with plain linears and default rotary embedding.
Everything else (Gemma2, quantized
weights, GPUs) runs transformers' forward.
The decoder snapshots the weights when it is built: it is for serving, not for a model being edited.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from inference.cpu.packed import PackedLinear, linear_pointwise, packed_weight, packing_available
from inference.cpu.passes import DecodeRows, PromptRow


def bucket_rows(count: int) -> int:
    """`count` rounded up to one of a few sizes per power of two (exact up to 32; < 12.5% more above).

    oneDNN builds and caches a kernel, with its own scratch memory, for every row count a matmul sees. Passes
    that mix prompts with decoding rows have all sorts of row counts: over a few rounds of the load test the
    process grew by ~400 MB before the cache filled. Rounding the row count bounds the shapes to ~8 per octave.
    """
    if count <= 32:
        return count
    step = 1 << (count.bit_length() - 4)  # an eighth of the power of two below count
    return -(-count // step) * step


class LeanForward:
    """Lean passes over transformers caches, for a bf16 or float32 Llama model on CPU."""

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
            # Exactly nn.Linear (or its prepacked form): bitsandbytes' Linear8bitLt/Linear4bit subclass nn.Linear
            # but hold int8/nf4 weights and run their own kernels, so those models take transformers' forward.
            if any(type(linear) not in (torch.nn.Linear, PackedLinear) for linear in linears):
                return False
            weights += [linear.weight for linear in linears]
        dtype = weights[0].dtype
        uniform = all(w.device.type == "cpu" and w.dtype == dtype for w in weights)
        return uniform and dtype in (torch.bfloat16, torch.float32)

    def __init__(self, model: Any) -> None:
        if not self.supports(model):
            raise ValueError("LeanForward needs a bf16 or float32 Llama model on CPU with plain linear layers")
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
                qkv = [attention.q_proj, attention.k_proj, attention.v_proj]
                gate_up = [mlp.gate_proj, mlp.up_proj]
                self.layers.append(
                    (
                        layer.input_layernorm.weight,
                        float(layer.input_layernorm.variance_epsilon),
                        self._linear(qkv),
                        self._linear([attention.o_proj]),
                        layer.post_attention_layernorm.weight,
                        float(layer.post_attention_layernorm.variance_epsilon),
                        self._linear(gate_up),
                        int(mlp.gate_proj.weight.shape[0]),
                        self._linear([mlp.down_proj]),
                    )
                )

    @classmethod
    def _linear(cls, linears: list[torch.nn.Linear]) -> torch.Tensor:
        """The linears' weights concatenated along their outputs (one matmul for all), prepacked for oneDNN."""
        return cls._packed(linears[0]) if len(linears) == 1 else cls._pack(torch.cat([m.weight for m in linears]))

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
        # transformers' LlamaRMSNorm, op for op (float32 statistics, then back to the model's dtype before the weight).
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
        """Logits (rows, vocab) for one new token per row (a pass with no prompts)."""
        logits, _ = self.forward(DecodeRows(tokens, positions, mask, cache), [])
        assert logits is not None
        return logits

    def forward(
        self, decode: DecodeRows | None, prompts: Sequence[PromptRow]
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """One pass: the next-token logits of the decoding rows (rows, vocab) and of each prompt (prompts, vocab).

        Every token of the pass (one per decoding row, all of every prompt's) goes through the matmuls together,
        so the weights are read once for all of them; only attention is done per part: the decoding rows over
        their shared cache, each prompt causally over its own fresh cache. A pass of only decoding rows, or of one
        prompt, gives the same bits as transformers' forward (tested). oneDNN runs matmuls of more than 32 rows
        with another kernel that rounds differently in bf16, so a decoding row in a pass with prompts can get
        slightly different logits than in a step alone, as in any batched forward.
        """
        decoding = 0 if decode is None else int(decode.tokens.shape[0])
        spans = [prompt.span() for prompt in prompts]
        lengths = [end - start for start, end in spans]
        if not decoding and not lengths:
            raise ValueError("a pass needs decoding rows or prompts")
        tokens = [decode.tokens] if decode is not None else []
        positions = [decode.positions] if decode is not None else []
        for prompt, (start, end) in zip(prompts, spans, strict=True):
            tokens.append(prompt.ids[start:end])
            positions.append(torch.arange(start, end, device=prompt.ids.device))
        # A later chunk of a prompt attends to the earlier chunks in its cache and causally within itself
        # (queries are bottom-right aligned on the keys, which sdpa's is_causal does not do for unequal lengths).
        chunk_masks = [
            None
            if start == 0
            else torch.arange(start, end)[:, None] >= torch.arange(end)[None, :]  # (chunk, end) True = attend
            for start, end in spans
        ]
        token_ids = torch.cat(tokens) if len(tokens) > 1 else tokens[0]
        position_ids = torch.cat(positions) if len(positions) > 1 else positions[0]
        count = int(token_ids.shape[0])
        padded = count if decode is None and len(prompts) == 1 else bucket_rows(count)
        if padded > count:  # filler rows: zeros through the matmuls, outside every attention part, never read
            token_ids = F.pad(token_ids, (0, padded - count))
            position_ids = F.pad(position_ids, (0, padded - count))
        hidden = F.embedding(token_ids, self.embedding)  # (rows, hidden)
        cos, sin = self._rotary_tables(position_ids, hidden.dtype)
        attend = None
        if decode is not None and not bool(decode.mask.all()):
            # Rows of different lengths: an additive mask over the padding, (rows, 1, 1, columns), built once per
            # pass (sdpa gives the same result as with transformers' boolean mask). Without padding transformers
            # passes no mask and lets sdpa group the query heads: the same kernels are used here, so the bits match.
            padding = decode.mask == 0
            attend = torch.zeros(padding.shape, dtype=hidden.dtype).masked_fill_(padding, float("-inf"))[:, None, None]

        head_dim, query_heads, kv_heads, groups = self.head_dim, self.query_heads, self.kv_heads, self.groups
        rotated_heads = query_heads + kv_heads
        for index, layer in enumerate(self.layers):
            norm1, eps1, qkv_weight, o_weight, norm2, eps2, gate_up_weight, intermediate, down_weight = layer
            normed = self._rms_norm(hidden, norm1, eps1)
            qkv = linear_pointwise(normed, qkv_weight).view(padded, rotated_heads + kv_heads, head_dim)
            query_key = qkv[:, :rotated_heads]
            query_key = query_key * cos + query_key.roll(head_dim // 2, dims=-1) * sin
            outputs = []
            if decode is not None:
                key = query_key[:decoding, query_heads:, None, :]  # (rows, kv_heads, 1, head_dim)
                value = qkv[:decoding, rotated_heads:, None, :]
                keys, values = decode.cache.layers[index].update(key, value)
                if attend is None:
                    query = query_key[:decoding, :query_heads, None, :]  # (rows, query_heads, 1, head_dim)
                    out = F.scaled_dot_product_attention(query, keys, values, scale=self.scaling, enable_gqa=True)
                else:
                    query = query_key[:decoding, :query_heads].reshape(decoding, kv_heads, groups, head_dim)
                    out = F.scaled_dot_product_attention(query, keys, values, attn_mask=attend, scale=self.scaling)
                outputs.append(out.reshape(decoding, query_heads * head_dim))
            start = decoding
            for prompt, length, chunk_mask in zip(prompts, lengths, chunk_masks, strict=True):
                part = query_key[start : start + length].transpose(0, 1)[None]  # (1, heads, length, head_dim)
                value = qkv[start : start + length, rotated_heads:].transpose(0, 1)[None]
                keys, values = prompt.cache.layers[index].update(part[:, query_heads:], value)
                out = F.scaled_dot_product_attention(
                    part[:, :query_heads],
                    keys,
                    values,
                    attn_mask=chunk_mask,
                    is_causal=chunk_mask is None,
                    scale=self.scaling,
                    enable_gqa=True,
                )
                outputs.append(out[0].transpose(0, 1).reshape(length, query_heads * head_dim))
                start += length
            if padded > count:
                outputs.append(hidden.new_zeros((padded - count, query_heads * head_dim)))
            attention = outputs[0] if len(outputs) == 1 else torch.cat(outputs)
            hidden = hidden + linear_pointwise(attention, o_weight)
            normed = self._rms_norm(hidden, norm2, eps2)
            gate_up = linear_pointwise(normed, gate_up_weight)
            activated = F.silu(gate_up[:, :intermediate]) * gate_up[:, intermediate:]
            hidden = hidden + linear_pointwise(activated, down_weight)
        if lengths:  # only the decoding rows and each prompt's last token need logits
            last = list(range(decoding)) + [decoding + end - 1 for end in itertools.accumulate(lengths)]
            hidden = hidden[torch.tensor(last, device=hidden.device)]
        logits = linear_pointwise(self._rms_norm(hidden, *self.final_norm), self.lm_head)
        return (logits[:decoding] if decoding else None), (logits[decoding:] if lengths else None)
