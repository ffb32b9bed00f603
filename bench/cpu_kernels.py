"""Five CPU effects behind the engine's speed, each measured in one run against its own baseline.

1. OpenMP teams (`--omp`). torch's CPU kernels run on libgomp, and every thread that ever ran a parallel
   region keeps a team of worker threads. With more OpenMP threads in the process than CPUs, libgomp
   stops spin-waiting between parallel regions ("throttled" spinning), so every region waits for a futex
   wake-up. The model is loaded on one thread; a decoding step (8 rows) is then timed on that same thread
   and on a second thread while the first one's team is still alive -- what the service did before the
   engines loaded the model on their own model thread (LocalEngine.run_on_model_thread).

2. Prepacked linears (`--packed`). Each linear shape of the model, 8 rows, timed with `F.linear` and with
   oneDNN's prepacked kernel (inference/cpu_kernels.py), plus a whole decoding step with the model's linears
   packed and unpacked. The weights cycle through several copies so the timings read from memory, as a
   decoding step does, not from the CPU cache.

3. The lean decoder (`--lean`, inference/fast_decode.py). A decoding step of 1, 8 and 16 left-padded rows with
   transformers' forward and with the lean decoder, and a newcomer joining 8 running rows: a step plus a prefill
   pass (transformers', then lean) vs one lean pass that carries both.

4. int4 copies (`--int4`, inference/gguf_int4.py). Each linear shape of the model at 1-16 rows, oneDNN's
   prepacked bf16 kernel vs torch's CPU int4 kernel (`_weight_int4pack_mm_for_cpu`, groups of 32 as the
   GGUF's Q4_1 blocks), and a lean decoding step of 1-16 rows with bf16 weights everywhere vs the served rule
   (int4 below INT4_BELOW_ROWS rows): where the threshold comes from.

5. The native step (`--native`, inference/native_step.py). A decoding pass of 1-32 left-padded rows as one native
   call vs the lean decoder with torch's int4 copies (NATIVE_DECODE=false) and with bf16 weights everywhere, and a
   1-row pass over caches of 100-3000 tokens (attention grows with them).

The first three measure the bf16 paths (GGUF_INT4=false), as they were built; `--int4` the torch int4 path.

    .venv/bin/python bench/cpu_kernels.py            # all five
    .venv/bin/python bench/cpu_kernels.py --packed   # only the second

Numbers depend on the machine and on what else runs on it: compare the ratios, within one run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch.nn.functional as F

from inference.cpu_kernels import PackedLinear, is_packed, linear_pointwise, pack_linears, packing_available
from inference.loading import LoadedModel, load_model
from webapp.settings import Settings


def median_ms(work: Callable[[], Any], repeat: int) -> float:
    work()
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        work()
        times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times)


def decode_step(loaded: LoadedModel, rows: int = 8) -> Callable[[], Any]:
    """One decoding step of `rows` rows over a ~100-token cache (the cache is rebuilt, so steps repeat)."""
    from transformers import DynamicCache

    model, tokenizer = loaded.model, loaded.tokenizer
    prompt = tokenizer.encode("Jelaskan apa itu fotosintesis dengan bahasa yang mudah dipahami. " * 6)[:100]
    ids = torch.tensor([prompt] * rows)
    with torch.inference_mode():
        cache = DynamicCache(config=model.config)
        model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)
    next_ids = ids[:, -1:]
    lengths = [layer.keys.shape[-2] for layer in cache.layers]

    def step() -> None:
        with torch.inference_mode():
            model(input_ids=next_ids, cache=cache, use_cache=True)
            for layer, length in zip(cache.layers, lengths, strict=True):  # drop the token just added
                layer.keys, layer.values = layer.keys[:, :, :length], layer.values[:, :, :length]

    return step


def on_thread(work: Callable[[], Any]) -> Any:
    result: list[Any] = []
    thread = threading.Thread(target=lambda: result.append(work()))
    thread.start()
    thread.join()
    return result[0]


def omp_teams(settings: Settings, repeat: int) -> None:
    def loading_thread() -> None:
        loaded = load_model(settings)
        step = decode_step(loaded)
        same = median_ms(step, repeat)
        other = on_thread(lambda: median_ms(step, repeat))
        print(f"decoding step, 8 rows, on the thread that loaded the model: {same:6.1f} ms")
        print(f"the same step on a second thread (two OpenMP teams alive):   {other:6.1f} ms")
        print(f"second thread / loading thread: {other / same:.2f}x")

    on_thread(loading_thread)


def time_linear(out_features: int, in_features: int, repeat: int, rows: int = 8) -> tuple[float, float]:
    """Median ms of F.linear and of the packed kernel for one weight shape, cycling through copies."""
    copies = 24 if out_features * in_features < 10_000_000 else 3
    weights = [torch.randn(out_features, in_features).to(torch.bfloat16) for _ in range(copies)]
    packed = [torch.ops.mkldnn._reorder_linear_weight(w) for w in weights]
    x = torch.randn(rows, in_features).to(torch.bfloat16)
    index = iter(range(10**9))
    with torch.inference_mode():
        plain = median_ms(lambda: F.linear(x, weights[next(index) % copies]), repeat)
        fast = median_ms(lambda: linear_pointwise(x, packed[next(index) % copies]), repeat)
    return plain, fast


def packed_linears(settings: Settings, repeat: int) -> None:
    if not packing_available():
        print("this torch build has no oneDNN linear packing")
        return

    def run() -> None:
        loaded = load_model(settings.model_copy(update={"pack_cpu_weights": False}))
        if loaded.model.dtype != torch.bfloat16:
            print(f"the model runs in {loaded.model.dtype}: packing applies to bf16 only")
            return
        shapes = sorted({tuple(m.weight.shape) for m in loaded.model.modules() if type(m) is torch.nn.Linear})
        print(f"{'linear (out x in)':>20}{'F.linear us':>13}{'packed us':>11}{'speed-up':>10}")
        for out_features, in_features in shapes:
            plain, fast = time_linear(out_features, in_features, repeat * 4)
            shape = f"{out_features} x {in_features}"
            print(f"{shape:>20}{plain * 1000:>13.0f}{fast * 1000:>11.0f}{plain / fast:>9.2f}x")
        step = decode_step(loaded)
        unpacked = median_ms(step, repeat)
        count = pack_linears(loaded.model)
        assert all(is_packed(m) for m in loaded.model.modules() if isinstance(m, PackedLinear))
        packed_step = median_ms(step, repeat)
        print(
            f"decoding step, 8 rows: F.linear {unpacked:.1f} ms, {count} packed linears {packed_step:.1f} ms, "
            f"{unpacked / packed_step:.2f}x"
        )

    on_thread(run)


def padded_batch(loaded: LoadedModel, rows: int) -> tuple[Any, Any, Any, Any]:
    """`rows` chat prompts of mixed lengths (36-150 tokens), prefilled left-padded as the batched engine does."""
    from inference.kv_cache import new_cache

    texts = ["Apa ibu kota Indonesia?", "Jelaskan apa itu fotosintesis dengan bahasa yang mudah dipahami. " * 4]
    texts += ["Write a short story about a cat who lives in Jakarta and loves to eat fish.", "Halo! Apa kabar?"]
    tokenizer = loaded.tokenizer
    chats = [[{"role": "user", "content": texts[i % 4]}] for i in range(rows)]
    prompts = [tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) for chat in chats]
    encoded = [tokenizer.encode(prompt, add_special_tokens=False) for prompt in prompts]
    longest = max(map(len, encoded))
    ids = torch.zeros((rows, longest), dtype=torch.long)
    mask = torch.zeros((rows, longest), dtype=torch.long)
    positions = torch.zeros((rows, longest), dtype=torch.long)
    for row, tokens in enumerate(encoded):
        ids[row, longest - len(tokens) :] = torch.tensor(tokens)
        mask[row, longest - len(tokens) :] = 1
        positions[row, longest - len(tokens) :] = torch.arange(len(tokens))
    cache = new_cache(loaded.model.config)
    with torch.inference_mode():
        logits = loaded.model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache).logits
    mask = torch.cat([mask, mask.new_ones((rows, 1))], dim=1)
    return cache, logits[:, -1].argmax(-1), mask.sum(1) - 1, mask


def lean_passes(settings: Settings, repeat: int) -> None:
    """transformers' forward vs the lean decoder (inference/fast_decode.py): a step, and a newcomer joining."""
    from inference.fast_decode import DecodeRows, LlamaDecoder, PromptRow
    from inference.kv_cache import new_cache

    def run() -> None:
        loaded = load_model(settings)
        model = loaded.model
        if not LlamaDecoder.supports(model):
            print("the lean decoder does not apply to this model (bf16 Llama on CPU only)")
            return
        decoder = LlamaDecoder(model)

        def rewinding(work: Callable[[], Any], cache: Any) -> Callable[[], None]:
            lengths = [layer.keys.shape[-2] for layer in cache.layers]

            def once() -> None:
                with torch.inference_mode():
                    work()
                for layer, length in zip(cache.layers, lengths, strict=True):  # drop the token just added
                    layer.keys, layer.values = layer.keys[:, :, :length], layer.values[:, :, :length]

            return once

        def compare_step(rows: int) -> None:
            cache, tokens, positions, mask = padded_batch(loaded, rows)

            def hf_step() -> None:
                model(input_ids=tokens[:, None], attention_mask=mask, position_ids=positions[:, None], cache=cache)

            hf = median_ms(rewinding(hf_step, cache), repeat)
            lean = median_ms(rewinding(lambda: decoder.step(tokens, positions, mask, cache), cache), repeat)
            print(f"decoding step, {rows:2d} rows: transformers {hf:6.1f} ms, lean {lean:6.1f} ms, {hf / lean:.2f}x")

        for rows in (1, 8, 16):
            compare_step(rows)

        cache, tokens, positions, mask = padded_batch(loaded, 8)
        prompt = torch.tensor(loaded.tokenizer.encode("Sebutkan tiga pulau besar di Indonesia beserta ibu kotanya."))

        def apart() -> None:
            decoder.step(tokens, positions, mask, cache)
            decoder.forward(None, [PromptRow(prompt, new_cache(model.config))])

        def hf_apart() -> None:
            model(input_ids=tokens[:, None], attention_mask=mask, position_ids=positions[:, None], cache=cache)
            model(input_ids=prompt[None], cache=new_cache(model.config), logits_to_keep=1)

        def mixed() -> None:
            decoder.forward(DecodeRows(tokens, positions, mask, cache), [PromptRow(prompt, new_cache(model.config))])

        times = {
            name: median_ms(rewinding(work, cache), repeat)
            for name, work in [("hf", hf_apart), ("apart", apart), ("mixed", mixed)]
        }
        print(
            f"a {len(prompt)}-token prompt joining 8 rows: transformers step + prefill {times['hf']:.1f} ms, "
            f"lean step + prefill {times['apart']:.1f} ms, one lean pass {times['mixed']:.1f} ms "
            f"({times['hf'] / times['mixed']:.2f}x, {times['apart'] / times['mixed']:.2f}x)"
        )

    on_thread(run)


def time_int4(out_features: int, in_features: int, rows: int, repeat: int) -> tuple[float, float]:
    """Median ms of the prepacked bf16 kernel and of the int4 kernel for one weight shape, cycling through copies."""
    from inference.cpu_kernels import INT4_GROUP, Int4Weight

    copies = 3 if out_features * in_features > 10_000_000 else 24
    bf16 = [
        torch.ops.mkldnn._reorder_linear_weight(torch.randn(out_features, in_features).to(torch.bfloat16))
        for _ in range(copies)
    ]
    int4 = [
        Int4Weight(
            torch.ops.aten._convert_weight_to_int4pack_for_cpu(
                torch.randint(0, 16, (out_features, in_features), dtype=torch.int32), 1
            ),
            torch.randn(in_features // INT4_GROUP, out_features, 2).to(torch.bfloat16),
        )
        for _ in range(copies)
    ]
    x = torch.randn(rows, in_features).to(torch.bfloat16)
    index = iter(range(10**9))
    with torch.inference_mode():
        dense = median_ms(lambda: linear_pointwise(x, bf16[next(index) % copies]), repeat)
        small = median_ms(lambda: int4[next(index) % copies].mm(x), repeat)
    return dense, small


def decoding_step(decoder: Any, cache: Any, tokens: Any, positions: Any, mask: Any) -> Callable[[], None]:
    """One lean decoding step over `cache`, rewound after each call so steps repeat."""
    lengths = [layer.keys.shape[-2] for layer in cache.layers]

    def once() -> None:
        with torch.inference_mode():
            decoder.step(tokens, positions, mask, cache)
        for layer, length in zip(cache.layers, lengths, strict=True):  # drop the token just added
            layer.keys, layer.values = layer.keys[:, :, :length], layer.values[:, :, :length]

    return once


def int4_copies(settings: Settings, repeat: int) -> None:
    from inference.cpu_kernels import INT4_BELOW_ROWS, int4_available
    from inference.fast_decode import LlamaDecoder

    if not int4_available():
        print("this torch build has no CPU int4 kernel")
        return

    def run() -> None:
        loaded = load_model(settings)
        shapes = sorted({tuple(m.weight.shape) for m in loaded.model.modules() if isinstance(m, torch.nn.Linear)})
        counts = (1, 2, 4, 6, 8, 12, 16)
        print("us per matmul, bf16 prepacked / int4, by rows")
        print(f"{'linear (out x in)':>20}" + "".join(f"{rows:>13}" for rows in counts))
        for out_features, in_features in shapes:
            cells = [time_int4(out_features, in_features, rows, repeat * 4) for rows in counts]
            line = "".join(f"{dense * 1000:>7.0f} /{small * 1000:>4.0f}" for dense, small in cells)
            print(f"{f'{out_features} x {in_features}':>20}{line}")
        if not LlamaDecoder.supports(loaded.model):
            return
        bf16, served = LlamaDecoder(loaded.model, int4=False), LlamaDecoder(loaded.model)
        print(f"lean decoding step (int4 below {INT4_BELOW_ROWS} rows): ms bf16 everywhere / served")
        for rows in (1, 2, 4, 6, 8):
            batch = padded_batch(loaded, rows)
            dense = median_ms(decoding_step(bf16, *batch), repeat)
            small = median_ms(decoding_step(served, *batch), repeat)
            print(f"{rows:>3} rows: {dense:6.1f} / {small:6.1f} ms ({dense / small:.2f}x)")

    on_thread(run)


def native_step(settings: Settings, repeat: int) -> None:
    from inference.fast_decode import LlamaDecoder, PromptRow
    from inference.kv_cache import new_cache
    from inference.native_step import native_step as native_of

    def run() -> None:
        served = load_model(settings)
        native = native_of(served.model)
        if native is None:
            print("no native step here (no C compiler, not x86-64 with AVX2, or not the embedded bf16 model)")
            return
        torch_int4 = load_model(settings.model_copy(update={"native_decode": False}))
        steps = {
            "native": LlamaDecoder(served.model),
            "torch int4": LlamaDecoder(torch_int4.model),
            "bf16": LlamaDecoder(served.model, int4=False),
        }
        print("decoding pass, ms: " + " / ".join(steps))
        for rows in (1, 2, 4, 8, 16, 32):
            batch = padded_batch(served, rows)
            times = [median_ms(decoding_step(decoder, *batch), repeat) for decoder in steps.values()]
            cells = " / ".join(f"{t:6.1f}" for t in times)
            print(f"{rows:>3} rows: {cells}  (torch int4 / native {times[1] / times[0]:.2f}x)")
        bf16 = LlamaDecoder(served.model, int4=False)
        print("1 row over a long cache, ms: native / bf16")
        for length in (100, 1000, 3000):
            ids = torch.randint(100, 40000, (length,))
            cache = new_cache(served.model.config)
            with torch.inference_mode():
                bf16.forward(None, [PromptRow(ids, cache)])
            tokens, positions = torch.tensor([5]), torch.tensor([length])
            mask = torch.ones((1, length + 1), dtype=torch.long)
            decoders = (LlamaDecoder(served.model), bf16)
            times = [median_ms(decoding_step(d, cache, tokens, positions, mask), repeat) for d in decoders]
            print(f"{length:>5} tokens: {times[0]:6.1f} / {times[1]:6.1f}")

    on_thread(run)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--omp", action="store_true", help="only the OpenMP-teams measurement")
    parser.add_argument("--packed", action="store_true", help="only the packed-linear measurement")
    parser.add_argument("--lean", action="store_true", help="only the lean-decoder measurement")
    parser.add_argument("--int4", action="store_true", help="only the int4-copies measurement")
    parser.add_argument("--native", action="store_true", help="only the native-step measurement")
    parser.add_argument("--model-id", default="embedded")
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args(argv)
    settings = Settings(model_id=args.model_id, _env_file=None)  # type: ignore[call-arg]
    bf16 = settings.model_copy(update={"gguf_int4": False})
    every = not (args.omp or args.packed or args.lean or args.int4 or args.native)
    if args.omp or every:
        omp_teams(bf16, args.repeat)
    if args.packed or every:
        packed_linears(bf16, args.repeat)
    if args.lean or every:
        lean_passes(bf16, args.repeat)
    if args.int4 or every:
        int4_copies(settings.model_copy(update={"native_decode": False}), args.repeat)
    if args.native or every:
        native_step(settings, args.repeat)
    return 0


if __name__ == "__main__":
    sys.exit(main())
