"""Four CPU effects behind the engine's speed, each measured in one run against its own baseline.

1. OpenMP teams (`--omp`). torch's CPU kernels run on libgomp, and every thread that ever ran a parallel
   region keeps a team of worker threads. With more OpenMP threads in the process than CPUs, libgomp
   stops spin-waiting between parallel regions ("throttled" spinning), so every region waits for a futex
   wake-up. The model is loaded on one thread; a decoding step (8 rows) is then timed on that same thread
   and on a second thread while the first one's team is still alive -- what the service did before the
   engines loaded the model on their own model thread (LocalEngine.run_on_model_thread).

2. Prepacked linears (`--packed`). Each linear shape of the model, 8 rows, timed with `F.linear` and with
   oneDNN's prepacked kernel (inference/cpu/packed.py), plus a whole decoding step with the model's linears
   packed and unpacked. The weights cycle through several copies so the timings read from memory, as a
   decoding step does, not from the CPU cache.

3. The lean decoder (`--lean`, inference/cpu/lean_forward.py). A decoding step of 1, 8 and 16 left-padded rows with
   transformers' forward and with the lean decoder, and a newcomer joining 8 running rows: a step plus a prefill
   pass (transformers', then lean) vs one lean pass that carries both.

4. The CPU paths (`--paths`, inference/cpu/paths.py). A pass of 1-32 decoding rows, prompt passes of 8-512 tokens
   (one prompt, or eight), and one row over caches of 100-3000 tokens: the native path (one C call over the GGUF's
   blocks, inference/cpu/native_forward.py) vs the lean torch path on the dequantised weights (prepacked, in the
   dtype the CPU_ISA in force gives: bf16 where bf16 matmuls are native, else float32). Run it once per CPU class, e.g.
   `CPU_ISA=avx2 ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 .venv/bin/python bench/cpu_kernels.py --paths`
   for the AVX2 class on a CPU that has more: where docs/cpu-paths.md's choice comes from.

The first three measure the torch paths (GGUF_INT4=false), as they were built.

    .venv/bin/python bench/cpu_kernels.py            # all four
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

from inference.cpu.packed import PackedLinear, is_packed, linear_pointwise, pack_linears, packing_available
from inference.model.loading import LoadedModel, load_model
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


def time_linear(
    out_features: int, in_features: int, repeat: int, rows: int = 8, dtype: torch.dtype = torch.float32
) -> tuple[float, float]:
    """Median ms of F.linear and of the packed kernel for one weight shape, cycling through copies."""
    copies = 24 if out_features * in_features < 10_000_000 else 3
    weights = [torch.randn(out_features, in_features).to(dtype) for _ in range(copies)]
    packed = [torch.ops.mkldnn._reorder_linear_weight(w) for w in weights]
    x = torch.randn(rows, in_features).to(dtype)
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
        dtype = loaded.model.dtype
        print(f"the model's linears in {dtype}")
        shapes = sorted({tuple(m.weight.shape) for m in loaded.model.modules() if type(m) is torch.nn.Linear})
        print(f"{'linear (out x in)':>20}{'F.linear us':>13}{'packed us':>11}{'speed-up':>10}")
        for out_features, in_features in shapes:
            plain, fast = time_linear(out_features, in_features, repeat * 4, dtype=dtype)
            shape = f"{out_features} x {in_features}"
            print(f"{shape:>20}{plain * 1000:>13.0f}{fast * 1000:>11.0f}{plain / fast:>9.2f}x")
        step = decode_step(loaded)
        unpacked = median_ms(step, repeat)
        count = pack_linears(loaded.model, (dtype,))
        assert all(is_packed(m) for m in loaded.model.modules() if isinstance(m, PackedLinear))
        packed_step = median_ms(step, repeat)
        print(
            f"decoding step, 8 rows: F.linear {unpacked:.1f} ms, {count} packed linears {packed_step:.1f} ms, "
            f"{unpacked / packed_step:.2f}x"
        )

    on_thread(run)


def padded_batch(loaded: LoadedModel, rows: int) -> tuple[Any, Any, Any, Any]:
    """`rows` chat prompts of mixed lengths (36-150 tokens), prefilled left-padded as the batched engine does."""
    from inference.engines.batched.kv_cache import new_cache

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
    """transformers' forward vs the lean decoder (inference/cpu/lean_forward.py): a step, and a newcomer joining."""
    from inference.cpu.lean_forward import LeanForward
    from inference.cpu.passes import DecodeRows, PromptRow
    from inference.engines.batched.kv_cache import new_cache

    def run() -> None:
        loaded = load_model(settings)
        model = loaded.model
        if not LeanForward.supports(model):
            print("the lean decoder does not apply to this model (bf16 or float32 Llama on CPU only)")
            return
        decoder = LeanForward(model)

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


def decoding_step(decoder: Any, cache: Any, tokens: Any, positions: Any, mask: Any) -> Callable[[], None]:
    """One lean decoding step over `cache`, rewound after each call so steps repeat."""
    lengths = [layer.keys.shape[-2] for layer in cache.layers]

    def once() -> None:
        with torch.inference_mode():
            decoder.step(tokens, positions, mask, cache)
        for layer, length in zip(cache.layers, lengths, strict=True):  # drop the token just added
            layer.keys, layer.values = layer.keys[:, :, :length], layer.values[:, :, :length]

    return once


def time_pass(executor: Any, decode: Any, prompts: list[Any], repeat: int, config: Any = None) -> float:
    """Median ms of one pass of `executor` (NativeForward or LeanForward), every cache rewound after each call."""
    from inference.engines.batched.kv_cache import new_cache

    caches = [] if decode is None else [decode.cache]
    lengths = [[layer.keys.shape[-2] for layer in cache.layers] for cache in caches]

    def once() -> None:
        for prompt in prompts:
            prompt.cache = new_cache(config)
        with torch.inference_mode():
            executor.forward(decode, prompts)
        for cache, columns in zip(caches, lengths, strict=True):
            for layer, length in zip(cache.layers, columns, strict=True):
                layer.keys, layer.values = layer.keys[:, :, :length], layer.values[:, :, :length]

    return median_ms(once, repeat)


def cpu_paths(settings: Settings, repeat: int) -> None:
    """Per-pass ms of the native path vs the lean torch path (the model's dtype under the CPU_ISA in force).

    Each path is timed in a block of its own, the lean one first: the native library and torch each run their own
    OpenMP runtime, and passes that alternate between the two wait on each other's spinning threads (measured: a
    lean 8-row pass 27 ms alone, 48 ms right after native passes). The service runs one path per model.
    """
    from inference.cpu.lean_forward import LeanForward
    from inference.cpu.native_forward import native_forward_of as native_of
    from inference.cpu.passes import DecodeRows, PromptRow
    from inference.cpu.paths import isa_in_force
    from inference.engines.batched.kv_cache import new_cache

    rows_counts, prompt_shapes, cache_lengths = (1, 2, 4, 8, 16, 32), [], (100, 1000, 3000)
    for count in (8, 32, 64, 128, 256, 512):
        prompt_shapes += [(count, parts) for parts in ((1, 8) if count >= 64 else (1,))]

    def measure(loaded: LoadedModel, executor: Any) -> list[float]:
        config, times = loaded.model.config, []
        for rows in rows_counts:
            cache, tokens, positions, mask = padded_batch(loaded, rows)
            times.append(time_pass(executor, DecodeRows(tokens, positions, mask, cache), [], repeat))
        for count, parts in prompt_shapes:
            ids = [torch.randint(100, 40000, (count // parts,)) for _ in range(parts)]
            times.append(time_pass(executor, None, [PromptRow(i, None) for i in ids], max(3, repeat // 4), config))
        for length in cache_lengths:
            cache = new_cache(config)
            with torch.inference_mode():
                executor.forward(None, [PromptRow(torch.randint(100, 40000, (length,)), cache)])
            mask = torch.ones((1, length + 1), dtype=torch.long)
            decode = DecodeRows(torch.tensor([5]), torch.tensor([length]), mask, cache)
            times.append(time_pass(executor, decode, [], repeat))
        return times

    def run() -> None:
        lean_model = load_model(settings.model_copy(update={"gguf_int4": False}))
        if not LeanForward.supports(lean_model.model):
            print(f"the lean path does not apply here ({lean_model.info.decode_path}): nothing to compare")
            return
        lean = measure(lean_model, LeanForward(lean_model.model))
        served = load_model(settings)
        native_executor = native_of(served.model)
        if native_executor is None:
            print(f"no native path here ({served.info.decode_path}: {served.path})")
            return
        native = measure(served, native_executor)
        print(f"CPU class {isa_in_force(settings.cpu_isa)}, lean path in {lean_model.info.dtype}; ms per pass")
        labels = [f"{rows} decoding rows" for rows in rows_counts]
        labels += [f"{count} prompt tokens" + (f" in {parts}" if parts > 1 else "") for count, parts in prompt_shapes]
        labels += [f"1 row, {length}-token cache" for length in cache_lengths]
        print(f"{'pass':>24} {'native':>8} {'lean':>8}  lean/native")
        for label, mine, theirs in zip(labels, native, lean, strict=True):
            print(f"{label:>24} {mine:8.1f} {theirs:8.1f}  {theirs / mine:5.2f}x")

    on_thread(run)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--omp", action="store_true", help="only the OpenMP-teams measurement")
    parser.add_argument("--packed", action="store_true", help="only the packed-linear measurement")
    parser.add_argument("--lean", action="store_true", help="only the lean-decoder measurement")
    parser.add_argument("--paths", action="store_true", help="only the native vs lean per-pass measurement")
    parser.add_argument("--model-id", default="embedded")
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args(argv)
    settings = Settings(model_id=args.model_id, _env_file=None)  # type: ignore[call-arg]
    torch_paths = settings.model_copy(update={"gguf_int4": False})
    every = not (args.omp or args.packed or args.lean or args.paths)
    if args.omp or every:
        omp_teams(torch_paths, args.repeat)
    if args.packed or every:
        packed_linears(torch_paths, args.repeat)
    if args.lean or every:
        lean_passes(torch_paths, args.repeat)
    if args.paths or every:
        cpu_paths(settings, args.repeat)
    return 0


if __name__ == "__main__":
    sys.exit(main())
