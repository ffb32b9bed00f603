"""Soak: N clients (default 12) for --minutes (default 30) of mixed features and failures, then checks (issue 28).

Starts our server (embedded model, ENGINE=batched) or drives a running one (--url). Each client sends, back to back,
the weighted mix of WEIGHTS: chat, streamed chat, structured output, forced tool calls, logprobs, penalties,
/v1/completions with a prompt list, the documented routes, /v1/responses, /v1/messages (all but plain chat streamed
half the time), hang-ups (closed after a stream's third event), bad bodies (4xx expected), wrong keys (401), with
max_tokens 8-24: mostly request churn. The checks (exit code 1 when one fails, 2 when the soak cannot run) are
explained in docs/operations.md#soak.

    .venv/bin/python bench/soak.py --minutes 30 --fill docs/operations.md
    .venv/bin/python bench/soak.py --url http://127.0.0.1:8000 --api-key KEY --pid 1234 --minutes 5 --json x.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import statistics
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import loadgen as lg

MARK_BEGIN, MARK_END = "<!-- soak:begin -->", "<!-- soak:end -->"
MODEL = "sahabat-ai"
CHAT, COMPLETIONS, RESPONSES, MESSAGES = "/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/messages"
SPEC_ROUTES = ("/api/v1/generate-text", "/api/v1/chat")
API_ROUTES = (CHAT, COMPLETIONS, RESPONSES, MESSAGES, *SPEC_ROUTES)
WEIGHTS = {  # kind -> share of the requests
    "chat": 2, "chat_stream": 3, "structured": 1, "tools": 1, "logprobs": 1, "penalties": 1, "completions_list": 1,
    "spec": 1, "responses": 1, "messages": 1, "hangup": 1, "bad_body": 1, "wrong_key": 1,
}  # fmt: skip
SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
TOOL = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city.", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 12}}}}}  # fmt: skip
TOOL_NAME = {"name": "get_weather"}
OPENAI = (CHAT, COMPLETIONS)
ENDS = ("complete", "message_stop", "response.completed", "response.incomplete")
HANGUP_AFTER_EVENTS = 3
BUSY_IN_STREAM = re.compile(r'QUEUE_TIMEOUT|service_unavailable|overloaded_error|"status": 503')
BAD_BODIES = (b'{"messages": [', b"not json at all", b'{"text": 5, "messages": "hi", "max_tokens": "ten"}', b"[]")


@dataclass
class Call:
    kind: str
    route: str
    body: dict[str, Any] | bytes
    expect: int = 200  # 200, 400 (any 4xx but 401) or 401
    stream: bool = False
    count: int = 0  # top_logprobs (logprobs), prompts (completions_list)


def check_answer(call: Call, answer: Any) -> str:
    """What is wrong with a 200 (its JSON body, or a stream's events: a hang-up's may stop anywhere); "" if nothing."""
    if call.stream:
        last = answer[-1] if answer else None
        if (call.kind == "hangup" and answer) or (last and (last.data.strip() == "[DONE]" or last.event in ENDS)):
            return ""
        if last and BUSY_IN_STREAM.search(last.data):  # queued, then past QUEUE_TIMEOUT: the stream's 503
            return f"busy in the stream: {last.data[:120]}"
        return f"stream ended with {last and last.event}: {last and last.data[:120]}"
    if call.route != CHAT:
        key = {COMPLETIONS: "choices", RESPONSES: "output", MESSAGES: "content"}.get(call.route, "generated_text")
        if call.route == COMPLETIONS and sorted(c["index"] for c in answer["choices"]) != list(range(call.count)):
            return f"choices {[c['index'] for c in answer['choices']]} for {call.count} prompts"
        return "" if key in answer else f"no `{key}` in the answer"
    choice = answer["choices"][0]
    message, finish = choice["message"], choice["finish_reason"]
    if call.kind == "structured" and finish == "stop" and not isinstance(json.loads(message["content"])["ok"], bool):
        return "JSON without a boolean `ok`"
    if call.kind == "tools" and finish != "length":
        calls = message.get("tool_calls") or [{"function": {"name": None}}]
        if finish != "tool_calls" or calls[0]["function"]["name"] != "get_weather":
            return f"no forced call: finish_reason {finish}"
        return "" if isinstance(json.loads(calls[0]["function"]["arguments"]), dict) else "arguments not an object"
    if call.kind == "logprobs":
        content, tokens = choice["logprobs"]["content"], answer["usage"]["completion_tokens"]
        if len(content) != tokens or any(len(t["top_logprobs"]) != call.count for t in content):
            return f"{len(content)} logprobs for {tokens} tokens, top_logprobs {call.count}"
    return "" if call.kind == "tools" or isinstance(message["content"], str) else "no message.content"


def make_call(kind: str, rng: random.Random, prompt: str) -> Call:
    """The request of one `kind` (see WEIGHTS); all but `chat` streamed half the time (`chat_stream` always)."""
    tokens = rng.randint(8, 24)
    messages = [{"role": "user", "content": prompt}]
    chat = {"model": MODEL, "messages": messages, "max_tokens": tokens, "temperature": 0}
    route, body, count = CHAT, chat, 0
    if kind == "structured":
        fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA, "strict": True}}
        body = {**chat, "response_format": fmt}
    elif kind == "tools":
        body = {**chat, "max_tokens": 40, "tools": [TOOL], "tool_choice": {"type": "function", "function": TOOL_NAME}}
    elif kind == "logprobs":
        count = rng.randint(0, 5)
        body = {**chat, "logprobs": True, "top_logprobs": count}
    elif kind == "penalties":
        extra = {"presence_penalty": 0.5, "frequency_penalty": 0.7, "repetition_penalty": 1.2, "temperature": 0.8}
        body = {**chat, **extra, "seed": rng.randrange(2**31)}
    elif kind == "completions_list":
        prompts = [prompt[: rng.randint(20, 80)] for _ in range(rng.randint(2, 4))]
        route, count = COMPLETIONS, len(prompts)
        body = {"model": MODEL, "prompt": prompts, "max_tokens": tokens, "temperature": 0}
    elif kind == "spec":
        route, body = rng.choice(SPEC_ROUTES), {"text": prompt, "max_new_tokens": tokens, "temperature": 0}
    elif kind == "responses":
        route, body = RESPONSES, {"model": MODEL, "input": prompt, "max_output_tokens": tokens, "temperature": 0}
    elif kind == "messages":
        route = MESSAGES
    elif kind == "hangup":  # closed after its third event: the generation is running by then
        return Call(kind, CHAT, {**chat, "max_tokens": 64, "stream": True}, stream=True)
    elif kind in ("bad_body", "wrong_key"):
        bad = kind == "bad_body"
        return Call(kind, rng.choice(API_ROUTES), rng.choice(BAD_BODIES) if bad else chat, 400 if bad else 401)
    stream = kind == "chat_stream" or (kind != "chat" and rng.random() < 0.5)
    if stream:
        body = {**body, "stream": True} | ({"stream_options": {"include_usage": True}} if route in OPENAI else {})
    return Call(kind, route, body, stream=stream, count=count)


@dataclass
class Outcome:
    kind: str
    route: str
    status: int | None  # None: no status line (hang, transport error)
    result: str  # ok | busy | unexpected_5xx | unexpected_status | bad_response | hang | transport
    latency_s: float
    detail: str = ""


async def send(client: httpx.AsyncClient, base: str, key: str, call: Call, timeout_s: float) -> Outcome:
    """One request; never raises for a server or network error. A hang is one that outlives `timeout_s`."""
    used_key = "sk-soak-wrong-key" if call.expect == 401 else key
    headers = {"Authorization": f"Bearer {used_key}", "Content-Type": "application/json"}
    content = call.body if isinstance(call.body, bytes) else json.dumps(call.body).encode()
    start, status, retry_after, problem = time.perf_counter(), None, None, ""
    try:
        async with asyncio.timeout(timeout_s):
            async with client.stream("POST", base + call.route, content=content, headers=headers) as response:
                status, retry_after = response.status_code, response.headers.get("retry-after")
                if status == 200 and call.stream:
                    events = []
                    async for event in lg.iter_sse(response.aiter_lines()):
                        events.append(event)
                        if call.kind == "hangup" and len(events) >= HANGUP_AFTER_EVENTS:
                            break
                    problem = check_answer(call, events)
                else:
                    raw = await response.aread()
                    problem = check_answer(call, json.loads(raw)) if status == 200 else raw.decode("utf-8", "replace")
    except (TimeoutError, httpx.TimeoutException):
        return Outcome(call.kind, call.route, status, "hang", time.perf_counter() - start, f"status {status}")
    except httpx.HTTPError as error:
        return Outcome(call.kind, call.route, status, "transport", time.perf_counter() - start, repr(error)[:200])
    except (ValueError, KeyError, TypeError, IndexError) as error:
        problem = f"{type(error).__name__}: {error}"
    latency = time.perf_counter() - start
    return Outcome(call.kind, call.route, status, classify(call, status, retry_after, problem), latency, problem[:200])


def classify(call: Call, status: int | None, retry_after: str | None, problem: str) -> str:
    if (status == 503 and call.expect == 200 and retry_after) or problem.startswith("busy in the stream"):
        return "busy"
    if status is not None and status >= 500:
        return "unexpected_5xx"
    if status == 200 == call.expect:
        return "bad_response" if problem else "ok"
    any_4xx = call.expect == 400 and status is not None and 400 <= status < 500 and status != 401
    return "ok" if any_4xx or status == call.expect != 200 else "unexpected_status"


async def client_loop(index: int, client: httpx.AsyncClient, state: SoakState, out: list[Outcome]) -> None:
    rng = random.Random(state.seed * 1000 + index)
    kinds, weights = list(WEIGHTS), list(WEIGHTS.values())
    while time.monotonic() < state.deadline:
        call = make_call(rng.choices(kinds, weights)[0], rng, rng.choice(state.prompts))
        out.append(await send(client, state.base, state.key, call, state.request_timeout_s))


SAMPLE = re.compile(r"^(\w+)(?:\{(.*)\})?\s+(\S+)$")
RSS_GAUGE = "process_resident_memory_bytes"
LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def parse_metrics(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    samples = {}
    for line in text.splitlines():
        match = SAMPLE.match(line)
        if match and not line.startswith("#"):
            labels = tuple(sorted(LABEL.findall(match.group(2) or "")))
            samples[(match.group(1), labels)] = float(match.group(3))
    return samples


async def scrape(client: httpx.AsyncClient, base: str, key: str) -> dict[tuple[str, tuple], float]:
    response = await client.get(f"{base}/metrics", headers={"Authorization": f"Bearer {key}"})
    response.raise_for_status()
    return parse_metrics(response.text)


def request_counts(samples: dict[tuple[str, tuple], float]) -> Counter[tuple[str, int]]:
    counts: Counter[tuple[str, int]] = Counter()
    for (name, labels), value in samples.items():
        tags = dict(labels)
        if name == "sahabat_http_requests_total" and tags.get("method") == "POST" and tags["route"] in API_ROUTES:
            counts[(tags["route"], int(tags["status"]))] += int(value)
    return counts


def rss_mb(pid: int) -> float:
    """Resident MB of the process and its children (0 once it is gone)."""
    import psutil

    try:
        process = psutil.Process(pid)
        return sum(p.memory_info().rss for p in (process, *process.children(recursive=True))) / 2**20
    except psutil.Error:
        return 0.0


async def sample_rss(client: httpx.AsyncClient, state: SoakState, samples: list[tuple[float, float]]) -> None:
    """(seconds since the load began, RSS MB) every interval: psutil on --pid, else the server's own gauge."""
    while True:
        value = 0.0
        if state.pid is not None:
            value = await asyncio.to_thread(rss_mb, state.pid)
        with contextlib.suppress(httpx.HTTPError):
            value = value or ((await scrape(client, state.base, state.key)).get((RSS_GAUGE, ())) or 0) / 2**20
        samples.append((time.monotonic() - state.started, value))
        await asyncio.sleep(state.rss_interval_s)


async def wait_drained(client: httpx.AsyncClient, state: SoakState, timeout_s: float) -> dict[str, Any]:
    """Seconds until /metrics shows 0 running and 0 queued (and /health answers 200), or the last values."""
    start, last = time.monotonic(), {}
    while True:
        with contextlib.suppress(httpx.HTTPError):
            samples = await scrape(client, state.base, state.key)
            names = {"running": "sahabat_engine_running_requests", "queued": "sahabat_engine_queue_depth"}
            last = {key: samples.get((name, ())) for key, name in names.items()}
            last["health"] = (await client.get(f"{state.base}/health")).status_code
            if last["running"] == 0 and last["queued"] == 0 and last["health"] == 200:
                return {**last, "drained": True, "after_s": round(time.monotonic() - start, 2)}
        if time.monotonic() - start > timeout_s:
            return {**last, "drained": False, "after_s": round(time.monotonic() - start, 2)}
        await asyncio.sleep(0.25)


@dataclass
class SoakState:
    base: str
    key: str
    pid: int | None
    prompts: list[str]
    seed: int
    request_timeout_s: float
    rss_interval_s: float
    started: float = 0.0
    deadline: float = 0.0


@dataclass
class SoakRun:
    outcomes: list[Outcome]
    wall_s: float
    rss: list[tuple[float, float]]
    before: Counter[tuple[str, int]]
    after: Counter[tuple[str, int]]
    generations: dict[str, float]
    drain: dict[str, Any]
    warmup_problems: list[str]


async def soak(state: SoakState, clients: int, minutes: float, drain_timeout_s: float) -> SoakRun:
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    timeout = httpx.Timeout(state.request_timeout_s + 30, connect=10.0)
    async with httpx.AsyncClient(limits=limits, timeout=timeout, trust_env=False) as client:
        rng = random.Random(state.seed)
        warm = [await send(client, state.base, state.key, make_call(k, rng, state.prompts[0]), 120) for k in WEIGHTS]
        before_samples = await scrape(client, state.base, state.key)
        outcomes, rss = [], []  # Outcome; (seconds, MB)
        state.started = time.monotonic()
        state.deadline = state.started + minutes * 60
        sampler = asyncio.create_task(sample_rss(client, state, rss))
        await asyncio.gather(*(client_loop(i, client, state, outcomes) for i in range(clients)))
        wall = time.monotonic() - state.started
        sampler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampler
        drain = await wait_drained(client, state, drain_timeout_s)
        for _ in range(20):  # a hung-up stream is counted when its handler returns, maybe after the drain
            after_samples = await scrape(client, state.base, state.key)
            if (request_counts(after_samples) - request_counts(before_samples)).total() >= len(outcomes):
                break
            await asyncio.sleep(0.25)
    generations = defaultdict(float)
    for (name, labels), value in after_samples.items():
        if name == "sahabat_generations_total":
            generations[dict(labels)["finish_reason"]] += value - before_samples.get((name, labels), 0.0)
    problems = [f"{o.kind}: {o.result} {o.status} {o.detail}" for o in warm if o.result not in ("ok", "busy")]
    return SoakRun(
        outcomes, wall, rss, request_counts(before_samples), request_counts(after_samples), dict(generations), drain,
        problems,
    )  # fmt: skip


def metrics_check(run: SoakRun) -> tuple[bool, str]:
    """Server delta per (route, status) against the client's counts. Requests the client saw no status for (hangs,
    transport errors) may be counted by the server under any status of their route: that much surplus is explained."""
    server = +Counter({k: run.after[k] - run.before.get(k, 0) for k in run.after})
    client = Counter((o.route, o.status) for o in run.outcomes if o.status is not None)
    unknown = Counter(o.route for o in run.outcomes if o.status is None)
    problems, explained = [], []
    surplus: Counter[str] = Counter()
    for key in sorted(set(server) | set(client)):
        diff = server[key] - client[key]
        if diff < 0:
            problems.append(f"{key[0]} {key[1]}: server {server[key]} < client {client[key]}")
        elif diff > 0:
            surplus[key[0]] += diff
    for route, extra in sorted(surplus.items()):
        note = f"{route}: server +{extra} (client saw no status for {unknown[route]})"
        (explained if extra <= unknown[route] else problems).append(note)
    detail = f"{server.total()} counted by the server, {client.total()} answered to the client"
    return not problems, "; ".join([detail, *problems, *explained])


def rss_check(rss: list[tuple[float, float]], wall_s: float, limit_mb: float) -> tuple[bool, str]:
    half = [(t, v) for t, v in rss if t >= wall_s / 2 and v > 0]
    if len(half) < 3:
        return False, f"only {len(half)} RSS samples in the second half"
    times, values = [t for t, _ in half], [v for _, v in half]
    slope = statistics.linear_regression(times, values).slope  # MB per second
    growth = slope * (times[-1] - times[0])
    detail = (
        f"second half {min(values):.0f}-{max(values):.0f} MB ({len(values)} samples, max-min "
        f"{max(values) - min(values):.1f} MB), fitted growth {growth:+.1f} MB (limit {limit_mb:.0f} MB)"
    )
    return growth <= limit_mb, detail


def evaluate(run: SoakRun, args: argparse.Namespace, alive: bool) -> list[tuple[str, bool, str]]:
    outs = run.outcomes
    hangs = [o for o in outs if o.result == "hang"]
    fives = [o for o in outs if o.result == "unexpected_5xx"]
    wrong = [o for o in outs if o.result in ("unexpected_status", "bad_response", "transport")]
    metrics_ok, metrics_detail = metrics_check(run)
    rss_ok, rss_detail = rss_check(run.rss, run.wall_s, args.rss_growth_mb)
    drain = run.drain
    drained = f"running {drain.get('running')}, queued {drain.get('queued')}, /health {drain.get('health')}"
    listed = "; ".join(f"{o.kind} {o.route} {o.status}: {o.detail[:100]}" for o in fives[:10])
    return [
        ("no hang", not hangs, f"{len(hangs)} of {len(outs)} outlived the {args.request_timeout:.0f} s timeout"),
        ("no unexpected 5xx", not fives, f"{len(fives)}" + (f": {listed}" if listed else "")),
        ("expected answers", not wrong, f"{len(wrong)} wrong status, body or connection"),
        ("/metrics counts", metrics_ok, metrics_detail),
        ("RSS flat", rss_ok, rss_detail),
        ("drained", bool(drain.get("drained")), f"{drained} after {drain.get('after_s')} s"),
        ("server alive", alive, "the process still runs" if alive else "the server process exited"),
    ]


def kind_rows(outs: list[Outcome]) -> list[dict[str, Any]]:
    rows = []
    for kind in WEIGHTS:
        mine = [o for o in outs if o.kind == kind]
        results = Counter(o.result for o in mine)
        in_stream = [o for o in mine if o.result == "busy" and o.status == 200]
        latencies = [o.latency_s for o in mine if o.result == "ok"]
        statuses = Counter("-" if o.status is None else str(o.status) for o in mine)
        rows.append({
            "kind": kind, "requests": len(mine), "ok": results["ok"], "busy_503": results["busy"] - len(in_stream),
            "busy_in_stream": len(in_stream),
            "unexpected_5xx": results["unexpected_5xx"], "hangs": results["hang"],
            "other_failures": results["unexpected_status"] + results["bad_response"] + results["transport"],
            "p50_s": lg.percentile(latencies, 50), "p95_s": lg.percentile(latencies, 95),
            "statuses": " ".join(f"{s}:{n}" for s, n in sorted(statuses.items())),
        })  # fmt: skip
    return rows


def cell(value: Any) -> str:
    return "-" if value is None else f"{value:.2f}" if isinstance(value, float) else str(value)


def text_report(run: SoakRun, rows: list[dict[str, Any]], checks: list[tuple[str, bool, str]], meta: str) -> str:
    table = [list(rows[0])] + [[cell(value) for value in row.values()] for row in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(rows[0]))]
    lines = [meta, ""] + ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in table]
    problems = [o for o in run.outcomes if o.result not in ("ok", "busy")]
    lines += ["", f"generations by finish_reason: {run.generations}"]
    lines += [f"warm-up problem: {p}" for p in run.warmup_problems]
    lines += [f"failure: {o.kind} {o.route} {o.status} {o.result}: {o.detail[:160]}" for o in problems[:20]]
    lines += ["", "checks:"] + [f"  {'PASS' if ok else 'FAIL'}  {name}: {detail}" for name, ok, detail in checks]
    return "\n".join(lines)


def markdown_report(rows: list[dict[str, Any]], checks: list[tuple[str, bool, str]], meta: str) -> str:
    lines = [meta, "", "| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    lines += ["| " + " | ".join(cell(value) for value in row.values()) + " |" for row in rows]
    lines += ["", "| check | result | detail |", "|---|---|---|"]
    lines += [f"| {name} | {'PASS' if ok else 'FAIL'} | {detail.replace('|', '/')} |" for name, ok, detail in checks]
    return "\n".join(lines)


def fill_file(path: Path, table: str) -> None:
    text = path.read_text(encoding="utf-8")
    begin, end = text.find(MARK_BEGIN), text.find(MARK_END)
    if begin < 0 or end < begin:
        raise lg.BenchError(f"{path} has no {MARK_BEGIN} ... {MARK_END} markers to fill")
    path.write_text(text[: begin + len(MARK_BEGIN)] + "\n" + table + "\n" + text[end:], encoding="utf-8")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="a running server's base URL (http://127.0.0.1:PORT); default: start ours")
    parser.add_argument("--api-key", default=os.environ.get("BENCH_API_KEY"), help="its key (or BENCH_API_KEY)")
    parser.add_argument("--pid", type=int, help="its PID, for psutil's RSS (else the server's own RSS gauge)")
    parser.add_argument("--engine", default="batched", help="ENGINE of the server started here (default batched)")
    parser.add_argument("--env", type=lg.parse_env, action="append", default=[], help="extra KEY=VALUE for our server")
    parser.add_argument("--minutes", type=float, default=30.0, help="how long the load runs (default 30)")
    parser.add_argument("--clients", type=int, default=12, help="concurrent clients (default 12)")
    parser.add_argument("--request-timeout", type=float, default=120.0, help="a request longer than this hangs")
    parser.add_argument("--rss-interval", type=float, default=5.0, help="seconds between RSS samples (default 5)")
    parser.add_argument("--rss-growth-mb", type=float, default=64.0, help="RSS growth allowed over the second half")
    parser.add_argument("--drain-timeout", type=float, default=10.0, help="seconds to reach 0 running, 0 queued")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="write the results as JSON here")
    parser.add_argument("--markdown", type=Path, help="write the markdown tables here")
    parser.add_argument("--fill", type=Path, help=f"replace the text between {MARK_BEGIN} and {MARK_END} here")
    return parser


def run_soak(args: argparse.Namespace, base: str, key: str, pid: int | None, alive: Callable[[], bool]) -> int:
    prompts = [p.text for p in lg.load_prompts()]
    state = SoakState(base, key, pid, prompts, args.seed, args.request_timeout, args.rss_interval)
    print(f"soak: {args.clients} clients for {args.minutes:g} min against {base}", file=sys.stderr, flush=True)
    run = asyncio.run(soak(state, args.clients, args.minutes, args.drain_timeout))
    rows, checks = kind_rows(run.outcomes), evaluate(run, args, alive())
    meta = (
        f"soak {time.strftime('%Y-%m-%d')}: {args.clients} clients, {run.wall_s / 60:.1f} min, "
        f"{len(run.outcomes)} requests ({len(run.outcomes) / run.wall_s:.1f}/s), max_tokens 8-24, "
        f"{'all checks passed' if all(ok for _, ok, _ in checks) else 'CHECKS FAILED'}"
    )
    print(text_report(run, rows, checks, meta))
    markdown = markdown_report(rows, checks, meta)
    if args.markdown:
        args.markdown.write_text(markdown + "\n", encoding="utf-8")
    if args.fill:
        fill_file(args.fill, markdown)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {"meta": meta, "kinds": rows, "checks": [{"name": n, "ok": ok, "detail": d} for n, ok, d in checks]}
        payload |= {"drain": run.drain, "generations": run.generations, "rss": run.rss}
        payload["failures"] = [asdict(o) for o in run.outcomes if o.result not in ("ok", "busy")]
        args.json.write_text(json.dumps(payload, indent=2), encoding="utf-8")
    return 0 if all(ok for _, ok, _ in checks) else 1


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    lg.exit_on_sigterm()
    try:
        if args.url:
            lg.require_loopback(args.url)
            if not args.api_key:
                raise lg.BenchError("--url needs --api-key (or BENCH_API_KEY)")
            return run_soak(args, args.url.rstrip("/"), args.api_key, args.pid, lambda: True)
        server, key = lg.ours_server(args.engine, Path(tempfile.mkdtemp(prefix="soak-")), extra_env=dict(args.env))
        print(f"starting our server on 127.0.0.1:{server.port} (log {server.log_path})", file=sys.stderr, flush=True)
        with lg.running(server, lg.Target(f"http://127.0.0.1:{server.port}/v1", api_key=key, model=MODEL)):
            alive = lambda: server.process is not None and server.process.poll() is None  # noqa: E731
            code = run_soak(args, f"http://127.0.0.1:{server.port}", key, server.pid, alive)
        if code:
            print(f"--- last lines of {server.log_path} ---\n{server.log_tail(30)}", file=sys.stderr)
        return code
    except lg.BenchError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
