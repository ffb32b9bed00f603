"""In-process engine throughput: N concurrent clients straight into an engine, no HTTP.

Loads the model once and runs every (engine, concurrency) pair on it, one after the other. Each
client sends `--rounds` requests back to back (closed loop), cycling through fixed prompts of mixed
lengths (Indonesian and English). Reports aggregate output tok/s, per-stream tok/s and TTFT p50/p95.

    python -m bench.engine_throughput --concurrency 1 4 8 16 --max-new-tokens 64 --repeat 3

Engines alternate at each concurrency (sequential, batched, sequential, ...), so other load on the
machine hits both alike; with --repeat the summary shows each pair's median run.

The HTTP load generator (bench/ of issue 4) measures the whole service; this isolates the engine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any

from inference import BatchedEngine, GenerationRequest, GenerationResult, Message, SequentialEngine, TextDelta
from inference.engines.base import LocalEngine
from inference.model.loading import LoadedModel, load_model
from webapp.settings import Settings

PROMPTS = [
    "Apa ibu kota Indonesia?",
    "Write a short story about a cat who lives in Jakarta and loves to eat fish.",
    "Jelaskan apa itu fotosintesis dengan bahasa yang mudah dipahami oleh anak sekolah dasar.",
    "What are three tips for learning a new language?",
    "Sebutkan tiga pulau besar di Indonesia beserta penjelasan singkat tentang masing-masing pulau, "
    "termasuk kota-kota utamanya, makanan khasnya, dan tempat wisata yang paling terkenal di sana.",
    "Halo! Apa kabar?",
    "Explain the difference between weather and climate in two sentences.",
    "Tolong buatkan resep sederhana untuk membuat nasi goreng di rumah.",
]


@dataclass
class RunResult:
    engine: str
    concurrency: int
    requests: int
    output_tokens: int
    wall_s: float
    aggregate_tok_s: float
    per_stream_tok_s: float
    ttft_p50_s: float
    ttft_p95_s: float
    latency_p50_s: float
    latency_p95_s: float
    cpu_ms_per_token: float  # process CPU time per output token: less sensitive to other load than tok/s


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


async def one_request(engine: LocalEngine, request: GenerationRequest) -> tuple[GenerationResult, float | None]:
    started = time.perf_counter()
    first: float | None = None
    stream = await engine.submit(request)
    async for event in stream:
        if isinstance(event, TextDelta):
            first = first or time.perf_counter() - started
        elif isinstance(event, GenerationResult):
            return event, first
    raise RuntimeError("no result")


async def run(
    engine: LocalEngine, concurrency: int, rounds: int, max_new_tokens: int, stagger_s: float = 0.0
) -> RunResult:
    """`concurrency` clients, `rounds` requests each. With `stagger_s`, client i starts i * stagger_s late and
    the requests ask for 50-100 % of `max_new_tokens`, so arrivals spread out (no synchronized bursts)."""
    results: list[tuple[GenerationResult, float | None]] = []

    async def client(index: int) -> None:
        await asyncio.sleep(index * stagger_s)
        for round_ in range(rounds):
            number = index + round_ * concurrency
            prompt = PROMPTS[number % len(PROMPTS)]
            tokens = max_new_tokens if not stagger_s else max(1, round(max_new_tokens * (0.5 + (number * 7 % 11) / 20)))
            request = GenerationRequest(messages=(Message("user", prompt),), max_new_tokens=tokens, temperature=0.0)
            results.append(await one_request(engine, request))

    started, cpu_started = time.perf_counter(), time.process_time()
    await asyncio.gather(*(client(i) for i in range(concurrency)))
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    tokens = sum(r.output_length for r, _ in results)
    ttfts = [t for _, t in results if t is not None]
    latencies = [r.duration_s for r, _ in results]
    per_stream = statistics.mean(r.output_length / r.duration_s for r, _ in results if r.duration_s > 0)
    return RunResult(
        engine=engine.name,
        concurrency=concurrency,
        requests=len(results),
        output_tokens=tokens,
        wall_s=round(wall, 2),
        aggregate_tok_s=round(tokens / wall, 1),
        per_stream_tok_s=round(per_stream, 1),
        ttft_p50_s=round(percentile(ttfts, 50), 3),
        ttft_p95_s=round(percentile(ttfts, 95), 3),
        latency_p50_s=round(percentile(latencies, 50), 2),
        latency_p95_s=round(percentile(latencies, 95), 2),
        cpu_ms_per_token=round(1000 * cpu / max(1, tokens), 1),
    )


def build(kind: str, settings: Settings, loaded: LoadedModel) -> LocalEngine:
    engine: LocalEngine
    if kind == "batched":
        engine = BatchedEngine(settings, loader=lambda _s: loaded)
    else:
        engine = SequentialEngine(settings, loader=lambda _s: loaded)
    engine.load()
    return engine


async def main_async(args: argparse.Namespace) -> list[RunResult]:
    settings = Settings(
        model_id=args.model_id,
        dtype=args.dtype,
        quantization=args.quantization,
        max_batch=args.max_batch if args.max_batch == "auto" else int(args.max_batch),
        max_queue=max(64, max(args.concurrency)),
        queue_timeout=3600,
        _env_file=None,  # type: ignore[call-arg]
    )
    loaded = load_model(settings)
    info = loaded.info
    print(f"model {info.model_id} quantization={info.quantization} dtype={info.dtype} device={info.device}", flush=True)
    engines = [build(kind, settings, loaded) for kind in args.engines]
    for engine in engines:
        await run(engine, 1, 1, 4)  # warm-up
    runs: list[RunResult] = []
    # Engines alternate at each concurrency, so a change in the machine's other load hits both alike.
    for _repeat in range(args.repeat):
        for concurrency in args.concurrency:
            for engine in engines:
                result = await run(engine, concurrency, args.rounds, args.max_new_tokens, args.stagger)
                runs.append(result)
                print(json.dumps(asdict(result)), flush=True)
    for engine in engines:
        engine.close()
    return [median_run([r for r in runs if (r.engine, r.concurrency) == key]) for key in _keys(runs)]


def _keys(runs: list[RunResult]) -> list[tuple[str, int]]:
    return sorted({(r.engine, r.concurrency) for r in runs}, key=lambda k: (k[0] != "sequential", k[0], k[1]))


def median_run(runs: list[RunResult]) -> RunResult:
    """The run with the median aggregate tok/s (of an odd count; the lower middle one of an even count)."""
    ordered = sorted(runs, key=lambda r: r.aggregate_tok_s)
    return ordered[(len(ordered) - 1) // 2]


def summarize(results: list[RunResult]) -> None:
    base = {r.concurrency: r for r in results if r.engine == "sequential"}
    single = next((r for r in results if r.engine == "sequential" and r.concurrency == 1), None)
    print()
    print(
        f"{'engine':<11}{'conc':>5}{'req':>5}{'tok/s':>8}{'x seq':>7}{'stream tok/s':>14}{'TTFT p50':>10}"
        f"{'TTFT p95':>10}{'p95/1-seq':>11}{'lat p95':>9}"
    )
    for r in results:
        ratio = r.aggregate_tok_s / base[r.concurrency].aggregate_tok_s if r.concurrency in base else float("nan")
        ttft_ratio = r.ttft_p95_s / single.ttft_p50_s if single else float("nan")
        print(
            f"{r.engine:<11}{r.concurrency:>5}{r.requests:>5}{r.aggregate_tok_s:>8.1f}{ratio:>7.2f}"
            f"{r.per_stream_tok_s:>14.1f}{r.ttft_p50_s:>10.3f}{r.ttft_p95_s:>10.3f}{ttft_ratio:>11.2f}"
            f"{r.latency_p95_s:>9.2f}"
        )


def main(argv: list[str] | None = None) -> Any:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engines", nargs="+", default=["sequential", "batched"], choices=["sequential", "batched"])
    parser.add_argument("--concurrency", nargs="+", type=int, default=[1, 4, 8, 16])
    parser.add_argument("--rounds", type=int, default=2, help="requests per client, back to back")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument(
        "--stagger",
        type=float,
        default=0.0,
        help="seconds between client starts, and 50-100%% of --max-new-tokens per request (0: all start together)",
    )
    parser.add_argument("--max-batch", default="auto", help="MAX_BATCH for the batched engine (default: auto)")
    parser.add_argument("--model-id", default="embedded")
    parser.add_argument("--repeat", type=int, default=1, help="repeat the sweep; the summary shows median runs")
    parser.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"])
    parser.add_argument("--quantization", default="auto", choices=["auto", "8bit", "4bit", "none"])
    args = parser.parse_args(argv)
    results = asyncio.run(main_async(args))
    summarize(results)
    return results


if __name__ == "__main__":
    main()
