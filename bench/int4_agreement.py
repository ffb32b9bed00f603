"""How close the embedded model's 4-bit path (the GGUF's own Q4_1 blocks, GGUF_INT4) is to its dequantised weights.

Two copies of the embedded model are loaded: the served one (every pass on the native path,
inference/cpu/native_forward.py, where it can be built) and one with GGUF_INT4=false (the dequantised weights,
prepacked, in the dtype the CPU runs: bf16 where bf16 matmuls are native, else float32). On every benchmark prompt (chat
template, as the service sends it):

- greedy replies: `generate` (the sequential engine's loop) on each copy, MAX_TOKENS tokens; how many replies are
  identical, and how many tokens the two replies share before they first differ;
- per-token logits, teacher-forced along the bf16 reply, one token per pass (so the int4 copy decodes in int4, as
  a lone request does): how often the two copies' top token agrees, the mean KL(bf16 || int4) of the next-token
  distributions, and the largest logit difference.

Neither copy is "the truth": bf16 rounds each dequantised weight, the native path keeps the published blocks exactly
but quantises the activations to 8 bits (llama.cpp's arithmetic). Agreement says how much serving either changes the
replies.

    .venv/bin/python bench/int4_agreement.py --max-tokens 64
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from bench.loadgen import DEFAULT_PROMPTS, load_prompts
from inference.model.loading import load_model
from webapp.settings import Settings


def chat_ids(tokenizer: Any, text: str) -> torch.Tensor:
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
    )
    return torch.tensor([tokenizer.encode(prompt, add_special_tokens=False)])


def greedy(model: Any, ids: torch.Tensor, max_tokens: int) -> list[int]:
    output = model.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens, do_sample=False
    )
    return output[0, ids.shape[1] :].tolist()


def stepwise_logits(model: Any, ids: torch.Tensor, reply: list[int]) -> torch.Tensor:
    """(len(reply), vocab) float32: the next-token logits before each reply token, one token per pass."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    logits = [model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1).logits[0, -1].float()]
    for token in reply[:-1]:
        step = model(input_ids=torch.tensor([[token]]), cache=cache, use_cache=True).logits[0, -1].float()
        logits.append(step)
    return torch.stack(logits)


def common_prefix(a: list[int], b: list[int]) -> int:
    for index, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return index
    return min(len(a), len(b))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--prompts", type=Path, default=DEFAULT_PROMPTS)
    args = parser.parse_args(argv)
    base = Settings(_env_file=None)  # type: ignore[call-arg]
    served = load_model(base)
    int4, tokenizer = served.model, served.tokenizer
    bf16 = load_model(base.model_copy(update={"gguf_int4": False})).model  # the dequantised weights (maybe float32)
    if served.info.decode_path != "native":
        print(f"no native path here ({served.path}): both copies run the dequantised weights")
        return 0
    same, prefixes, lengths, agree, kls, worst, tokens = 0, [], [], 0, [], 0.0, 0
    with torch.inference_mode():
        for prompt in load_prompts(args.prompts):
            ids = chat_ids(tokenizer, prompt.text)
            reference, candidate = greedy(bf16, ids, args.max_tokens), greedy(int4, ids, args.max_tokens)
            same += reference == candidate
            prefixes.append(common_prefix(reference, candidate))
            lengths.append(len(reference))
            exact, approx = stepwise_logits(bf16, ids, reference), stepwise_logits(int4, ids, reference)
            agree += int((exact.argmax(-1) == approx.argmax(-1)).sum())
            log_p, log_q = exact.log_softmax(-1), approx.log_softmax(-1)
            kls += (log_p.exp() * (log_p - log_q)).sum(-1).tolist()
            worst = max(worst, float((exact - approx).abs().max()))
            tokens += len(reference)
    count = len(prefixes)
    print(
        f"int4 (GGUF Q4_1 blocks, native) vs {str(bf16.dtype).removeprefix('torch.')} (dequantised), {count} "
        f"benchmark prompts, greedy, {args.max_tokens} tokens:"
    )
    print(f"  identical greedy replies: {same}/{count}")
    print(
        f"  tokens before the replies first differ: median {statistics.median(prefixes):.0f}, "
        f"min {min(prefixes)} (replies of {min(lengths)}-{max(lengths)} tokens)"
    )
    print(
        f"  per-token logits along the bf16 replies ({tokens} tokens): top-1 agreement {agree / tokens:.1%}, "
        f"mean KL(bf16 || int4) {statistics.fmean(kls):.4f} nats, max |logit difference| {worst:.2f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
