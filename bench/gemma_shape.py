"""Gemma2 models with random weights, in sahabat-ai's exact shape or a tiny one, written like a hub checkpoint.

Used by the Gemma2-path tests (tiny shape, CPU) and by `bench/gpu_shape.py` (full shape, GPU). The
tokenizer is a small byte-level BPE trained on a few sentences, with Gemma's special tokens and the real
Gemma2 chat template; its vocabulary is padded with filler tokens up to the model's `vocab_size`, so every
id a random model can emit decodes to text.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# Gemma's special tokens, in Gemma's id order for the first four (<pad>=0, <eos>=1, <bos>=2, <unk>=3).
PAD, EOS, BOS, UNK = "<pad>", "<eos>", "<bos>", "<unk>"
START_OF_TURN, END_OF_TURN = "<start_of_turn>", "<end_of_turn>"
GEMMA_SPECIAL_TOKENS = (PAD, EOS, BOS, UNK, START_OF_TURN, END_OF_TURN)

# The chat template of google/gemma-2-9b-it (sahabat-ai's instruct model uses the same one): no system
# role, strictly alternating user/assistant turns, assistant rendered as `model`.
GEMMA2_CHAT_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)

TRAINING_SENTENCES = (
    "Apa ibu kota Indonesia? Ibu kota Indonesia adalah Jakarta.",
    "Sebutkan tiga pulau besar di Indonesia: Jawa, Sumatra dan Kalimantan.",
    "Punakawan minangka karakter ing wayang Jawa: Semar, Gareng, Petruk lan Bagong.",
    "Kumaha damang? Abdi nuju diajar basa Sunda di Bandung.",
    "Tolong jelaskan cara membuat nasi goreng yang enak dan sederhana.",
    "The quick brown fox jumps over the lazy dog, then answers the user's question.",
    "You are a friendly assistant who answers in the user's language.",
    "Terima kasih banyak atas bantuannya, sampai jumpa lagi besok pagi.",
)
BASE_VOCAB_SIZE = 400  # the trained part: 256 byte symbols + specials + merges

# sahabat-ai v1 instruct (GoToCompany/gemma2-9b-cpt-sahabatai-v1-instruct) = Gemma2-9B's architecture.
SAHABAT_AI_SHAPE: dict[str, Any] = {
    "vocab_size": 256000,
    "hidden_size": 3584,
    "intermediate_size": 14336,
    "num_hidden_layers": 42,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "head_dim": 256,
    "query_pre_attn_scalar": 256,
    "max_position_embeddings": 8192,
    "sliding_window": 4096,
    "attn_logit_softcapping": 50.0,
    "final_logit_softcapping": 30.0,
    "hidden_activation": "gelu_pytorch_tanh",
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "tie_word_embeddings": True,
}

TINY_SHAPE: dict[str, Any] = {
    **SAHABAT_AI_SHAPE,
    "vocab_size": 512,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "query_pre_attn_scalar": 16,
    "max_position_embeddings": 256,
    "sliding_window": 16,
}


def gemma2_config(shape: dict[str, Any], **overrides: Any) -> Any:
    """A Gemma2Config of `shape` with Gemma's special-token ids."""
    from transformers import Gemma2Config

    values = {**shape, **overrides}
    return Gemma2Config(pad_token_id=0, eos_token_id=1, bos_token_id=2, **values)


def filler_token(index: int) -> str:
    # Byte-level symbols only; "Ġ" is the byte-level space, so each filler decodes to "w<index> ".
    return f"w{index}Ġ"


def build_tokenizer(vocab_size: int = TINY_SHAPE["vocab_size"]) -> Any:
    """A Gemma-style fast tokenizer with exactly `vocab_size` ids (<pad>=0, <eos>=1, <bos>=2, <unk>=3)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < BASE_VOCAB_SIZE:
        raise ValueError(f"vocab_size must be at least {BASE_VOCAB_SIZE}")
    tokenizer = Tokenizer(models.BPE(unk_token=UNK))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BASE_VOCAB_SIZE,
        special_tokens=list(GEMMA_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(TRAINING_SENTENCES, trainer)
    data = json.loads(tokenizer.to_str())
    vocab: dict[str, int] = data["model"]["vocab"]
    index = 0
    while len(vocab) < vocab_size:
        token = filler_token(index)
        if token not in vocab:
            vocab[token] = len(vocab)
        index += 1
    tokenizer = Tokenizer.from_str(json.dumps(data))
    bos_id = tokenizer.token_to_id(BOS)
    # Like Gemma's tokenizer: plain encoding (add_special_tokens=True) starts with <bos>.
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, bos_id)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        extra_special_tokens=[START_OF_TURN, END_OF_TURN],
        model_max_length=8192,
    )
    fast.chat_template = GEMMA2_CHAT_TEMPLATE
    assert len(fast) == vocab_size, (len(fast), vocab_size)
    return fast


def build_random_model(config: Any, *, device: str = "cpu", dtype: Any = None, seed: int = 0) -> Any:
    """A Gemma2ForCausalLM of `config` with random weights, created directly on `device` in `dtype`.

    Creating it on the GPU in bf16 keeps the full 9B shape out of host RAM (fp32 on CPU would be 37 GB)
    and makes the random init (normal_, std = initializer_range) take seconds.
    """
    import torch
    from transformers import Gemma2ForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        model = Gemma2ForCausalLM._from_config(config, dtype=dtype or torch.float32)
    return model.eval()


def write_model_dir(
    directory: str | Path,
    config: Any,
    *,
    device: str = "cpu",
    dtype: Any = None,
    seed: int = 0,
    max_shard_size: str = "4GB",
    model: Any = None,
) -> Path:
    """Write a random (or the given) Gemma2 model as safetensors + its tokenizer to `directory`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if model is None:
        model = build_random_model(config, device=device, dtype=dtype, seed=seed)
    # sahabat-ai's generation_config.json (written by transformers 4.43) asks for the static "hybrid" cache;
    # keep that, so the service meets the same generation defaults as with the real checkpoint.
    model.generation_config.cache_implementation = "hybrid"
    model.save_pretrained(directory, max_shard_size=max_shard_size, safe_serialization=True)
    build_tokenizer(config.vocab_size).save_pretrained(directory)
    return directory


def parameter_count(config: Any) -> dict[str, int]:
    """Parameters of a Gemma2 config, split into embeddings, linear layers and norms (tied lm_head counted once)."""
    hidden, heads, kv, head_dim = (
        config.hidden_size,
        config.num_attention_heads,
        config.num_key_value_heads,
        config.head_dim,
    )
    attention = hidden * heads * head_dim * 2 + hidden * kv * head_dim * 2  # q, o and k, v
    mlp = 3 * hidden * config.intermediate_size  # gate, up, down
    norms_per_layer = 4 * hidden
    embeddings = config.vocab_size * hidden
    linear = config.num_hidden_layers * (attention + mlp)
    norms = config.num_hidden_layers * norms_per_layer + hidden
    if not config.tie_word_embeddings:
        linear += embeddings  # a separate lm_head
    return {"embeddings": embeddings, "linear": linear, "norms": norms, "total": embeddings + linear + norms}


def weight_bytes(config: Any, quantization: str) -> int:
    """Bytes of weights on the GPU: bitsandbytes quantizes the decoder's Linear layers; embeddings and norms stay bf16.

    8bit: 1 byte per weight + one fp32 scale per output row. 4bit (nf4): 0.5 byte + one fp32 absmax per 64
    weights (before double quantization). none: 2 bytes (bf16) per weight.
    """
    counts = parameter_count(config)
    kept_bf16 = 2 * (counts["embeddings"] + counts["norms"])
    if quantization == "none":
        return kept_bf16 + 2 * counts["linear"]
    rows_per_layer = (
        config.num_attention_heads * config.head_dim  # q_proj out
        + 2 * config.num_key_value_heads * config.head_dim  # k_proj, v_proj out
        + config.hidden_size  # o_proj out
        + 2 * config.intermediate_size  # gate, up out
        + config.hidden_size  # down out
    )
    if quantization == "8bit":
        return kept_bf16 + counts["linear"] + 4 * rows_per_layer * config.num_hidden_layers
    if quantization == "4bit":
        return kept_bf16 + counts["linear"] // 2 + 4 * (counts["linear"] // 64)
    raise ValueError(f"unknown quantization {quantization!r}")


def kv_cache_bytes_per_token(config: Any, dtype_bytes: int = 2) -> int:
    """K and V of every layer for one token (before the sliding-window layers stop growing)."""
    return 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * dtype_bytes


def kv_cache_bytes(config: Any, tokens: int, dtype_bytes: int = 2) -> int:
    """K/V bytes for `tokens` tokens: Gemma2 alternates sliding-window (even) and global (odd) layers."""
    per_layer_token = 2 * config.num_key_value_heads * config.head_dim * dtype_bytes
    layer_types = getattr(config, "layer_types", None) or [
        "sliding_attention" if i % 2 == 0 else "full_attention" for i in range(config.num_hidden_layers)
    ]
    total = 0
    for layer_type in layer_types:
        kept = min(tokens, config.sliding_window) if layer_type == "sliding_attention" else tokens
        total += per_layer_token * kept
    return total


def eager_attention_peak_bytes(config: Any, tokens: int, batch: int = 1) -> int:
    """Transient bytes of one layer's attention scores during a prefill of `tokens` with eager attention.

    Gemma2 cannot use SDPA (no soft-capping there), so without flash-attention transformers runs the eager
    path: bf16 scores [batch, heads, tokens, tokens], softmax in fp32, cast back to bf16, all alive at once
    (2 + 4 + 2 bytes per score). Sliding-window layers still materialise the full square.
    """
    return 8 * batch * config.num_attention_heads * tokens * tokens
