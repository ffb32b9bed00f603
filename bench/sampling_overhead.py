"""Do rows without penalties/logprobs keep their speed beside rows with them? One batched engine, one run.

`--clients` closed-loop clients (greedy, `--max-new-tokens` each, `--rounds` requests back to back) run twice per
repeat: once all plain, once with `--featured` of them asking for presence_penalty + frequency_penalty + logprobs
with `--top-logprobs` alternatives. The two mixes alternate (plain, featured, plain, ...), so the machine's other load
hits both alike; the summary shows each mix's median run and the ratios featured/plain.

    python -m bench.sampling_overhead --clients 8 --featured 4 --max-new-tokens 64 --rounds 2 --repeat 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any

from bench.engine_throughput import PROMPTS, one_request
from inference import BatchedEngine, GenerationRequest, Message
from inference.model.loading import load_model
from webapp.settings import Settings


@dataclass
class MixResult:
    featured: int  # clients whose requests use penalties + logprobs
    clients: int
    output_tokens: int
    wall_s: float
    aggregate_tok_s: float
    plain_stream_tok_s: float  # mean tok/s of one plain request (nan when none)
    featured_stream_tok_s: float


async def run_mix(
    engine: BatchedEngine, clients: int, featured: int, rounds: int, max_new_tokens: int, top: int
) -> MixResult:
    results: list[tuple[bool, Any]] = []

    async def client(index: int) -> None:
        knobs: dict[str, Any] = {}
        if index < featured:
            knobs = {"presence_penalty": 0.5, "frequency_penalty": 0.5, "logprobs": top}
        for round_ in range(rounds):
            prompt = PROMPTS[(index + round_ * clients) % len(PROMPTS)]
            request = GenerationRequest(
                messages=(Message("user", prompt),), max_new_tokens=max_new_tokens, temperature=0.0, **knobs
            )
            result, _ = await one_request(engine, request)
            results.append((bool(knobs), result))

    started = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(clients)))
    wall = time.perf_counter() - started
    tokens = sum(r.output_length for _, r in results)

    def stream_rate(with_features: bool) -> float:
        rates = [r.output_length / r.duration_s for f, r in results if f == with_features and r.duration_s > 0]
        return round(statistics.mean(rates), 1) if rates else float("nan")

    return MixResult(
        featured, clients, tokens, round(wall, 2), round(tokens / wall, 1), stream_rate(False), stream_rate(True)
    )


async def main_async(args: argparse.Namespace) -> dict[int, MixResult]:
    settings = Settings(model_id=args.model_id, max_queue=64, queue_timeout=3600, _env_file=None)  # type: ignore[call-arg]
    engine = BatchedEngine(settings, loader=lambda _s: load_model(settings))
    engine.load()
    await run_mix(engine, 2, 1, 1, 4, args.top_logprobs)  # warm-up
    runs: list[MixResult] = []
    for _ in range(args.repeat):
        for featured in (0, args.featured):
            result = await run_mix(engine, args.clients, featured, args.rounds, args.max_new_tokens, args.top_logprobs)
            runs.append(result)
            print(json.dumps(asdict(result)), flush=True)
    engine.close()
    medians = {}
    for featured in (0, args.featured):
        ordered = sorted((r for r in runs if r.featured == featured), key=lambda r: r.aggregate_tok_s)
        medians[featured] = ordered[(len(ordered) - 1) // 2]
    return medians


def main(argv: list[str] | None = None) -> dict[int, MixResult]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--featured", type=int, default=4, help="clients using penalties + logprobs in the 2nd mix")
    parser.add_argument("--top-logprobs", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2, help="requests per client, back to back")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3, help="repeat both mixes; the summary shows median runs")
    parser.add_argument("--model-id", default="embedded")
    args = parser.parse_args(argv)
    medians = asyncio.run(main_async(args))
    plain, mixed = medians[0], medians[args.featured]
    print()
    print(f"{'featured':>9}{'tok/s':>8}{'plain stream tok/s':>20}{'featured stream tok/s':>23}")
    for r in (plain, mixed):
        print(f"{r.featured:>9}{r.aggregate_tok_s:>8.1f}{r.plain_stream_tok_s:>20.1f}{r.featured_stream_tok_s:>23.1f}")
    print(
        f"ratios {args.featured}/0: aggregate {mixed.aggregate_tok_s / plain.aggregate_tok_s:.3f}, "
        f"plain streams {mixed.plain_stream_tok_s / plain.plain_stream_tok_s:.3f}"
    )
    return medians


if __name__ == "__main__":
    main()
