"""Memory admission (MEMORY_CHECK, inference/engines/memory_budget.py): no prompt within the context can kill the
process. A request that can never fit the memory left at ready is a 400 naming the limit; one that cannot fit yet
waits for running rows to end; the limit is read from the machine (RAM, cgroup v1 or v2, RLIMIT_AS).

The last test runs `python app.py` under an address-space limit (RLIMIT_AS, which any user can set, unlike a cgroup):
the longest prompt the context allows is refused cleanly, a smaller one is served within the cap, and the service
keeps serving."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from bench.gemma_shape import SAHABAT_AI_SHAPE, gemma2_config
from inference.engines.batched.engine import BatchedEngine
from inference.engines.memory_budget import ExceedsMemory, MemoryBudget, ModelShape
from inference.model import loading, memory
from inference.model.loading import LoadedModel
from inference.types import GenerationRequest
from tests.helpers import APP_AUTH, engine_for, process_status, start_server
from webapp.settings import Settings

GB = 10**9
MB = 10**6
SENTENCE = "kalimat nomor {} tentang pulau Jawa. "


def prompt_of(engine: BatchedEngine, tokens: int) -> str:
    """A raw prompt of about `tokens` tokens (never more)."""
    text = ""
    n = 0
    while len(engine.raw_prompt_ids(text + SENTENCE.format(n))) <= tokens:
        text += SENTENCE.format(n)
        n += 1
    return text


def raw(text: str, max_new_tokens: int = 4) -> GenerationRequest:
    return GenerationRequest(messages=(), prompt=text, max_new_tokens=max_new_tokens, temperature=0)


def test_the_9b_shape_in_8bit_fits_an_8k_prompt_on_24_gb() -> None:
    """sahabat-ai's shape, bf16 caches: its sliding-window layers hold 4096 columns at most, and the chunked prefill's
    scores are chunk x prompt, so the 8,192-token prompt costs ~5.3 GB, not the 30+ GB of a whole-prompt prefill."""
    config = gemma2_config(SAHABAT_AI_SHAPE)
    config._attn_implementation = "eager"  # Gemma2's
    shape = ModelShape.of(config, cache_dtype_bytes=2)
    assert shape.windows.count(4096) == 21 and shape.windows.count(None) == 21
    assert shape.kv_row_bytes == 2 * 8 * 256 * 2
    full = 21 * 8192 + 21 * 4096
    assert shape.kv_bytes(8192) == int(1.5 * full * shape.kv_row_bytes)
    chunked = MemoryBudget(shape, capacity=0, where="", prefill_chunk=512, group_tokens=8192)
    whole = MemoryBudget(shape, capacity=0, where="", prefill_chunk=0, group_tokens=8192)
    assert 4.5 * GB < chunked.cost([8192], [8176]) < 6 * GB
    assert whole.cost([8192], [8176]) > 17 * GB  # the n^2 scores that killed it (issue 28)
    # A batch is padded to its longest row: a short row beside an 8k one costs as much as another 8k one.
    assert chunked.cost([8192, 100]) == 2 * shape.kv_bytes(8192)


def test_cgroup_v1_and_v2_limits_are_read(tmp_path: Path) -> None:
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "memory.max").write_text("4294967296\n")
    (v2 / "memory.current").write_text("1073741824\n")
    assert memory.cgroup_available_bytes(v2, tmp_path / "none") == 3 * 1024**3
    (v2 / "memory.max").write_text("max\n")
    assert memory.cgroup_available_bytes(v2, tmp_path / "none") is None
    # cgroup v1 (a container on a v1 host): the process's own group under the memory controller's mount
    proc = tmp_path / "cgroup"
    proc.write_text("9:cpu,cpuacct:/\n4:memory:/docker/abc\n0::/\n")
    group = tmp_path / "v1" / "memory" / "docker" / "abc"
    group.mkdir(parents=True)
    (group / "memory.limit_in_bytes").write_text(str(6 * 1024**3))
    (group / "memory.usage_in_bytes").write_text(str(2 * 1024**3))
    assert memory.cgroup_available_bytes(tmp_path / "v1", proc) == 4 * 1024**3
    (group / "memory.limit_in_bytes").write_text("9223372036854771712\n")  # v1's "no limit"
    assert memory.cgroup_available_bytes(tmp_path / "v1", proc) is None
    # a container that sees its own group at the mount's root
    root = tmp_path / "v1root" / "memory"
    root.mkdir(parents=True)
    (root / "memory.limit_in_bytes").write_text(str(2 * 1024**3))
    (root / "memory.usage_in_bytes").write_text(str(1024**3))
    assert memory.cgroup_available_bytes(tmp_path / "v1root", proc) == 1024**3


@pytest.fixture(scope="module")
def budgeted(settings: Settings, embedded_model: LoadedModel) -> Iterator[BatchedEngine]:
    engine = engine_for(settings, embedded_model)
    assert isinstance(engine, BatchedEngine) and engine.memory is not None  # MEMORY_CHECK is on by default
    yield engine
    engine.close()


def test_too_little_memory_for_a_modest_request_is_a_warning_at_ready(
    budgeted: BatchedEngine, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The operator hears at start-up that the memory left (here 1.1 GB, ~0.05 GB after the reserve) turns away a
    512-token prompt with 512 new tokens, not from users' 400s; with room for it the line stays an info."""
    monkeypatch.setattr(loading, "available_memory", lambda _cuda: (1_100_000_000, "test RAM"))
    with caplog.at_level(logging.INFO, logger="inference.engines.base"):
        assert budgeted.memory_budget().capacity < GB
    warned = [record for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warned) == 1 and "a 512-token prompt with as many new tokens needs" in warned[0].getMessage()
    assert "test RAM" in warned[0].getMessage()
    caplog.clear()
    monkeypatch.setattr(loading, "available_memory", lambda _cuda: (8 * GB, "test RAM"))
    with caplog.at_level(logging.INFO, logger="inference.engines.base"):
        budgeted.memory_budget()
    assert [record.levelno for record in caplog.records if "memory for requests" in record.getMessage()] == [
        logging.INFO
    ]


async def test_a_request_that_can_never_fit_is_refused_naming_the_limit(budgeted: BatchedEngine) -> None:
    long = raw(prompt_of(budgeted, 600))
    ids = budgeted.prepare(long)
    budget = budgeted.memory
    assert budget is not None and budget.capacity > GB  # the RAM left at ready, on any test machine
    need = budget.cost([len(ids) + 4], [len(ids)])
    budgeted.memory = _with_capacity(budget, need - 1)
    try:
        with pytest.raises(ExceedsMemory, match=r"needs about .* GB of memory .* more than the .* GB this server has"):
            await budgeted.generate(long)
        short = await budgeted.generate(raw("Halo, apa kabar?"))
        assert short.output_length == 4
    finally:
        budgeted.memory = budget


async def test_a_request_that_cannot_fit_yet_waits_for_the_running_rows(budgeted: BatchedEngine) -> None:
    """Room for one long row and some: a second long one waits until the first ends instead of joining its batch
    (rows x the longest row's KV cache), then it is served."""
    long_a, long_b = raw(prompt_of(budgeted, 600), 16), raw(prompt_of(budgeted, 590), 16)
    ids = budgeted.prepare(long_a)
    budget = budgeted.memory
    assert budget is not None
    one = budget.cost([len(ids) + 16], [len(ids)])
    budgeted.memory = _with_capacity(budget, one + budget.shape.kv_bytes(len(ids) + 16) // 4)  # one row, not two
    budgeted.runner.max_rows_seen = 0
    try:
        results = await asyncio.gather(budgeted.generate(long_a), budgeted.generate(long_b))
        assert [result.output_length for result in results] == [16, 16]
        assert budgeted.runner.max_rows_seen == 1  # never two rows together
    finally:
        budgeted.memory = budget


@pytest.mark.parametrize("kind", ["batched", "sequential"])
async def test_the_heap_is_given_back_as_a_long_request_ends(
    settings: Settings, embedded_model: LoadedModel, budgeted: BatchedEngine, kind: str
) -> None:
    """A long request's KV cache and prefill leave free heap that glibc keeps in the process's RSS; the engine gives it
    back (`malloc_trim`) as the request ends, so a trim afterwards finds next to nothing left to return: 0-0.2 MB here,
    66 MB without the engines' trims (a 3,000-token request: its KV cache), and 69 MB when the native pass still held
    the cache as the batched engine trimmed. The batched engine on transformers' forward is not a case here: its
    cache buffers are above the pinned mmap threshold, so they go back to the kernel when freed, trim or not (4 MB
    without it). RSS against ready after a long conversation is measured on the 9B shape (docs/cpu-quantization.md)."""
    engine = budgeted if kind == "batched" else engine_for(settings, embedded_model, kind)
    try:
        result = await engine.generate(raw(prompt_of(budgeted, 3000), 16))
        assert result.output_length == 16
        held = process_status(os.getpid())["RssAnon"]
        memory.release_free_heap()
        given_back = held - process_status(os.getpid())["RssAnon"]
        assert given_back < 24 * MB, f"{given_back / MB:.0f} MB of free heap was still held after the request ended"
    finally:
        if engine is not budgeted:
            engine.close()


def _with_capacity(budget: MemoryBudget, capacity: int) -> MemoryBudget:
    return MemoryBudget(budget.shape, capacity, budget.where, budget.prefill_chunk, budget.group_tokens)


def complete(http: httpx.Client, prompt: str) -> httpx.Response:
    body = {"model": "sahabat-ai", "prompt": prompt, "max_tokens": 16, "temperature": 0}
    return http.post("/v1/completions", json=body)


# The engines and weights a capped server runs: the default (batched, the native or lean pass), the sequential engine
# (transformers' generate) and bitsandbytes 8-bit (transformers' forward over Linear8bitLt).
CAPPED = {"batched": {}, "sequential": {"ENGINE": "sequential"}, "8bit": {"QUANTIZATION": "8bit"}}
# Prompt lengths tried under the cap, longest first: the longest the context allows never fits what is left; the
# first one that fits is the closest to the cap, so it is the one most likely to overrun it if the estimate were low.
DESCENT = (8192 - 64, 4096, 2048, 1024, 512, 256)


@pytest.mark.parametrize("env", CAPPED.values(), ids=list(CAPPED))
def test_under_an_address_space_limit_the_cap_is_honoured(
    settings: Settings, budgeted: BatchedEngine, env: dict[str, str]
) -> None:
    """Under RLIMIT_AS = the ready process's size + 1.42 GB (~0.35 GB for requests after the 1 GB + 5% reserve; the
    longest prompt needs ~0.54 GB by the estimate), every prompt from the longest down is refused with a 400 naming
    the limit or served: never a 500 (an allocation failing under the cap) or a dead process. What is left at ready
    varies by ~0.15 GB between runs (thread arenas), so the test does not fix which lengths fit, only that the longest
    does not, that some do, and that the answer only turns from 400 to 200 going down. The estimate and the reserve
    err high: with MEMORY_CHECK=false all six lengths are served under this cap (measured; uncapped, a 5,500-token
    prompt takes the peak address space 0.4-0.9 GB past ready), so the test shows the limit read and honoured, not
    a death averted."""
    probe = start_server(settings, **env)
    try:
        ready_size = process_status(probe.process.pid)["VmSize"]
    finally:
        probe.process.terminate()
        probe.process.wait(timeout=60)
    served = start_server(settings, address_space=ready_size + 1_420_000_000, **env)
    try:
        assert "address space left under this process's limit (RLIMIT_AS)" in served.log()
        answers: list[int] = []
        with httpx.Client(base_url=served.url, headers=APP_AUTH, timeout=600) as http:
            for tokens in DESCENT:
                answer = complete(http, prompt_of(budgeted, tokens))
                answers.append(answer.status_code)
                if answer.status_code == 400:
                    assert "of memory" in answer.json()["error"]["message"] and "RLIMIT_AS" in answer.text, answer.text
                else:
                    assert answer.status_code == 200, answer.text  # served within the cap
                    assert answer.json()["usage"]["prompt_tokens"] > tokens * 0.9
            assert complete(http, "Halo").status_code == 200
        assert answers[0] == 400 and answers[-1] == 200, answers
        assert answers == sorted(answers, reverse=True), answers  # 400s, then 200s
        assert served.process.poll() is None
    finally:
        served.process.terminate()
        served.process.wait(timeout=60)
