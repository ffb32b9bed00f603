"""What the ENGINE=remote hop costs: the same streaming load against an upstream directly and through the service.

    # upstream = this service on the embedded model (ENGINE=sequential), front = this service with ENGINE=remote
    python bench/remote_overhead.py
    # upstream = a fixed-rate fake OpenAI server: no model noise, only the hop is measured
    python bench/remote_overhead.py --upstream synthetic
    # an OpenAI-compatible upstream already running on loopback (llama.cpp's server, vLLM, ...)
    python bench/remote_overhead.py --upstream-url http://127.0.0.1:8080/v1 --api-key KEY

Each round runs the load against the upstream's /v1/chat/completions and then against the front's, both
streamed with `stream_options.include_usage`; tokens are the servers' `usage.completion_tokens`. Rounds
alternate so that drift in a shared CPU hits both sides alike. Prints aggregate tok/s, TTFT percentiles,
the through/direct throughput ratio and the added TTFT p50, against the targets (>= 0.95x, < 20 ms).
Only loopback addresses are used. Needs no torch in this process.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import httpx

if __package__ in (None, ""):  # run as a script: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.loadgen import free_port

REPO = Path(__file__).resolve().parent.parent
PROMPTS = [
    "Sebutkan tiga pulau terbesar di Indonesia.",
    "Apa ibu kota Jawa Barat?",
    "Ceritakne babagan sejarah Jawa.",
    "Jelaskan cara membuat nasi goreng yang enak.",
    "Apa saja tempat wisata menarik di Bandung?",
    "Sopo wae sing ana ing Punakawan?",
    "Tulis pantun pendek tentang laut.",
    "What is the capital of Indonesia?",
]
TARGET_RATIO = 0.95
TARGET_ADDED_TTFT_MS = 20.0


@dataclass
class Sample:
    ttft_s: float | None
    tokens: int
    ok: bool


@dataclass
class Phase:
    target: str
    concurrency: int
    samples: list[Sample]
    wall_s: float

    @property
    def tokens(self) -> int:
        return sum(s.tokens for s in self.samples)

    @property
    def tok_s(self) -> float:
        return self.tokens / self.wall_s if self.wall_s else 0.0

    def ttft_ms(self, q: float) -> float:
        values = sorted(s.ttft_s for s in self.samples if s.ttft_s is not None)
        if not values:
            return float("nan")
        return 1000 * values[min(len(values) - 1, round(q * (len(values) - 1)))]

    @property
    def errors(self) -> int:
        return sum(not s.ok for s in self.samples)


def require_loopback(url: str) -> None:
    host = urlsplit(url).hostname or ""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        sys.exit(f"{url}: only loopback addresses are benchmarked here")


# --- servers ---------------------------------------------------------------------------------------------------


class Server:
    """A child process serving on loopback, its output in a log file."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str]) -> None:
        self.name = name
        self.log = tempfile.NamedTemporaryFile("w+", prefix=f"bench-{name}-", suffix=".log", delete=False)  # noqa: SIM115
        self.process = subprocess.Popen(argv, cwd=REPO, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        self.started = time.monotonic()
        self.ready_s = 0.0

    def wait_ready(self, url: str, api_key: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.log.seek(0)
                sys.exit(f"{self.name} exited during start-up:\n{self.log.read()[-3000:]}")
            with contextlib.suppress(httpx.HTTPError):
                headers = {"Authorization": f"Bearer {api_key}"}
                if httpx.get(f"{url}/models", headers=headers, timeout=2).status_code == 200:
                    self.ready_s = time.monotonic() - self.started
                    return
            time.sleep(0.1)
        sys.exit(f"{self.name} not ready within {timeout:.0f} s (log: {self.log.name})")

    def rss_mib(self) -> float:
        import psutil

        return psutil.Process(self.process.pid).memory_info().rss / 2**20

    def cpu_s(self) -> float:
        import psutil

        times = psutil.Process(self.process.pid).cpu_times()
        return times.user + times.system

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self.log.close()
        os.unlink(self.log.name)


def service_env(api_key: str, port: int, **settings: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REMOTE_", "ENGINE", "MODEL_ID", "API_KEYS"))}
    env.update(
        API_KEYS=api_key, HOST="127.0.0.1", PORT=str(port), LOG_LEVEL="warning", GRADIO_ANALYTICS_ENABLED="False"
    )
    env.update(settings)
    return env


# --- the synthetic upstream: a fixed-rate OpenAI-shaped stream -----------------------------------------------


def serve_synthetic(port: int, first_token_ms: float, interval_ms: float) -> None:
    """An upstream whose timing does not depend on load: TTFT and inter-token gap are fixed sleeps."""
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    async def models(request: Request) -> JSONResponse:
        return JSONResponse({"object": "list", "data": [{"id": "synthetic", "object": "model", "created": 0}]})

    async def completions(request: Request) -> StreamingResponse:
        body = await request.json()
        count = int(body.get("max_tokens") or 16)

        def event(payload: dict) -> bytes:
            return f"data: {json.dumps(payload)}\n\n".encode()

        def chunk(delta: dict, finish: str | None = None) -> bytes:
            choice = {"index": 0, "delta": delta, "finish_reason": finish}
            return event(
                {"id": "s", "object": "chat.completion.chunk", "created": 0, "model": "synthetic", "choices": [choice]}
            )

        async def stream():
            yield chunk({"role": "assistant", "content": ""})
            await asyncio.sleep(first_token_ms / 1000)
            for index in range(count):
                if index:
                    await asyncio.sleep(interval_ms / 1000)
                yield chunk({"content": f" kata{index}"})
            yield chunk({}, "length")
            usage = {"prompt_tokens": 10, "completion_tokens": count, "total_tokens": 10 + count}
            yield event(
                {
                    "id": "s",
                    "object": "chat.completion.chunk",
                    "created": 0,
                    "model": "synthetic",
                    "choices": [],
                    "usage": usage,
                }
            )
            yield b"data: [DONE]\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream")

    app = Starlette(routes=[Route("/v1/models", models), Route("/v1/chat/completions", completions, methods=["POST"])])
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


# --- load ----------------------------------------------------------------------------------------------------


async def one_request(client: httpx.AsyncClient, url: str, model: str, prompt: str, max_tokens: int) -> Sample:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    started = time.perf_counter()
    ttft: float | None = None
    tokens = 0
    try:
        async with client.stream("POST", f"{url}/chat/completions", json=body) as response:
            if response.status_code != 200:
                await response.aread()
                return Sample(None, 0, False)
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                payload = line[5:].strip()
                if payload == "[DONE]":
                    break
                data = json.loads(payload)
                if "error" in data:
                    return Sample(ttft, tokens, False)
                choices = data.get("choices") or []
                if ttft is None and choices and (choices[0].get("delta") or {}).get("content"):
                    ttft = time.perf_counter() - started
                if data.get("usage"):
                    tokens = int(data["usage"]["completion_tokens"])
    except httpx.HTTPError:
        return Sample(ttft, tokens, False)
    return Sample(ttft, tokens, True)


async def run_phase(
    target: str, url: str, api_key: str, model: str, concurrency: int, requests: int, max_tokens: int
) -> Phase:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    headers = {"Authorization": f"Bearer {api_key}"}
    async with httpx.AsyncClient(limits=limits, headers=headers, timeout=600) as client:
        queue = list(range(requests))
        samples: list[Sample] = []

        async def worker() -> None:
            while queue:
                index = queue.pop(0)
                samples.append(await one_request(client, url, model, PROMPTS[index % len(PROMPTS)], max_tokens))

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return Phase(target, concurrency, samples, time.perf_counter() - started)


def first_model(url: str, api_key: str) -> str:
    response = httpx.get(f"{url}/models", headers={"Authorization": f"Bearer {api_key}"}, timeout=10)
    response.raise_for_status()
    return response.json()["data"][0]["id"]


# --- main ----------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def servers(args: argparse.Namespace) -> Iterator[tuple[str, str, Server | None, str]]:
    """(upstream URL, front URL, front server, upstream description); stops what it started."""
    api_key = args.api_key or "sk-bench-" + secrets.token_urlsafe(12)
    started: list[Server] = []
    try:
        if args.upstream_url:
            require_loopback(args.upstream_url)
            upstream_url, description = args.upstream_url.rstrip("/"), f"external {args.upstream_url}"
        elif args.upstream == "synthetic":
            port = free_port()
            argv = [sys.executable, __file__, "--serve-synthetic", str(port)]
            argv += ["--synthetic-first-token-ms", str(args.synthetic_first_token_ms)]
            argv += ["--synthetic-interval-ms", str(args.synthetic_interval_ms)]
            upstream = Server("upstream", argv, dict(os.environ))
            started.append(upstream)
            upstream_url = f"http://127.0.0.1:{port}/v1"
            upstream.wait_ready(upstream_url, api_key, 60)
            description = (
                f"synthetic (first token {args.synthetic_first_token_ms:g} ms, {args.synthetic_interval_ms:g} ms/token)"
            )
        else:
            port = free_port()
            env = service_env(api_key, port, ENGINE=args.upstream_engine, MODEL_ID="embedded")
            upstream = Server("upstream", [sys.executable, "app.py"], env)
            started.append(upstream)
            upstream_url = f"http://127.0.0.1:{port}/v1"
            upstream.wait_ready(upstream_url, api_key, 600)
            description = f"this service, embedded model, ENGINE={args.upstream_engine}"
        port = free_port()
        env = service_env(api_key, port, ENGINE="remote", REMOTE_URL=upstream_url, REMOTE_API_KEY=api_key)
        front = Server("front", [sys.executable, "app.py"], env)
        started.append(front)
        front_url = f"http://127.0.0.1:{port}/v1"
        front.wait_ready(front_url, api_key, 300)
        args.api_key = api_key
        yield upstream_url, front_url, front, description
    finally:
        for server in reversed(started):
            server.stop()


def print_phase(round_no: int, phase: Phase) -> None:
    print(
        f"{round_no:>5}  {phase.target:<8} {phase.concurrency:>3} {len(phase.samples):>4} {phase.tokens:>7} "
        f"{phase.wall_s:>7.2f} {phase.tok_s:>7.1f} {phase.ttft_ms(0.5):>9.1f} {phase.ttft_ms(0.9):>9.1f} "
        f"{phase.errors:>4}",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--upstream", choices=["embedded", "synthetic"], default="embedded")
    parser.add_argument("--upstream-engine", default="sequential", help="ENGINE of the embedded-model upstream")
    parser.add_argument("--upstream-url", help="an OpenAI-compatible upstream already running on loopback (.../v1)")
    parser.add_argument("--api-key", help="the upstream's key (also used for the front)")
    parser.add_argument("-c", "--concurrency", type=int, nargs="+", default=[8])
    parser.add_argument("-n", "--requests", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2, help="direct/through pairs per concurrency")
    parser.add_argument("--synthetic-first-token-ms", type=float, default=50.0)
    parser.add_argument("--synthetic-interval-ms", type=float, default=20.0)
    parser.add_argument("--serve-synthetic", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if args.serve_synthetic:
        serve_synthetic(args.serve_synthetic, args.synthetic_first_token_ms, args.synthetic_interval_ms)
        return

    results: list[dict[str, object]] = []
    with servers(args) as (upstream_url, front_url, front, description):
        model = first_model(upstream_url, args.api_key)
        print(f"upstream: {description} at {upstream_url} (model {model})")
        if front is not None:
            print(
                f"front:    ENGINE=remote at {front_url}: ready in {front.ready_s:.1f} s, RSS {front.rss_mib():.0f} MiB"
            )
        for url in (upstream_url, front_url):  # warm-up: connections, first-call costs
            asyncio.run(run_phase("warmup", url, args.api_key, model, 2, 2, 4))
        print(
            f"\n{'round':>5}  {'target':<8} {'c':>3} {'req':>4} {'tokens':>7} {'wall_s':>7} {'tok/s':>7} "
            f"{'ttft_p50':>9} {'ttft_p90':>9} {'err':>4}"
        )
        for concurrency in args.concurrency:
            pairs: list[tuple[Phase, Phase]] = []
            front_cpu = 0.0
            for round_no in range(1, args.rounds + 1):
                direct = asyncio.run(
                    run_phase("direct", upstream_url, args.api_key, model, concurrency, args.requests, args.max_tokens)
                )
                print_phase(round_no, direct)
                cpu_before = front.cpu_s() if front else 0.0
                through = asyncio.run(
                    run_phase("through", front_url, args.api_key, model, concurrency, args.requests, args.max_tokens)
                )
                front_cpu += (front.cpu_s() - cpu_before) if front else 0.0
                print_phase(round_no, through)
                pairs.append((direct, through))
            direct_tok_s = sum(d.tokens for d, _ in pairs) / sum(d.wall_s for d, _ in pairs)
            through_tok_s = sum(t.tokens for _, t in pairs) / sum(t.wall_s for _, t in pairs)
            ratio = through_tok_s / direct_tok_s if direct_tok_s else float("nan")
            round_ratios = [t.tok_s / d.tok_s for d, t in pairs if d.tok_s]
            through_wall = sum(t.wall_s for _, t in pairs)
            added = statistics.median(t.ttft_ms(0.5) - d.ttft_ms(0.5) for d, t in pairs)
            through_tokens = sum(t.tokens for _, t in pairs)
            cpu_per_1k = 1000 * front_cpu / through_tokens if through_tokens else float("nan")
            cpu_share = 100 * front_cpu / through_wall if through_wall else float("nan")
            verdict = "OK" if ratio >= TARGET_RATIO and added < TARGET_ADDED_TTFT_MS else "MISSED"
            print(
                f"\nc={concurrency}: throughput through/direct = {through_tok_s:.1f}/{direct_tok_s:.1f} tok/s = "
                f"{ratio:.3f}x (per round: {', '.join(f'{r:.3f}' for r in round_ratios)}; target >= {TARGET_RATIO}); "
                f"added TTFT p50 = {added:+.1f} ms (median of rounds; target < {TARGET_ADDED_TTFT_MS:g}); "
                f"front CPU {cpu_share:.1f}% of a core ({cpu_per_1k:.2f} s per 1k tokens) -> {verdict}\n"
            )
            results.append(
                {
                    "concurrency": concurrency,
                    "direct_tok_s": direct_tok_s,
                    "through_tok_s": through_tok_s,
                    "ratio": ratio,
                    "added_ttft_p50_ms": added,
                    "round_ratios": round_ratios,
                    "front_cpu_s_per_1k_tokens": cpu_per_1k,
                    "front_cpu_percent_of_core": cpu_share,
                    "rounds": [
                        {
                            "direct": {"tok_s": d.tok_s, "ttft_p50_ms": d.ttft_ms(0.5), "errors": d.errors},
                            "through": {"tok_s": t.tok_s, "ttft_p50_ms": t.ttft_ms(0.5), "errors": t.errors},
                        }
                        for d, t in pairs
                    ],
                }
            )
        if front is not None:
            print(f"front RSS after the load: {front.rss_mib():.0f} MiB")
    if args.json:
        args.json.write_text(json.dumps({"upstream": description, "results": results}, indent=2))


if __name__ == "__main__":
    main()
