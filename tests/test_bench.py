"""The load generator (bench/loadgen.py) against real loopback servers, so the script cannot rot.

Our real server (conftest's live_server: sequential engine, embedded model, free loopback port), driven
over HTTP by 2 concurrent streaming clients on both APIs; plus a tiny fake server that streams the OpenAI
and documented SSE formats with token counts that differ from the chunk counts, to check that tokens come
from the server's usage.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from bench import loadgen
from tests.helpers import API_KEY, LiveServer

PROMPTS = [loadgen.Prompt("id", "Apa ibu kota Indonesia?"), loadgen.Prompt("en", "Name a large island.")]


@contextmanager
def serving(app: Any) -> Iterator[int]:
    """Serve an ASGI app with uvicorn on a free loopback port in a thread; yields the port."""
    port = loadgen.free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(30)


def run(
    target: loadgen.Target, concurrency: int, requests: int, max_tokens: int = 4, pid: int | None = None
) -> loadgen.RunReport:
    return asyncio.run(
        loadgen.run_load(
            target, PROMPTS, concurrency=concurrency, requests=requests, max_tokens=max_tokens, timeout_s=120, pid=pid
        )
    )


# --- our real server ----------------------------------------------------------------------------------------------


def _port(live_server: LiveServer) -> int:
    port = urlsplit(live_server.base_url).port
    assert port is not None
    return port


def test_loadgen_against_our_openai_endpoint(live_server: LiveServer) -> None:
    target = loadgen.target_for_ours(_port(live_server), "openai", API_KEY)
    report = run(target, concurrency=2, requests=2, pid=os.getpid())  # the live server runs in this process
    assert report.errors == 0, report.error_kinds
    assert report.ok == 2
    assert report.token_source == "usage"
    assert 2 <= report.output_tokens <= 8  # 1..4 tokens each, as the server counted them
    assert all(report.texts)
    assert report.aggregate_tok_s > 0 and report.requests_per_s > 0 and report.per_stream_tok_s
    assert report.ttft_p50_s is not None and report.latency_p50_s is not None
    assert report.ttft_p50_s <= report.latency_p50_s
    assert report.peak_rss_mb is not None and report.peak_rss_mb > 100  # the model is in this process
    assert report.cpu_ms_per_token is not None and report.cpu_ms_per_token > 0


def test_loadgen_against_our_documented_endpoint(live_server: LiveServer) -> None:
    target = loadgen.target_for_ours(_port(live_server), "spec", API_KEY, spec_path="/api/v1/chat")
    report = run(target, concurrency=2, requests=2)
    assert report.errors == 0, report.error_kinds
    assert report.token_source == "output_length"
    assert 2 <= report.output_tokens <= 8
    assert all(report.texts)
    assert report.ttft_p95_s is not None and report.latency_p95_s is not None
    assert report.ttft_p95_s <= report.latency_p95_s


def test_readiness_probe_and_wrong_key(live_server: LiveServer) -> None:
    port = _port(live_server)
    asyncio.run(loadgen.wait_ready(loadgen.target_for_ours(port, "openai", API_KEY), timeout_s=30))
    report = run(loadgen.target_for_ours(port, "openai", "wrong-key"), concurrency=1, requests=1)
    assert report.errors == 1 and report.error_kinds == {"HTTP 401": 1}


# --- a fake server for the wire formats ---------------------------------------------------------------------------

FAKE_PIECES = ["Ja", "kar", "ta."]
FAKE_TOKENS = 5  # deliberately not the number of chunks


def _sse(payload: Any, event: str | None = None) -> str:
    import json

    head = f"event: {event}\n" if event else ""
    return f"{head}data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


def fake_app() -> Starlette:

    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [{"id": "fake-model", "object": "model"}]})

    async def chat_completions(request: Request) -> Response:
        body = await request.json()
        assert body["model"] == "fake-model" and body["temperature"] == 0
        if not body.get("stream"):
            message = {"role": "assistant", "content": "".join(FAKE_PIECES)}
            usage = {"prompt_tokens": 3, "completion_tokens": FAKE_TOKENS, "total_tokens": 8}
            return JSONResponse({"choices": [{"index": 0, "message": message}], "usage": usage})
        assert body["stream_options"] == {"include_usage": True}
        # "no-done": as `transformers serve` streams (finish_reason and usage in the last chunk, no [DONE]);
        # "cut": a stream that stops after its content (neither finish_reason nor [DONE]).
        mode = body["messages"][0]["content"]

        async def events() -> AsyncIterator[str]:
            base = {"id": "c1", "object": "chat.completion.chunk", "model": "fake-model"}
            yield _sse({**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
            for piece in FAKE_PIECES:
                await asyncio.sleep(0.01)
                yield _sse({**base, "choices": [{"index": 0, "delta": {"content": piece}}]})
            if mode == "cut":
                return
            usage = {"prompt_tokens": 3, "completion_tokens": FAKE_TOKENS, "total_tokens": 8}
            if mode == "no-done":
                yield _sse({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "length"}], "usage": usage})
                return
            yield _sse({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]})
            yield _sse({**base, "choices": [], "usage": usage})
            yield _sse("[DONE]")

        return StreamingResponse(events(), media_type="text/event-stream")

    async def generate_text(request: Request) -> Response:
        body = await request.json()
        if body["text"] == "busy":
            return JSONResponse({"detail": "busy"}, 503, headers={"Retry-After": "1"})

        async def events() -> AsyncIterator[str]:
            for piece in FAKE_PIECES:
                await asyncio.sleep(0.01)
                yield _sse({"delta": piece})
            final = {"generated_text": "".join(FAKE_PIECES), "output_length": FAKE_TOKENS, "input_length": 9}
            yield _sse(final, event="done")

        return StreamingResponse(events(), media_type="text/event-stream")

    return Starlette(
        routes=[
            Route("/v1/models", models),
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
            Route("/api/v1/generate-text", generate_text, methods=["POST"]),
        ]
    )


@pytest.fixture(scope="module")
def fake_port() -> Iterator[int]:
    with serving(fake_app()) as port:
        yield port


def test_openai_stream_counts_usage_tokens(fake_port: int) -> None:
    target = loadgen.Target(f"http://127.0.0.1:{fake_port}/v1", api="openai", api_key="k")
    report = run(target, concurrency=2, requests=3)
    assert target.model == "fake-model"  # discovered from GET /v1/models
    assert report.errors == 0, report.error_kinds
    assert report.output_tokens == 3 * FAKE_TOKENS and report.token_source == "usage"
    assert report.texts == ["Jakarta."] * 3
    assert report.ttft_p50_s is not None and report.latency_p50_s is not None
    assert 0 < report.ttft_p50_s < report.latency_p50_s  # the first delta came before the end of the stream


def test_a_stream_without_done_needs_the_targets_leave(fake_port: int) -> None:
    """`transformers serve` ends its streams without `data: [DONE]`: only a Target that says so accepts that."""

    def one(prompt: str, done_marker: bool) -> loadgen.RunReport:
        target = loadgen.Target(f"http://127.0.0.1:{fake_port}/v1", model="fake-model", done_marker=done_marker)
        return asyncio.run(
            loadgen.run_load(target, [loadgen.Prompt("en", prompt)], concurrency=1, requests=1, timeout_s=60)
        )

    strict = one("no-done", done_marker=True)
    assert strict.error_kinds == {"stream ended without [DONE]": 1}
    lenient = one("no-done", done_marker=False)
    assert lenient.errors == 0, lenient.error_kinds
    assert lenient.output_tokens == FAKE_TOKENS and lenient.token_source == "usage"
    assert lenient.texts == ["Jakarta."]
    cut = one("cut", done_marker=False)  # no finish_reason either: the stream was cut short
    assert cut.error_kinds == {"stream ended without a finish_reason": 1}
    assert one("Halo", done_marker=False).errors == 0  # [DONE] still ends a stream


def test_spec_stream_counts_output_length(fake_port: int) -> None:
    target = loadgen.Target(f"http://127.0.0.1:{fake_port}", api="spec")
    report = run(target, concurrency=2, requests=2)
    assert report.errors == 0, report.error_kinds
    assert report.output_tokens == 2 * FAKE_TOKENS and report.token_source == "output_length"
    assert report.texts == ["Jakarta."] * 2
    assert report.ttft_p50_s is not None and report.latency_p50_s is not None
    assert report.ttft_p50_s < report.latency_p50_s


def test_errors_are_counted_not_raised(fake_port: int) -> None:
    target = loadgen.Target(f"http://127.0.0.1:{fake_port}", api="spec")
    prompts = [loadgen.Prompt("en", "busy"), loadgen.Prompt("id", "Halo")]
    report = asyncio.run(loadgen.run_load(target, prompts, concurrency=2, requests=4, max_tokens=4, timeout_s=60))
    assert (report.ok, report.errors) == (2, 2)
    assert report.error_kinds == {"HTTP 503": 2}
    assert report.output_tokens == 2 * FAKE_TOKENS


def test_only_loopback_addresses() -> None:
    for url in ("http://127.0.0.1:8000/v1", "http://localhost:1/v1", "http://[::1]:80"):
        loadgen.require_loopback(url)
    for url in ("http://10.0.0.2:8000/v1", "http://example.com/v1", "http://0.0.0.0:8000"):
        with pytest.raises(loadgen.BenchError):
            loadgen.require_loopback(url)


def test_summary_ratios_and_percentiles() -> None:
    assert loadgen.percentile([3.0, 1.0, 2.0, 4.0], 50) == 2.0
    assert loadgen.percentile([3.0, 1.0, 2.0, 4.0], 95) == 4.0

    def report(label: str, conc: int, tok_s: float, *ttfts: float) -> loadgen.RunReport:
        results = [
            loadgen.RequestResult(ok=True, latency_s=1.0, ttft_s=ttft, output_tokens=int(tok_s) // len(ttfts))
            for ttft in ttfts
        ]
        return loadgen.summarise(label, conc, results, wall_s=1.0, peak_rss_mb=None)

    # One client: short prompts answer first in 0.1 s, the long one in 0.2 s; eight clients: 0.3 s at worst.
    text = loadgen.summary_ratios(
        [
            report("ours-sequential", 1, 20, 0.1, 0.1, 0.1, 0.2),
            report("ours-sequential", 8, 20, 2.0),
            report("ours-batched", 1, 20, 0.1, 0.1, 0.1, 0.2),
            report("ours-batched", 8, 140, 0.15, 0.3),
        ]
    )
    assert "7.00x PASS" in text and "no errors: 0 PASS" in text
    assert "single-request TTFT p95, same prompts: 1.50x PASS" in text  # 0.3 / 0.2, not 0.3 / 0.1
    assert "TTFT p95 at 8 / TTFT p95 at 1 (same prompts) = 1.50x; / TTFT p50 at 1 = 3.00x" in text


def test_the_summary_baseline_sends_the_eight_client_prompts_one_at_a_time() -> None:
    args = loadgen.build_parser().parse_args(["--summary"])
    assert loadgen.requests_for(1, args) == loadgen.requests_for(8, args) == 16
    assert loadgen.requests_for(4, args) == 8
    single = loadgen.build_parser().parse_args(["--start-ours", "-c", "1"])
    assert loadgen.requests_for(1, single) == 4


def test_cpu_kernels_bench_times_both_kernels() -> None:
    from bench import cpu_kernels
    from inference.cpu.packed import packing_available

    if not packing_available():
        pytest.skip("this torch build has no oneDNN linear packing")
    plain, packed = cpu_kernels.time_linear(64, 32, repeat=3)
    assert plain > 0 and packed > 0


# --- bench/baselines.py: what runs without the baseline servers ---------------------------------------------------


def test_baselines_arguments() -> None:
    from bench import baselines

    args = baselines.build_parser().parse_args([])
    assert args.only == ["ours", "ours-bf16", "llama-server", "llama-cpp-python", "transformers-serve"]
    assert args.concurrency == [1, 2, 4, 8, 16]
    assert args.no_agreement is False
    assert args.transformers.name == "transformers" and args.transformers.parent == Path(sys.executable).parent
    args = baselines.build_parser().parse_args(
        ["--only", "transformers-serve", "ours-bf16", "-c", "1", "2", "--no-agreement", "--env", "A=b"]
    )
    assert args.only == ["transformers-serve", "ours-bf16"] and args.concurrency == [1, 2] and args.no_agreement
    assert baselines.ours_label(args) == "ours-batched" and baselines.ours_label(args, bf16=True) == "ours-batched-bf16"
    # ours-bf16 is ours with the int4 path off; ours is the service as it ships; --env has the last word.
    assert baselines.ours_env(args, bf16=True) == {"GGUF_INT4": "false", "A": "b"}
    assert baselines.ours_env(args) == {"A": "b"}
    override = baselines.build_parser().parse_args(["--env", "GGUF_INT4=true"])
    assert baselines.ours_env(override, bf16=True) == {"GGUF_INT4": "true"}
    with pytest.raises(SystemExit):
        baselines.build_parser().parse_args(["--only", "vllm"])


def _report(label: str, conc: int, tok_s: float, ttft_p50: float = 0.1, cpu_ms: float = 10.0) -> loadgen.RunReport:
    """A finished run with these figures (what baselines.comparison reads)."""
    return loadgen.RunReport(
        label=label,
        concurrency=conc,
        requests=4,
        ok=4,
        errors=0,
        wall_s=1.0,
        requests_per_s=4.0,
        output_tokens=int(tok_s),
        aggregate_tok_s=tok_s,
        per_stream_tok_s=tok_s / conc,
        ttft_p50_s=ttft_p50,
        ttft_p95_s=2 * ttft_p50,
        latency_p50_s=1.0,
        latency_p95_s=1.0,
        peak_rss_mb=None,
        server_cpu_s=None,
        cpu_ms_per_token=cpu_ms,
        token_source="usage",
    )


def test_baselines_comparison_judges_the_goals_against_llama_server() -> None:
    from bench import baselines

    ours = {1: 80.0, 2: 100.0, 4: 150.0, 8: 240.0, 16: 300.0}
    llama = {1: 80.0, 2: 110.0, 4: 100.0, 8: 200.0, 16: 200.0}  # ours / llama: 1.00 0.91 1.50 1.20 1.50
    reports = [_report("ours-batched", c, v, ttft_p50=0.09, cpu_ms=8.0) for c, v in ours.items()]
    reports += [_report("ours-batched-bf16", c, v / 2, ttft_p50=0.2) for c, v in ours.items()]
    reports += [_report("llama-server", c, v, ttft_p50=0.1, cpu_ms=12.0) for c, v in llama.items()]
    reports += [_report("transformers-serve", c, 20.0, ttft_p50=0.5) for c in ours]
    text = baselines.comparison(reports, "ours-batched")

    assert "c=1: ours-batched / llama-server aggregate tok/s = 1.00x (goal >= 1.0x) PASS" in text
    assert "c=2: ours-batched / llama-server aggregate tok/s = 0.91x (goal >= 1.0x) FAIL" in text
    assert "c=4: ours-batched / llama-server aggregate tok/s = 1.50x (goal >= 1.0x) PASS" in text
    assert "c=8: ours-batched / llama-server aggregate tok/s = 1.20x (goal >= 1.3x) FAIL" in text
    assert "c=16: ours-batched / llama-server aggregate tok/s = 1.50x (goal >= 1.3x) PASS" in text
    assert "CPU ms per token llama-server / ours-batched = 1.50x" in text
    # The other servers: a ratio at every level, no goal; llama-cpp-python did not run, so it has no line.
    assert "c=8: ours-batched / transformers-serve aggregate tok/s = 12.00x; CPU ms per token" in text
    assert "c=1: ours-batched / ours-batched-bf16 aggregate tok/s = 2.00x; CPU ms per token" in text
    assert "llama-cpp-python" not in text
    assert text.count("goal >=") == 5
    # TTFT at 1 client: every server, and ours / llama-server p50 against its goal.
    assert "  ours-batched        p50 0.090 s  p95 0.180 s" in text
    assert "  transformers-serve  p50 0.500 s  p95 1.000 s" in text
    assert "ours-batched TTFT p50 / llama-server TTFT p50 at 1 client = 0.90x (goal <= 1.0x) PASS" in text
    assert "goals: 4 of 6 met, 2 failed" in text

    slow_start = [r for r in reports if (r.label, r.concurrency) != ("ours-batched", 1)]
    slow_start.append(_report("ours-batched", 1, 80.0, ttft_p50=0.11))
    assert "at 1 client = 1.10x (goal <= 1.0x) FAIL" in baselines.comparison(slow_start, "ours-batched")


def test_baselines_comparison_without_llama_server_judges_nothing() -> None:
    from bench import baselines

    reports = [_report("ours-batched", 1, 40.0), _report("transformers-serve", 1, 20.0)]
    text = baselines.comparison(reports, "ours-batched")
    assert "llama-server did not run: its goals are not judged" in text
    assert "c=1: ours-batched / transformers-serve aggregate tok/s = 2.00x; CPU" in text
    assert "PASS" not in text and "FAIL" not in text and "goals:" not in text
    # ours missing at a level llama-server ran: the goal is reported, not judged.
    text = baselines.comparison([_report("llama-server", 8, 100.0)], "ours-batched")
    assert "c=8: ours-batched / llama-server aggregate tok/s = - (goal >= 1.3x) n/a" in text
    assert "llama-server TTFT p50 at 1 client = - (goal <= 1.0x) n/a" in text
    assert "goals: 0 of 2 met, 0 failed, 2 n/a" in text


def test_transformers_serve_model_dir_names_the_architecture(tmp_path: Path) -> None:
    """The weight cache entry's config has no `architectures`: a directory of symlinks plus a config that has."""
    from transformers import AutoConfig

    from bench import baselines

    weights = tmp_path / "entry"
    weights.mkdir()
    config = {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "vocab_size": 100}
    (weights / "config.json").write_text(json.dumps(config), encoding="utf-8")
    for name, data in (("model.safetensors", b"weights"), ("tokenizer.json", b"{}"), ("chat_template.jinja", b"x")):
        (weights / name).write_bytes(data)

    directory = baselines.transformers_serve_model_dir(weights, "LlamaForCausalLM", tmp_path / "serve")
    assert directory == tmp_path / "serve"
    assert sorted(p.name for p in directory.iterdir()) == sorted(p.name for p in weights.iterdir())
    for name in ("model.safetensors", "tokenizer.json", "chat_template.jinja"):
        assert (directory / name).is_symlink() and (directory / name).resolve() == (weights / name).resolve()
    assert not (directory / "config.json").is_symlink()
    loaded = AutoConfig.from_pretrained(directory, local_files_only=True)  # as transformers serve reads it
    assert loaded.architectures == ["LlamaForCausalLM"] and loaded.hidden_size == 64
    assert "architectures" not in json.loads((weights / "config.json").read_text(encoding="utf-8"))  # untouched

    # A directory whose config already names its architecture is served as it is.
    assert baselines.transformers_serve_model_dir(directory, "Other", tmp_path / "again") == directory
    assert not (tmp_path / "again").exists()


def test_baselines_agreement_runs_the_script_or_says_it_is_absent(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    from bench import baselines

    script = Path("bench") / "int4_agreement.py"
    assert baselines.run_agreement(16, script=script, cwd=tmp_path) is None
    out = capfd.readouterr().out
    assert "== 4-bit vs bf16 agreement (bench/int4_agreement.py --max-tokens 16) ==" in out
    assert f"skipped: {tmp_path / script} does not exist" in out

    (tmp_path / "bench").mkdir()
    (tmp_path / script).write_text(
        "import sys\nprint('identical replies: 3 of 4', sys.argv[1:])\nsys.exit(3)\n", encoding="utf-8"
    )
    assert baselines.run_agreement(16, script=script, cwd=tmp_path) == 3
    out = capfd.readouterr().out
    heading = out.index("== 4-bit vs bf16 agreement")
    assert out.index("identical replies: 3 of 4 ['--max-tokens', '16']") > heading  # its output, under the heading
    assert "bench/int4_agreement.py exited with code 3" in out
