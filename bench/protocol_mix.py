"""Do requests on the other wire protocols slow the plain chat rows they share the batch with? (issue 27)

Starts our server (embedded model, ENGINE=batched) and alternates two loads of 8 concurrent streaming clients:
- `chat`: 8 clients on /v1/chat/completions;
- `mixed`: 4 clients on /v1/chat/completions beside 2 on /v1/responses and 2 on /v1/messages, all streamed, the
  same prompts and token counts.
Both loads keep 8 streams in the batch, so the chat clients' per-stream tok/s should match when a Responses or a
Messages row costs the batch what a chat row costs. Reports the chat clients' aggregate and per-stream tok/s and
TTFT per round.

    .venv/bin/python bench/protocol_mix.py [--rounds 2] [--requests 32] [--max-tokens 64]

Figures: docs/throughput.md#other-wire-protocols-beside-plain-rows.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.loadgen import RunReport, load_prompts, ours_server, run_load, running, target_for_ours

CLIENTS = 8


async def other_protocol_loop(base: str, key: str, path: str, prompts: list[str], max_tokens: int, stop: asyncio.Event):
    """One client streaming /v1/responses or /v1/messages requests back to back until `stop`; returns the count."""
    headers = {"Authorization": f"Bearer {key}", "x-api-key": key, "anthropic-version": "2023-06-01"}
    done = 0
    async with httpx.AsyncClient(timeout=600, trust_env=False) as client:
        while not stop.is_set():
            prompt = prompts[done % len(prompts)]
            if path == "/v1/responses":
                body = {"model": "sahabat-ai", "input": prompt, "max_output_tokens": max_tokens, "temperature": 0}
            else:
                body = {"model": "sahabat-ai", "max_tokens": max_tokens, "temperature": 0}
                body["messages"] = [{"role": "user", "content": prompt}]
            async with client.stream("POST", base + path, json={**body, "stream": True}, headers=headers) as reply:
                if reply.status_code != 200:
                    raise SystemExit(f"{path}: HTTP {reply.status_code}: {(await reply.aread())[:300]!r}")
                async for _ in reply.aiter_lines():
                    pass
            done += 1
    return done


async def mixed_round(port: int, key: str, prompts: list, requests: int, max_tokens: int):
    target = target_for_ours(port, "openai", key)
    stop = asyncio.Event()
    texts = [p.text for p in prompts]
    base = f"http://127.0.0.1:{port}"
    others = [
        asyncio.create_task(other_protocol_loop(base, key, path, texts, max_tokens, stop))
        for path in ("/v1/responses", "/v1/responses", "/v1/messages", "/v1/messages")
    ]
    await asyncio.sleep(0.5)  # the other rows are in the batch before the measured chat clients start
    report = await run_load(target, prompts, concurrency=CLIENTS // 2, requests=requests // 2, max_tokens=max_tokens)
    stop.set()
    counts = await asyncio.gather(*others)
    return report, sum(counts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--requests", type=int, default=32, help="chat requests of the `chat` load (half in `mixed`)")
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()
    prompts = load_prompts()
    with tempfile.TemporaryDirectory() as logs:
        server, key = ours_server("batched", Path(logs))
        target = target_for_ours(server.port, "openai", key)
        with running(server, target):
            print("round  load   chat streams  chat agg tok/s  chat stream tok/s  chat TTFT p50  other requests")
            for round_ in range(1, args.rounds + 1):
                plain = asyncio.run(
                    run_load(target, prompts, concurrency=CLIENTS, requests=args.requests, max_tokens=args.max_tokens)
                )
                print(row(round_, "chat", CLIENTS, plain, 0))
                mixed, others = asyncio.run(mixed_round(server.port, key, prompts, args.requests, args.max_tokens))
                print(row(round_, "mixed", CLIENTS // 2, mixed, others))


def row(round_: int, load: str, streams: int, report: RunReport, others: int) -> str:
    stream = f"{report.per_stream_tok_s:.1f}" if report.per_stream_tok_s is not None else "-"
    ttft = f"{report.ttft_p50_s:.3f}" if report.ttft_p50_s is not None else "-"
    return (
        f"{round_:>5}  {load:<5}  {streams:>12}  {report.aggregate_tok_s:>14.1f}  {stream:>17}  {ttft:>13}  "
        f"{others:>14}  errors={report.errors}"
    )


if __name__ == "__main__":
    main()
