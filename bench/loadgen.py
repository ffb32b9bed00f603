"""Load generator: N concurrent streaming clients against an OpenAI-compatible server or our documented API.

Pure Python (httpx, psutil); it never imports torch or the service's packages, so it can drive any server.
Only loopback addresses are accepted.

    # any OpenAI-compatible server already running (llama-server, llama-cpp-python, ours)
    python bench/loadgen.py --url http://127.0.0.1:8080/v1 --api-key KEY -c 1 8 --pid 1234
    # our server, started here with the embedded model (then stopped)
    python bench/loadgen.py --start-ours --engine batched -c 1 4 8 16
    # our documented endpoints instead of /v1/chat/completions
    python bench/loadgen.py --start-ours --engine sequential --api spec -c 2
    # concurrency 1, 4, 8, 16 against ENGINE=sequential and ENGINE=batched, with the ratios
    python bench/loadgen.py --summary

Tokens are counted from what the server reports (OpenAI `usage.completion_tokens` with
`stream_options.include_usage`, or the documented API's `output_length`), never from characters. A server
that reports no usage in its stream is counted one token per non-empty content chunk, and the report
says so (`tokens from: chunks`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import math
import os
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import httpx

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PROMPTS = Path(__file__).resolve().parent / "prompts.json"
SUMMARY_CONCURRENCY = (1, 4, 8, 16)
SUMMARY_ENGINES = ("sequential", "batched")
# The targets for the batched engine with the embedded model, checked by --summary.
TARGET_SPEEDUP_AT_8 = 6.0
TARGET_TTFT_RATIO_AT_8 = 2.0

Api = Literal["openai", "spec"]


class BenchError(Exception):
    """A benchmark that cannot run (bad URL, server that does not start, missing route)."""


# ---------------------------------------------------------------------------------------------------------------
# Prompts and addresses


@dataclass(frozen=True)
class Prompt:
    lang: str
    text: str


def load_prompts(path: Path = DEFAULT_PROMPTS) -> list[Prompt]:
    data = json.loads(path.read_text(encoding="utf-8"))
    prompts = [Prompt(lang=str(p.get("lang", "")), text=str(p["text"])) for p in data["prompts"]]
    if not prompts:
        raise BenchError(f"{path}: no prompts")
    return prompts


def require_loopback(url: str) -> None:
    """Refuse any address that is not this machine's loopback interface."""
    host = urlsplit(url).hostname
    if host is None:
        raise BenchError(f"not a URL with a host: {url!r}")
    if host == "localhost":
        return
    try:
        if ipaddress.ip_address(host).is_loopback:
            return
    except ValueError:
        pass
    raise BenchError(f"only loopback addresses are allowed (127.0.0.1, ::1, localhost), got {host!r}")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# ---------------------------------------------------------------------------------------------------------------
# Server-sent events


@dataclass
class SseEvent:
    event: str
    data: str


async def iter_sse(lines: AsyncIterator[str]) -> AsyncIterator[SseEvent]:
    """Events of a `text/event-stream` (comments and ids ignored; multi-line data joined with newlines)."""
    name = ""
    data: list[str] = []
    async for raw in lines:
        line = raw.rstrip("\r\n")
        if not line:
            if data:
                yield SseEvent(name or "message", "\n".join(data))
            name, data = "", []
            continue
        if line.startswith(":"):
            continue
        key, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if key == "data":
            data.append(value)
        elif key == "event":
            name = value
    if data:
        yield SseEvent(name or "message", "\n".join(data))


# ---------------------------------------------------------------------------------------------------------------
# One request


@dataclass
class RequestResult:
    ok: bool
    latency_s: float
    ttft_s: float | None = None
    output_tokens: int = 0
    token_source: str = ""  # "usage", "output_length" or "chunks"
    chunks: int = 0
    text: str = ""
    error: str = ""


@dataclass
class Target:
    """Where and how to send requests."""

    base_url: str  # http://127.0.0.1:8000/v1 for openai; http://127.0.0.1:8000 for spec
    api: Api = "openai"
    api_key: str | None = None
    model: str | None = None  # OpenAI `model`; None = the first id of GET /models, else "default"
    spec_path: str = "/api/v1/generate-text"
    stream: bool = True  # False: plain JSON requests (TTFT is then the whole latency)
    # False: the end of the response ends an OpenAI stream (`transformers serve` sends no `data: [DONE]`)
    done_marker: bool = True

    def headers(self) -> dict[str, str]:
        headers = {"Accept": "text/event-stream"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers

    def endpoint(self) -> str:
        base = self.base_url.rstrip("/")
        return f"{base}/chat/completions" if self.api == "openai" else f"{base}{self.spec_path}"

    def body(self, prompt: str, max_tokens: int, stream: bool = True) -> dict[str, Any]:
        if self.api == "openai":
            body: dict[str, Any] = {
                "model": self.model or "default",
                "messages": [{"role": "user", "content": prompt}],
                "max_tokens": max_tokens,
                "temperature": 0,
                "stream": stream,
            }
            if stream:
                body["stream_options"] = {"include_usage": True}
            return body
        body = {"text": prompt, "max_new_tokens": max_tokens, "temperature": 0}
        return {**body, "stream": True} if stream else body  # no field at all: a server without streaming


def _error_text(status: int, body: bytes) -> str:
    text = body.decode("utf-8", "replace").strip().replace("\n", " ")
    return f"HTTP {status}: {text[:200]}"


async def send_request(client: httpx.AsyncClient, target: Target, prompt: str, max_tokens: int) -> RequestResult:
    """One streaming request, timed from just before it is sent. Never raises for server or network errors."""
    start = time.perf_counter()
    result = RequestResult(ok=False, latency_s=0.0)
    try:
        async with client.stream(
            "POST", target.endpoint(), json=target.body(prompt, max_tokens, target.stream), headers=target.headers()
        ) as response:
            if response.status_code != 200:
                result.error = _error_text(response.status_code, await response.aread())
            elif response.headers.get("content-type", "").startswith("text/event-stream"):
                if target.api == "openai":
                    await _parse_openai_stream(iter_sse(response.aiter_lines()), result, start, target.done_marker)
                else:
                    await _parse_spec_stream(iter_sse(response.aiter_lines()), result, start)
            else:  # a server without streaming answers with one JSON body: TTFT is then the whole latency
                _parse_json_body(target.api, json.loads(await response.aread()), result, start)
    except httpx.TimeoutException as error:
        result.error = f"timeout ({type(error).__name__})"
    except httpx.HTTPError as error:
        result.error = f"{type(error).__name__}: {error}"
    except (ValueError, KeyError, TypeError) as error:  # malformed JSON or an unexpected shape
        result.error = f"bad response: {type(error).__name__}: {error}"
    result.latency_s = time.perf_counter() - start
    if not result.error and result.output_tokens <= 0:
        result.error = "no output tokens reported"
    result.ok = not result.error
    return result


def _first_token(result: RequestResult, start: float) -> None:
    if result.ttft_s is None:
        result.ttft_s = time.perf_counter() - start


async def _parse_openai_stream(
    events: AsyncIterator[SseEvent], result: RequestResult, start: float, done_marker: bool = True
) -> None:
    parts: list[str] = []
    usage_tokens: int | None = None
    done = finished = False
    async for event in events:
        if event.data.strip() == "[DONE]":
            done = True
            break
        chunk = json.loads(event.data)
        if event.event == "error" or "error" in chunk:
            result.error = f"stream error: {json.dumps(chunk.get('error', chunk))[:200]}"
            return
        for choice in chunk.get("choices") or []:
            finished = finished or bool(choice.get("finish_reason"))
            content = (choice.get("delta") or {}).get("content")
            if content:
                _first_token(result, start)
                parts.append(content)
                result.chunks += 1
        usage = chunk.get("usage")
        if usage and usage.get("completion_tokens") is not None:
            usage_tokens = int(usage["completion_tokens"])
    result.text = "".join(parts)
    if done_marker and not done:
        result.error = "stream ended without [DONE]"
    elif not done_marker and not (done or finished):  # without the marker, only a finish_reason ends a stream
        result.error = "stream ended without a finish_reason"
    if usage_tokens is not None:
        result.output_tokens, result.token_source = usage_tokens, "usage"
    else:
        result.output_tokens, result.token_source = result.chunks, "chunks"


async def _parse_spec_stream(events: AsyncIterator[SseEvent], result: RequestResult, start: float) -> None:
    parts: list[str] = []
    async for event in events:
        payload = json.loads(event.data)
        if event.event == "error" or ("detail" in payload and "generated_text" not in payload):
            result.error = f"stream error: {json.dumps(payload)[:200]}"
            return
        if "generated_text" in payload:  # the final event: the whole response object
            result.text = payload["generated_text"]
            result.output_tokens, result.token_source = int(payload["output_length"]), "output_length"
            if result.ttft_s is None and result.text:
                _first_token(result, start)
            return
        delta = payload.get("delta")
        if delta:
            _first_token(result, start)
            parts.append(delta)
            result.chunks += 1
    result.text = "".join(parts)
    result.error = "stream ended without the final response object"


def _parse_json_body(api: Api, body: dict[str, Any], result: RequestResult, start: float) -> None:
    _first_token(result, start)
    if api == "openai":
        result.text = body["choices"][0]["message"]["content"] or ""
        result.output_tokens, result.token_source = int(body["usage"]["completion_tokens"]), "usage"
    else:
        result.text = body["generated_text"]
        result.output_tokens, result.token_source = int(body["output_length"]), "output_length"
    result.chunks = 1


# ---------------------------------------------------------------------------------------------------------------
# Peak RSS and CPU time of the server's process tree


class ServerSampler:
    """Samples the resident memory of a process and its children in a thread, and their CPU time at both ends.

    CPU seconds per output token says how much work a server spends per token independently of how busy
    the (shared) machine is, which wall-clock tok/s cannot.
    """

    def __init__(self, pid: int | None, interval_s: float = 0.1) -> None:
        self.pid = pid
        self.interval_s = interval_s
        self.peak_bytes = 0
        self.cpu_start_s = self.cpu_end_s = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _processes(self) -> list[Any]:
        import psutil  # only needed when a PID is known

        try:
            process = psutil.Process(self.pid)
            return [process, *process.children(recursive=True)]
        except psutil.Error:
            return []

    def _rss(self) -> int:
        import psutil

        total = 0
        for process in self._processes():
            with contextlib.suppress(psutil.Error):
                total += process.memory_info().rss
        return total

    def _cpu_s(self) -> float:
        import psutil

        total = 0.0
        for process in self._processes():
            with contextlib.suppress(psutil.Error):
                times = process.cpu_times()
                total += times.user + times.system
        return total

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.peak_bytes = max(self.peak_bytes, self._rss())
            self._stop.wait(self.interval_s)

    def __enter__(self) -> ServerSampler:
        if self.pid is not None:
            self.peak_bytes = self._rss()
            self.cpu_start_s = self._cpu_s()
            self._thread = threading.Thread(target=self._loop, name="server-sampler", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self.cpu_end_s = self._cpu_s()

    @property
    def peak_mb(self) -> float | None:
        return self.peak_bytes / 2**20 if self.pid is not None and self.peak_bytes else None

    @property
    def cpu_s(self) -> float | None:
        return self.cpu_end_s - self.cpu_start_s if self.pid is not None and self.cpu_end_s else None


# ---------------------------------------------------------------------------------------------------------------
# One run: a fixed number of requests at a fixed concurrency


@dataclass
class RunReport:
    label: str
    concurrency: int
    requests: int
    ok: int
    errors: int
    wall_s: float
    requests_per_s: float
    output_tokens: int
    aggregate_tok_s: float
    per_stream_tok_s: float | None  # median over requests of output tokens / latency
    ttft_p50_s: float | None
    ttft_p95_s: float | None
    latency_p50_s: float | None
    latency_p95_s: float | None
    peak_rss_mb: float | None
    server_cpu_s: float | None  # user + system CPU seconds of the server's processes during the run
    cpu_ms_per_token: float | None
    token_source: str
    error_kinds: dict[str, int] = field(default_factory=dict)
    texts: list[str] = field(default_factory=list)


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def summarise(
    label: str,
    concurrency: int,
    results: list[RequestResult],
    wall_s: float,
    peak_rss_mb: float | None,
    server_cpu_s: float | None = None,
) -> RunReport:
    good = [r for r in results if r.ok]
    tokens = sum(r.output_tokens for r in good)
    ttfts = [r.ttft_s for r in good if r.ttft_s is not None]
    latencies = [r.latency_s for r in good]
    streams = [r.output_tokens / r.latency_s for r in good if r.latency_s > 0]
    errors = Counter(r.error.split(":")[0] if r.error.startswith("HTTP") else r.error[:80] for r in results if not r.ok)
    return RunReport(
        label=label,
        concurrency=concurrency,
        requests=len(results),
        ok=len(good),
        errors=len(results) - len(good),
        wall_s=wall_s,
        requests_per_s=len(good) / wall_s if wall_s > 0 else 0.0,
        output_tokens=tokens,
        aggregate_tok_s=tokens / wall_s if wall_s > 0 else 0.0,
        per_stream_tok_s=statistics.median(streams) if streams else None,
        ttft_p50_s=percentile(ttfts, 50),
        ttft_p95_s=percentile(ttfts, 95),
        latency_p50_s=percentile(latencies, 50),
        latency_p95_s=percentile(latencies, 95),
        peak_rss_mb=peak_rss_mb,
        server_cpu_s=server_cpu_s,
        cpu_ms_per_token=1000 * server_cpu_s / tokens if server_cpu_s is not None and tokens else None,
        token_source=",".join(sorted({r.token_source for r in good})) or "-",
        error_kinds=dict(errors),
        texts=[r.text for r in results],
    )


async def run_load(
    target: Target,
    prompts: Sequence[Prompt],
    *,
    concurrency: int,
    requests: int,
    max_tokens: int = 64,
    timeout_s: float = 600.0,
    pid: int | None = None,
    label: str = "",
    stagger_s: float = 0.0,
) -> RunReport:
    """`requests` streaming requests from `concurrency` clients; stops by itself after `timeout_s` at most.

    All clients start at once (a burst, the worst case for TTFT) unless `stagger_s` spreads their first
    requests evenly over that many seconds.

    Request i uses prompt i mod len(prompts). Requests not finished by the deadline count as errors.
    """
    require_loopback(target.base_url)
    if concurrency < 1 or requests < 1:
        raise BenchError("concurrency and requests must be at least 1")
    results: list[RequestResult | None] = [None] * requests
    next_index = iter(range(requests))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    timeout = httpx.Timeout(timeout_s, connect=min(timeout_s, 10.0))

    async def client_loop(client: httpx.AsyncClient, delay_s: float) -> None:
        await asyncio.sleep(delay_s)
        for index in next_index:
            results[index] = await send_request(client, target, prompts[index % len(prompts)].text, max_tokens)

    async with httpx.AsyncClient(limits=limits, timeout=timeout, trust_env=False) as client:
        if target.api == "openai" and target.model is None:
            target.model = await discover_model(client, target)
        with ServerSampler(pid) as sampler:
            start = time.perf_counter()
            clients = min(concurrency, requests)
            tasks = [asyncio.create_task(client_loop(client, k * stagger_s / clients)) for k in range(clients)]
            _done, pending = await asyncio.wait(tasks, timeout=timeout_s)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            wall = time.perf_counter() - start
    final = [r if r is not None else RequestResult(ok=False, latency_s=wall, error="run timeout") for r in results]
    return summarise(label, concurrency, final, wall, sampler.peak_mb, sampler.cpu_s)


async def discover_model(client: httpx.AsyncClient, target: Target) -> str | None:
    """The first model id the server lists at GET /models; None where it lists none (or has no such route)."""
    return (await list_models(client, target))[1]


async def list_models(client: httpx.AsyncClient, target: Target) -> tuple[int | None, str | None]:
    """(GET /models' status, None without an answer; the first model id it lists, or None)."""
    try:
        response = await client.get(f"{target.base_url.rstrip('/')}/models", headers=target.headers())
    except httpx.HTTPError:
        return None, None
    with contextlib.suppress(ValueError, KeyError, IndexError, TypeError):
        if response.status_code == 200:
            return 200, str(response.json()["data"][0]["id"])
    return response.status_code, None


async def wait_ready(target: Target, timeout_s: float, process: subprocess.Popen[bytes] | None = None) -> None:
    """Poll a one-token request until the server answers something other than 503 (or a refused connection)."""
    require_loopback(target.base_url)
    deadline = time.monotonic() + timeout_s
    last = "no answer yet"
    async with httpx.AsyncClient(timeout=httpx.Timeout(60.0, connect=5.0), trust_env=False) as client:
        while time.monotonic() < deadline:
            if process is not None and process.poll() is not None:
                raise BenchError(f"the server exited with code {process.returncode} before it was ready")
            try:
                if target.api == "openai" and target.model is None:
                    status, target.model = await list_models(client, target)
                    if status == 503:  # still loading: a request now would name no model (and get a 404)
                        last = "503 from /models"
                        await asyncio.sleep(0.5)
                        continue
                body = target.body("Hi", 1, stream=False)
                response = await client.post(target.endpoint(), json=body, headers=target.headers())
                if response.status_code == 200:
                    return
                if response.status_code == 404:
                    raise BenchError(
                        f"{target.endpoint()} answered 404: this server has no such route "
                        f"(try --api {'spec' if target.api == 'openai' else 'openai'})"
                    )
                if response.status_code != 503:
                    raise BenchError(f"readiness probe failed: {_error_text(response.status_code, response.content)}")
                last = "503"
            except httpx.TransportError as error:
                last = type(error).__name__
            await asyncio.sleep(0.5)
    raise BenchError(f"the server was not ready within {timeout_s:.0f} s (last: {last})")


# ---------------------------------------------------------------------------------------------------------------
# Starting servers


@dataclass
class ManagedServer:
    """A server process started by the benchmark; stopped (and its process group killed) on exit."""

    name: str
    command: list[str]
    env: dict[str, str]
    port: int
    log_path: Path
    cwd: Path | None = None
    process: subprocess.Popen[bytes] | None = None
    stop_grace_s: float = 20.0  # after SIGINT, before SIGKILL to the process group

    def start(self) -> None:
        log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            self.command,
            cwd=self.cwd,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        log.close()

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, grace_s: float | None = None) -> None:
        process = self.process
        if process is None or process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGINT)
        try:
            process.wait(self.stop_grace_s if grace_s is None else grace_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)


def ours_server(
    engine: str, log_dir: Path, python: str = sys.executable, extra_env: dict[str, str] | None = None
) -> tuple[ManagedServer, str]:
    """(ManagedServer, api key) for our app.py with the embedded model on a free loopback port."""
    port = free_port()
    api_key = "sk-bench-" + secrets.token_urlsafe(16)
    env = {
        **os.environ,
        "MODEL_ID": "embedded",
        "ENGINE": engine,
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "API_KEYS": api_key,
        "LOG_LEVEL": "warning",
        "GRADIO_ANALYTICS_ENABLED": "False",
        **(extra_env or {}),
    }
    env.pop("API_KEYS_FILE", None)
    server = ManagedServer(
        name=f"ours-{engine}",
        command=[python, str(REPO_ROOT / "app.py")],
        env=env,
        port=port,
        log_path=log_dir / f"ours-{engine}-{port}.log",
        cwd=REPO_ROOT,
    )
    return server, api_key


@contextlib.contextmanager
def running(server: ManagedServer, target: Target, ready_timeout_s: float = 300.0) -> Iterator[ManagedServer]:
    """Start `server`, wait until `target` answers, yield, and stop it whatever happens."""
    server.start()
    try:
        try:
            asyncio.run(wait_ready(target, ready_timeout_s, server.process))
        except BenchError as error:
            raise BenchError(
                f"{server.name}: {error}\n--- last lines of {server.log_path} ---\n{server.log_tail()}"
            ) from None
        yield server
    finally:
        server.stop()


def target_for_ours(
    port: int, api: Api, api_key: str, spec_path: str = "/api/v1/generate-text", stream: bool = True
) -> Target:
    base = f"http://127.0.0.1:{port}"
    url = f"{base}/v1" if api == "openai" else base
    return Target(base_url=url, api=api, api_key=api_key, spec_path=spec_path, stream=stream)


# ---------------------------------------------------------------------------------------------------------------
# Reporting

COLUMNS = (
    ("label", "server", "{}"),
    ("concurrency", "conc", "{}"),
    ("requests", "reqs", "{}"),
    ("errors", "err", "{}"),
    ("requests_per_s", "req/s", "{:.2f}"),
    ("aggregate_tok_s", "agg tok/s", "{:.1f}"),
    ("per_stream_tok_s", "stream tok/s", "{:.1f}"),
    ("ttft_p50_s", "TTFT p50", "{:.3f}"),
    ("ttft_p95_s", "TTFT p95", "{:.3f}"),
    ("latency_p50_s", "lat p50", "{:.2f}"),
    ("latency_p95_s", "lat p95", "{:.2f}"),
    ("peak_rss_mb", "peak RSS MB", "{:.0f}"),
    ("cpu_ms_per_token", "CPU ms/tok", "{:.1f}"),
    ("token_source", "tokens from", "{}"),
)


def format_table(reports: Sequence[RunReport]) -> str:
    rows = [[title for _key, title, _fmt in COLUMNS]]
    for report in reports:
        values = asdict(report)
        rows.append(["-" if values[key] is None else fmt.format(values[key]) for key, _title, fmt in COLUMNS])
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    lines = ["  ".join(cell.rjust(width) for cell, width in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    errors = [f"{r.label} c={r.concurrency}: {r.error_kinds}" for r in reports if r.error_kinds]
    return "\n".join(lines + (["errors: " + "; ".join(errors)] if errors else []))


def one_line(report: RunReport) -> str:
    """A progress line for one finished run."""
    values = asdict(report)
    cells = [f"{title}={'-' if values[key] is None else fmt.format(values[key])}" for key, title, fmt in COLUMNS]
    return "  ".join(cells)


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return numerator / denominator


def fmt_ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def summary_ratios(reports: Sequence[RunReport]) -> str:
    """Batched/sequential aggregate tok/s per concurrency, and TTFT p95 at 8 vs single-request TTFT."""
    by = {(r.label, r.concurrency): r for r in reports}
    seq, bat = "ours-sequential", "ours-batched"
    lines = ["", "conc  batched/sequential agg tok/s"]
    for conc in sorted({r.concurrency for r in reports}):
        s, b = by.get((seq, conc)), by.get((bat, conc))
        lines.append(f"{conc:>4}  {fmt_ratio(ratio(b and b.aggregate_tok_s, s and s.aggregate_tok_s))}")
    for label in (seq, bat):
        single, eight = by.get((label, 1)), by.get((label, 8))
        like = ratio(eight and eight.ttft_p95_s, single and single.ttft_p95_s)
        mixed = ratio(eight and eight.ttft_p95_s, single and single.ttft_p50_s)
        lines.append(
            f"{label}: TTFT p95 at 8 / TTFT p95 at 1 (same prompts) = {fmt_ratio(like)}; "
            f"/ TTFT p50 at 1 = {fmt_ratio(mixed)}"
        )
    s8, b8 = by.get((seq, 8)), by.get((bat, 8))
    speedup = ratio(b8 and b8.aggregate_tok_s, s8 and s8.aggregate_tok_s)
    single = by.get((bat, 1))
    # Single-request TTFT depends on the prompt's length (the prompts run from ~40 to ~200 tokens), so the
    # baseline is the same statistic over the same prompts sent one at a time (see requests_for).
    ttft_ratio = ratio(b8 and b8.ttft_p95_s, single and single.ttft_p95_s)
    errors = sum(r.errors for r in reports)

    def verdict(ok: bool | None) -> str:
        return "n/a" if ok is None else ("PASS" if ok else "FAIL")

    lines += [
        "",
        f"target: batched agg tok/s at 8 >= {TARGET_SPEEDUP_AT_8:.0f}x sequential: {fmt_ratio(speedup)} "
        f"{verdict(None if speedup is None else speedup >= TARGET_SPEEDUP_AT_8)}",
        f"target: batched TTFT p95 at 8 <= {TARGET_TTFT_RATIO_AT_8:.0f}x single-request TTFT p95, same prompts: "
        f"{fmt_ratio(ttft_ratio)} "
        f"{verdict(None if ttft_ratio is None else ttft_ratio <= TARGET_TTFT_RATIO_AT_8)}",
        f"target: no errors: {errors} {verdict(errors == 0)}",
    ]
    return "\n".join(lines)


def write_json(path: Path, reports: Sequence[RunReport], meta: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"meta": meta, "runs": [{k: v for k, v in asdict(r).items() if k != "texts"} for r in reports]}
    path.write_text(json.dumps(payload, indent=2), encoding="utf-8")


# ---------------------------------------------------------------------------------------------------------------
# Command line


def requests_for(concurrency: int, args: argparse.Namespace) -> int:
    if args.requests:
        return args.requests
    if getattr(args, "summary", False) and concurrency == 1:
        # The single-client run is the TTFT baseline for the 8-client run: it sends the same prompts (request i
        # uses prompt i mod N), so the TTFTs compare like with like and not short prompts with long ones.
        concurrency = 8
    return max(args.min_requests, concurrency * args.requests_per_client)


def run_series(
    target: Target, prompts: Sequence[Prompt], args: argparse.Namespace, label: str, pid: int | None
) -> list[RunReport]:
    """Warm-up requests (not measured), then one run per concurrency level, each printed as it finishes."""
    reports: list[RunReport] = []
    if args.warmup:
        warm = asyncio.run(
            run_load(target, prompts, concurrency=1, requests=args.warmup, max_tokens=args.max_tokens, timeout_s=120)
        )
        if warm.errors:
            print(f"[{label}] warm-up errors: {warm.error_kinds}", file=sys.stderr)
    for concurrency in args.concurrency:
        report = asyncio.run(
            run_load(
                target,
                prompts,
                concurrency=concurrency,
                requests=requests_for(concurrency, args),
                max_tokens=args.max_tokens,
                timeout_s=args.timeout,
                pid=pid,
                label=label,
                stagger_s=args.stagger,
            )
        )
        print(one_line(report), flush=True)
        reports.append(report)
    return reports


def run_ours(engine: str, args: argparse.Namespace, prompts: Sequence[Prompt], log_dir: Path) -> list[RunReport]:
    server, key = ours_server(engine, log_dir, python=args.python, extra_env=dict(args.env))
    target = target_for_ours(server.port, args.api, key, args.spec_path, not args.no_stream)
    print(f"[ours-{engine}] starting on 127.0.0.1:{server.port} (log {server.log_path})", file=sys.stderr, flush=True)
    with running(server, target, args.ready_timeout):
        return run_series(target, prompts, args, f"ours-{engine}", server.pid)


def parse_env(item: str) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {item!r}")
    return key, value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="base URL of a running server: http://127.0.0.1:PORT/v1 (openai) or .../ (spec)")
    where.add_argument("--start-ours", action="store_true", help="start our app.py (MODEL_ID=embedded) here")
    where.add_argument("--summary", action="store_true", help="concurrency 1,4,8,16 x ENGINE=sequential,batched")
    parser.add_argument("--api", choices=["openai", "spec"], default="openai", help="wire format (default openai)")
    parser.add_argument("--api-key", default=os.environ.get("BENCH_API_KEY"), help="Bearer key (or BENCH_API_KEY)")
    parser.add_argument("--model", help="OpenAI `model` field (default: first id of GET /models)")
    parser.add_argument("--spec-path", default="/api/v1/generate-text", help="documented endpoint for --api spec")
    parser.add_argument("--no-stream", action="store_true", help="non-streaming requests (TTFT = latency)")
    parser.add_argument("--pid", type=int, help="PID of the --url server, for its peak RSS")
    parser.add_argument("--label", help="name of the --url server in the table")
    parser.add_argument("--engine", default="batched", help="ENGINE for --start-ours (sequential|batched)")
    parser.add_argument("--env", type=parse_env, action="append", default=[], help="extra KEY=VALUE for our server")
    parser.add_argument("--python", default=sys.executable, help="interpreter that runs our app.py")
    add_run_arguments(parser)
    return parser


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of a series of runs, shared with bench/baselines.py."""
    parser.add_argument("-c", "--concurrency", type=int, nargs="+", help="concurrent clients, one run each")
    parser.add_argument("-n", "--requests", type=int, help="requests per run (default: clients x per-client)")
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--min-requests", type=int, default=4, help="fewest requests per run (default 4)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument(
        "--stagger", type=float, default=0.0, help="spread the clients' first requests over S seconds (default 0)"
    )
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured requests before the runs (default 1)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds each run may take at most")
    parser.add_argument("--ready-timeout", type=float, default=300.0, help="seconds a started server may take")
    parser.add_argument("--prompts", type=Path, default=DEFAULT_PROMPTS)
    parser.add_argument("--json", type=Path, help="also write the results as JSON here (e.g. bench/results/x.json)")


def exit_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit, so the servers this process started are stopped on the way out."""

    def handler(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    exit_on_sigterm()
    prompts = load_prompts(args.prompts)
    log_dir = Path(tempfile.mkdtemp(prefix="bench-logs-"))
    reports: list[RunReport] = []
    try:
        if args.summary:
            args.concurrency = args.concurrency or list(SUMMARY_CONCURRENCY)
            for engine in SUMMARY_ENGINES:
                try:
                    reports += run_ours(engine, args, prompts, log_dir)
                except BenchError as error:
                    print(f"[ours-{engine}] skipped: {error}", file=sys.stderr)
            print("\n" + format_table(reports) + "\n" + summary_ratios(reports))
        elif args.start_ours:
            args.concurrency = args.concurrency or [1, 8]
            reports = run_ours(args.engine, args, prompts, log_dir)
            print("\n" + format_table(reports))
        else:
            require_loopback(args.url)
            args.concurrency = args.concurrency or [1, 8]
            target = Target(args.url, api=args.api, api_key=args.api_key, model=args.model, spec_path=args.spec_path)
            target.stream = not args.no_stream
            asyncio.run(wait_ready(target, args.ready_timeout))
            reports = run_series(target, prompts, args, args.label or urlsplit(args.url).netloc, args.pid)
            print("\n" + format_table(reports))
    except BenchError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.json:
        meta = {"argv": list(argv if argv is not None else sys.argv[1:]), "max_tokens": args.max_tokens}
        write_json(args.json, reports, meta)
    return 0 if reports and all(r.errors == 0 for r in reports) else 1


if __name__ == "__main__":
    sys.exit(main())
