"""sahabat-ai's deployment shape on a GPU, measured: Gemma2-9B architecture, random weights, 8-bit vs bf16.

The hub is out of reach, so this builds a model with sahabat-ai's exact architecture (Gemma2: hidden 3584,
42 layers, 16 heads / 8 KV heads, head dim 256, intermediate 14336, vocab 256000, sliding window 4096,
context 8192, soft-capping 50/30) and random weights, writes it as safetensors to a local directory, and
loads that directory through the service's own loader (`inference.model.loading.load_model`) with
QUANTIZATION=8bit and QUANTIZATION=none (bf16), `device_map="auto"`. For each it reports load time, GPU
memory after load and at peak during generation (prompts of 512 and 4096 tokens), single-stream TTFT and
decode tok/s, and aggregate tok/s at 8 concurrent requests, side by side, as a markdown table.

    python bench/gpu_shape.py                      # on a CUDA machine (builds ~18.5 GB of weights once)
    python bench/gpu_shape.py --fill docs/gpu-memory.md   # also writes the table between the markers there
    python bench/gpu_shape.py --tiny               # the same steps end to end on CPU, tiny config (a test runs it)

Without CUDA the GPU memory figures are skipped with a line saying so (bitsandbytes runs on CPU too; the
full shape on CPU is bench/cpu_shape.py's job).
Random weights make the timings and memory representative (same shapes, same kernels) but the text is noise.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as `python bench/gpu_shape.py`
    sys.path.insert(0, str(ROOT))

from bench.gemma_shape import (  # noqa: E402
    SAHABAT_AI_SHAPE,
    TINY_SHAPE,
    TRAINING_SENTENCES,
    eager_attention_peak_bytes,
    gemma2_config,
    kv_cache_bytes,
    parameter_count,
    weight_bytes,
    write_model_dir,
)

MODES = ("8bit", "none")
MODE_LABELS = {
    "8bit": "8-bit (QUANTIZATION=8bit)",
    "4bit": "4-bit nf4 (QUANTIZATION=4bit)",
    "none": "bf16 (QUANTIZATION=none)",
}
TABLE_BEGIN, TABLE_END = "<!-- gpu-shape:begin -->", "<!-- gpu-shape:end -->"
COMPLETE_MARKER = ".complete"
GB = 1e9


@dataclass
class Plan:
    tiny: bool
    model_dir: Path
    prompt_lengths: tuple[int, ...]
    new_tokens: int
    concurrency: int
    concurrent_prompt: int
    modes: tuple[str, ...]
    shape: dict[str, Any] = field(default_factory=dict)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny Gemma2 config, runs on CPU in seconds")
    parser.add_argument("--model-dir", type=Path, help="where the random model is written (reused if complete)")
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated QUANTIZATION values")
    parser.add_argument("--prompt-lengths", help="comma-separated prompt lengths in tokens (default 512,4096)")
    parser.add_argument("--new-tokens", type=int, help="tokens generated per request (default 128)")
    parser.add_argument("--concurrency", type=int, default=8, help="concurrent requests for the aggregate figure")
    parser.add_argument("--build-only", action="store_true", help="write the model directory and stop")
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    parser.add_argument("--fill", type=Path, help=f"replace the text between {TABLE_BEGIN} and {TABLE_END} here")
    return parser.parse_args(argv)


def make_plan(args: argparse.Namespace) -> Plan:
    tiny = bool(args.tiny)
    default_dir = ROOT / "bench" / "_build" / ("gemma2-tiny-random" if tiny else "gemma2-9b-shape-random")
    lengths = args.prompt_lengths or ("32,128" if tiny else "512,4096")
    prompt_lengths = tuple(int(x) for x in lengths.split(","))
    return Plan(
        tiny=tiny,
        model_dir=args.model_dir or default_dir,
        prompt_lengths=prompt_lengths,
        new_tokens=args.new_tokens or (4 if tiny else 128),
        concurrency=args.concurrency,
        concurrent_prompt=prompt_lengths[0],
        modes=tuple(m.strip() for m in args.modes.split(",") if m.strip()),
        shape=TINY_SHAPE if tiny else SAHABAT_AI_SHAPE,
    )


# --- GPU helpers (all no-ops without CUDA) ----------------------------------------------------------


def has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def free_memory() -> None:
    import torch

    if torch.cuda.is_available():  # only GPU memory is measured; a CPU run skips the (slow) collection
        gc.collect()
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def reset_peak() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def allocated_gb() -> float | None:
    import torch

    return torch.cuda.memory_allocated() / GB if torch.cuda.is_available() else None


def peak_gb() -> float | None:
    import torch

    if not torch.cuda.is_available():
        return None
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / GB


def device_used_gb() -> float | None:
    """What nvidia-smi shows for the device: torch's cache, the CUDA context and everything else."""
    import torch

    if not torch.cuda.is_available():
        return None
    free, total = torch.cuda.mem_get_info()
    return (total - free) / GB


def reset_peak_rss() -> None:
    """Linux: writing 5 to clear_refs resets the process's peak RSS (VmHWM), so each mode gets its own peak."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def peak_rss_gb() -> float | None:
    """Host RAM high-water mark of this process (VmHWM), in GB; None where /proc is not there."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / GB
    except OSError:
        return None
    return None


# --- the model directory ------------------------------------------------------------------------------


def ensure_model_dir(plan: Plan, cuda: bool) -> float:
    """Write the random model unless a complete one of the same shape is there. Returns seconds spent."""
    import torch

    config = gemma2_config(plan.shape)
    marker = plan.model_dir / COMPLETE_MARKER
    if marker.is_file() and json.loads(marker.read_text()) == plan.shape:
        print(f"reusing the random model in {plan.model_dir}")
        return 0.0
    device = "cuda" if cuda else "cpu"
    print(
        f"writing a random Gemma2 ({count(parameter_count(config)['total'])} parameters, bf16, built on {device}) "
        f"to {plan.model_dir} ..."
    )
    started = time.perf_counter()
    marker.unlink(missing_ok=True)
    write_model_dir(plan.model_dir, config, device=device, dtype=torch.bfloat16, seed=0)
    marker.write_text(json.dumps(plan.shape))
    free_memory()
    return time.perf_counter() - started


# --- requests -------------------------------------------------------------------------------------------


def messages_of(text: str) -> tuple[Any, ...]:
    from inference.types import Message

    return (Message("user", text),)


def prompt_of_length(engine: Any, target: int, salt: str) -> tuple[Any, ...]:
    """Messages whose templated prompt is as close to `target` tokens as possible (never above)."""
    tokenizer, builder = engine.tokenizer, engine.prompt_builder
    corpus = " ".join(TRAINING_SENTENCES)
    text = f"{salt} {corpus}"
    while len(tokenizer(text, add_special_tokens=False)["input_ids"]) < target:
        text = f"{text} {corpus}"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    low, high = 1, min(len(ids), target)
    while low < high:  # the largest content prefix whose prompt fits in `target`
        middle = (low + high + 1) // 2
        if len(builder.build(messages_of(tokenizer.decode(ids[:middle])))) <= target:
            low = middle
        else:
            high = middle - 1
    return messages_of(tokenizer.decode(ids[:low]))


def request_of(messages: tuple[Any, ...], new_tokens: int) -> Any:
    from inference.types import GenerationRequest

    return GenerationRequest(messages=messages, max_new_tokens=new_tokens, temperature=0)


def decode_rate(result: Any) -> float | None:
    """Tokens per second after the first one (the first one's time is in TTFT)."""
    ttft = result.time_to_first_token_s
    if ttft is None or result.output_length < 2 or result.duration_s <= ttft:
        return None
    return (result.output_length - 1) / (result.duration_s - ttft)


# --- engines --------------------------------------------------------------------------------------------


def concurrent_engine(settings: Any, loaded: Any) -> tuple[Any, str]:
    """The batched engine when the service has one, else the sequential engine (and a note saying so)."""
    from inference.engines.sequential import SequentialEngine

    try:
        from inference.engines.batched.engine import BatchedEngine  # type: ignore[import-not-found]
    except ImportError:
        engine = SequentialEngine(settings, loader=lambda _settings: loaded)
        return engine, "sequential (inference.engines.batched.engine.BatchedEngine does not exist yet)"
    try:
        engine = BatchedEngine(settings, loader=lambda _settings: loaded)
    except TypeError as error:
        engine = SequentialEngine(settings, loader=lambda _settings: loaded)
        return engine, f"sequential (BatchedEngine(settings, loader=...) failed: {error})"
    return engine, "batched"


async def measure_engine(engine: Any, plan: Plan, concurrent: bool) -> dict[str, Any]:
    results: dict[str, Any] = {}
    warm = request_of(prompt_of_length(engine, min(32, plan.prompt_lengths[0]), "warm-up"), 4)
    await engine.generate(warm)  # CUDA kernels, bitsandbytes and allocator warm-up
    if concurrent:
        requests = [
            request_of(prompt_of_length(engine, plan.concurrent_prompt, f"Permintaan {i}:"), plan.new_tokens)
            for i in range(plan.concurrency)
        ]
        reset_peak()
        started = time.perf_counter()
        outputs = await asyncio.gather(*(engine.generate(r) for r in requests))
        wall = time.perf_counter() - started
        tokens = sum(o.output_length for o in outputs)
        results["concurrent"] = {
            "requests": len(outputs),
            "prompt_tokens": outputs[0].input_length,
            "output_tokens": tokens,
            "wall_s": wall,
            "aggregate_tok_s": tokens / wall,
            "peak_gb": peak_gb(),
        }
        return results
    for length in plan.prompt_lengths:
        messages = prompt_of_length(engine, length, f"Prompt {length}:")
        free_memory()
        reset_peak()
        result = await engine.generate(request_of(messages, plan.new_tokens))
        # The engine's TTFT is when the first *text* reaches the client: the streamer holds a token back
        # until a word boundary. A 1-token generation times prefill + the first token on its own.
        first = await engine.generate(request_of(messages, 1))
        results[f"prompt_{length}"] = {
            "first_token_s": first.duration_s,
            "prompt_tokens": result.input_length,
            "output_tokens": result.output_length,
            "ttft_s": result.time_to_first_token_s,
            "decode_tok_s": decode_rate(result),
            "duration_s": result.duration_s,
            "peak_gb": peak_gb(),
        }
    return results


def run_mode(mode: str, plan: Plan, cuda: bool) -> dict[str, Any]:
    from inference.engines.sequential import SequentialEngine
    from inference.model.loading import load_model
    from webapp.settings import Settings

    settings = Settings(  # type: ignore[call-arg]
        model_id=str(plan.model_dir), quantization=mode, max_new_tokens_cap=max(plan.new_tokens, 8), _env_file=None
    )
    free_memory()
    reset_peak()
    reset_peak_rss()
    started = time.perf_counter()
    loaded = load_model(settings)
    out: dict[str, Any] = {
        "load_s": time.perf_counter() - started,
        "info": {k: getattr(loaded.info, k) for k in ("quantization", "dtype", "device", "context_length")},
        "footprint_gb": loaded.model.get_memory_footprint() / GB,
        "after_load_gb": allocated_gb(),
        "device_used_after_load_gb": device_used_gb(),
        "load_peak_gb": peak_gb(),
        "load_peak_rss_gb": peak_rss_gb(),
    }
    print(f"{mode}: loaded in {out['load_s']:.1f}s as {out['info']}")
    single = SequentialEngine(settings, loader=lambda _settings: loaded)
    single.load()
    try:
        out.update(asyncio.run(measure_engine(single, plan, concurrent=False)))
    finally:
        single.close()
    engine, engine_note = concurrent_engine(settings, loaded)
    out["concurrent_engine"] = engine_note
    if engine_note != "batched":
        print(f"note: {plan.concurrency} concurrent requests go through the {engine_note}")
    try:
        engine.load()
        out.update(asyncio.run(measure_engine(engine, plan, concurrent=True)))
    finally:
        engine.close()
    single = engine = loaded = None  # drops the model (the loader closures share the cell)
    free_memory()
    return out


# --- report ---------------------------------------------------------------------------------------------


def fmt(value: Any, spec: str = ".2f", unit: str = "") -> str:
    if value is None:
        return "n/a"
    return f"{value:{spec}}{unit}"


def gb(value: float | None) -> str:
    """GB with two decimals; tiny (--tiny) sizes with two significant digits instead of 0.00."""
    if value is None:
        return "n/a"
    return f"{value:.2f}" if value >= 0.1 else f"{value:.2g}"


def count(value: int) -> str:
    return f"{value / 1e9:.2f}B" if value >= 1e8 else f"{value / 1e6:.2f}M"


def computed_rows(plan: Plan) -> list[tuple[str, dict[str, str]]]:
    config = gemma2_config(plan.shape)
    longest = max(plan.prompt_lengths) + plan.new_tokens
    context = plan.shape["max_position_embeddings"]
    return [
        (
            "weights, computed (GB)",
            {m: gb(weight_bytes(config, m) / GB) for m in plan.modes},
        ),
        (
            f"eager-attention scores at prefill, prompt {max(plan.prompt_lengths)} / {context}, computed (GB)",
            {
                m: f"{gb(eager_attention_peak_bytes(config, max(plan.prompt_lengths)) / GB)} / "
                f"{gb(eager_attention_peak_bytes(config, context) / GB)}"
                for m in plan.modes
            },
        ),
        (
            f"KV cache for {longest} tokens / full {context} context, computed (GB)",
            {
                m: f"{gb(kv_cache_bytes(config, longest) / GB)} / {gb(kv_cache_bytes(config, context) / GB)}"
                for m in plan.modes
            },
        ),
    ]


def render_table(plan: Plan, results: dict[str, dict[str, Any]], environment: str) -> str:
    modes = plan.modes
    rows: list[tuple[str, dict[str, str]]] = []

    def row(label: str, pick: Any) -> None:
        cells = {}
        for mode in modes:
            result = results.get(mode, {})
            cells[mode] = "skipped" if "skipped" in result else pick(result)
        rows.append((label, cells))

    row("load time (s)", lambda r: fmt(r.get("load_s"), ".1f"))
    row("served as", lambda r: f"{r['info']['quantization']}, {r['info']['dtype']}, {r['info']['device']}")
    row("host RAM peak (RSS) while loading (GB)", lambda r: gb(r.get("load_peak_rss_gb")))
    row("GPU memory after load, allocated (GB)", lambda r: gb(r.get("after_load_gb")))
    row("GPU memory after load, device total incl. CUDA context (GB)", lambda r: gb(r.get("device_used_after_load_gb")))
    for length in plan.prompt_lengths:
        key = f"prompt_{length}"
        row(
            f"peak GPU memory, prompt {length} + {plan.new_tokens} new (GB)",
            lambda r, key=key: gb(r.get(key, {}).get("peak_gb")),
        )
    for length in plan.prompt_lengths:
        key = f"prompt_{length}"
        row(
            f"TTFT (first text streamed), prompt {length} (s)",
            lambda r, key=key: fmt(r.get(key, {}).get("ttft_s"), ".3f"),
        )
        row(
            f"prefill + first token (max_new_tokens=1), prompt {length} (s)",
            lambda r, key=key: fmt(r.get(key, {}).get("first_token_s"), ".3f"),
        )
    for length in plan.prompt_lengths:
        key = f"prompt_{length}"
        row(
            f"decode tok/s, single stream, prompt {length}",
            lambda r, key=key: fmt(r.get(key, {}).get("decode_tok_s"), ".1f"),
        )
    row(
        f"aggregate tok/s, {plan.concurrency} concurrent (prompt {plan.concurrent_prompt}, {plan.new_tokens} new)",
        lambda r: fmt(r.get("concurrent", {}).get("aggregate_tok_s"), ".1f"),
    )
    row(f"peak GPU memory, {plan.concurrency} concurrent (GB)", lambda r: gb(r.get("concurrent", {}).get("peak_gb")))
    row("engine for the concurrent figure", lambda r: str(r.get("concurrent_engine", "n/a")).split(" (")[0])
    rows += computed_rows(plan)

    header = "| | " + " | ".join(MODE_LABELS.get(m, m) for m in modes) + " |"
    lines = [environment, "", header, "|---|" + "---|" * len(modes)]
    lines += [f"| {label} | " + " | ".join(cells[m] for m in modes) + " |" for label, cells in rows]
    return "\n".join(lines)


def environment_line(plan: Plan, cuda: bool) -> str:
    import torch
    import transformers

    device = torch.cuda.get_device_name(0) if cuda else f"CPU ({platform.machine()}), no CUDA"
    parts = [f"device: {device}", f"torch {torch.__version__}", f"transformers {transformers.__version__}"]
    if cuda:
        try:
            import bitsandbytes

            parts.append(f"bitsandbytes {bitsandbytes.__version__}")
        except Exception as error:
            parts.append(f"bitsandbytes unavailable ({type(error).__name__})")
    shape = "tiny Gemma2 (--tiny)" if plan.tiny else "sahabat-ai shape (Gemma2-9B)"
    total = parameter_count(gemma2_config(plan.shape))["total"]
    return f"Model: {shape}, {count(total)} parameters, random weights. " + ", ".join(parts) + "."


def fill_file(path: Path, table: str) -> None:
    text = path.read_text(encoding="utf-8")
    begin, end = text.find(TABLE_BEGIN), text.find(TABLE_END)
    if begin < 0 or end < begin:
        raise SystemExit(f"{path} has no {TABLE_BEGIN} ... {TABLE_END} markers to fill")
    path.write_text(text[: begin + len(TABLE_BEGIN)] + "\n" + table + "\n" + text[end:], encoding="utf-8")
    print(f"table written into {path}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    plan = make_plan(args)
    unknown = [m for m in plan.modes if m not in ("8bit", "4bit", "none")]
    if unknown:
        raise SystemExit(f"unknown --modes {unknown}: use 8bit, 4bit, none")
    cuda = has_cuda()
    if not cuda:
        print("no CUDA GPU: GPU-only steps (GPU memory figures) are skipped")
        if not plan.tiny:
            config = gemma2_config(plan.shape)
            print(
                "the full sahabat-ai shape needs a CUDA GPU (its bf16 weights alone are "
                f"{weight_bytes(config, 'none') / GB:.1f} GB); nothing measured. Computed figures:"
            )
            print(render_table(plan, {m: {"skipped": "no CUDA"} for m in plan.modes}, environment_line(plan, cuda)))
            print(
                "run with --tiny to check the script end to end on CPU; bench/cpu_shape.py measures this shape on CPU"
            )
            return 0
    build_s = ensure_model_dir(plan, cuda)
    if args.build_only:
        print(f"model directory ready in {build_s:.0f}s: {plan.model_dir}")
        return 0
    results: dict[str, dict[str, Any]] = {}
    for mode in plan.modes:
        try:
            results[mode] = run_mode(mode, plan, cuda)
        except Exception as error:  # one mode failing (OOM, bitsandbytes) must not hide the other's numbers
            message = f"{type(error).__name__}: {error}".splitlines()[0][:300]
            print(f"{mode} failed: {message}")
            results[mode] = {"skipped": f"failed: {message}"}
    table = render_table(plan, results, environment_line(plan, cuda))
    print()
    print(table)
    failed = {m: r["skipped"] for m, r in results.items() if str(r.get("skipped", "")).startswith("failed")}
    for mode, reason in failed.items():
        print(f"{mode}: {reason}")
    if args.json:
        args.json.write_text(json.dumps({"plan": str(plan), "results": results}, indent=2, default=str))
    if args.fill:
        fill_file(args.fill, table)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
