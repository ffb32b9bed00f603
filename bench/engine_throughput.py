"""In-process engine throughput: N concurrent clients straight into an engine, no HTTP.

Loads the model once and runs every (engine, concurrency) pair on it, one after the other. Each
client sends `--rounds` requests back to back (closed loop), cycling through fixed prompts of mixed
lengths (Indonesian and English). Reports aggregate output tok/s, per-stream tok/s and TTFT p50/p95.

    python -m bench.engine_throughput --concurrency 1 4 8 16 --max-new-tokens 64

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
from inference.engine import LocalEngine
from inference.loading import LoadedModel, load_model
from inference.settings import Settings

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


async def run(engine: LocalEngine, concurrency: int, rounds: int, max_new_tokens: int) -> RunResult:
    results: list[tuple[GenerationResult, float | None]] = []

    async def client(index: int) -> None:
        for round_ in range(rounds):
            prompt = PROMPTS[(index + round_ * concurrency) % len(PROMPTS)]
            request = GenerationRequest(
                messages=(Message("user", prompt),), max_new_tokens=max_new_tokens, temperature=0.0
            )
            results.append(await one_request(engine, request))

    started = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(concurrency)))
    wall = time.perf_counter() - started
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
        max_batch=args.max_batch,
        max_queue=max(64, max(args.concurrency)),
        _env_file=None,  # type: ignore[call-arg]
    )
    loaded = load_model(settings)
    print(f"model {loaded.info.model_id} dtype={loaded.info.dtype} device={loaded.info.device}", flush=True)
    out: list[RunResult] = []
    for kind in args.engines:
        engine = build(kind, settings, loaded)
        await run(engine, 1, 1, 4)  # warm-up
        for concurrency in args.concurrency:
            result = await run(engine, concurrency, args.rounds, args.max_new_tokens)
            out.append(result)
            print(json.dumps(asdict(result)), flush=True)
        engine.close()
    return out


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
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--model-id", default="embedded")
    parser.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"])
    args = parser.parse_args(argv)
    results = asyncio.run(main_async(args))
    summarize(results)
    return results


if __name__ == "__main__":
    main()
