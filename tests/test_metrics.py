"""`GET /metrics`: protected by the API key, present, and increasing after real requests."""

from __future__ import annotations

import threading
import time

from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from inference.cpu.paths import isa_in_force, native_bf16
from inference.engines.base import LocalEngine
from inference.model.loading import LoadedModel
from tests.helpers import API_KEY, AUTH, engine_for
from webapp.server import create_app
from webapp.settings import Settings

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(client: TestClient, headers: dict[str, str] = AUTH) -> Samples:
    response = client.get("/metrics", headers=headers)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_need_the_api_key(client: TestClient) -> None:
    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401


def test_metrics_can_be_public(settings: Settings, embedded_model: LoadedModel) -> None:
    public = settings.model_copy(update={"metrics_public": True})
    app = create_app(public, engine_for(public, embedded_model), [API_KEY], with_ui=False)
    with TestClient(app) as client:
        samples = scrape(client, headers={})
    assert value(samples, "sahabat_engine_state", state="ready") == 1


def test_model_and_engine_metrics_are_present(client: TestClient, settings: Settings) -> None:
    samples = scrape(client)
    info = [labels for (name, labels) in samples if name == "sahabat_model_info"]
    assert len(info) == 1
    assert dict(info[0]) == {
        "model_id": "SmolLM2-135M-Instruct-Q4_1",
        "quantization": dict(info[0])["quantization"],
        "dtype": dict(info[0])["dtype"],
        "device": "cpu",
        "engine": "batched",  # the default engine
        "decode_path": "native",  # the path in force: every CI machine is x86-64 with AVX2 and a C compiler
        "cpu_isa": isa_in_force(settings.cpu_isa),  # the instruction-set class it runs at (CPU_ISA caps it)
        "context_length": "8192",
    }
    # the model's dtype follows the CPU: bf16 where bf16 matmuls are native, else float32
    assert dict(info[0])["dtype"] == ("bfloat16" if native_bf16(settings.cpu_isa) else "float32")
    assert dict(info[0])["quantization"].startswith("Q4_1 GGUF (native forward passes over its blocks")
    assert value(samples, "sahabat_model_load_seconds") >= 0
    assert value(samples, "sahabat_engine_queue_depth") == 0
    assert value(samples, "sahabat_engine_running_requests") == 0
    assert value(samples, "sahabat_engine_state", state="ready") == 1
    assert value(samples, "sahabat_engine_state", state="loading") == 0
    assert value(samples, "process_resident_memory_bytes") > 0


def test_counters_and_histograms_increase_after_a_request(client: TestClient) -> None:
    before = scrape(client)
    response = client.post("/api/v1/chat", headers=AUTH, json={"text": "Halo, apa kabar?", "max_new_tokens": 6})
    assert response.status_code == 200
    body = response.json()
    unauthorized = client.post("/api/v1/chat", json={"text": "Halo", "max_new_tokens": 2})
    assert unauthorized.status_code == 401
    after = scrape(client)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    route = {"method": "POST", "route": "/api/v1/chat"}
    assert delta("sahabat_http_requests_total", **route, status="200") == 1
    assert delta("sahabat_http_requests_total", **route, status="401") == 1
    assert delta("sahabat_http_request_duration_seconds_count", **route) == 2
    assert delta("sahabat_http_request_duration_seconds_sum", **route) > 0
    assert delta("sahabat_prompt_tokens_total") == body["input_length"]
    assert delta("sahabat_generated_tokens_total") == body["output_length"]
    assert delta("sahabat_time_to_first_token_seconds_count") == 1
    assert delta("sahabat_generation_duration_seconds_count") == 1
    assert (
        delta("sahabat_generations_total", finish_reason="length")
        + delta("sahabat_generations_total", finish_reason="stop")
        == 1
    )
    # The scrape itself is counted too, under its route template.
    assert value(after, "sahabat_http_requests_total", method="GET", route="/metrics", status="200") >= 1


def test_prompt_tokens_reused_from_the_prefix_cache_are_counted(client: TestClient) -> None:
    """The spec chat's system message and template, computed for the first request, start the second one's cache."""
    before = scrape(client)
    for text in ("Sebutkan satu pulau.", "Sebutkan satu gunung."):
        response = client.post("/api/v1/chat", headers=AUTH, json={"text": text, "max_new_tokens": 2})
        assert response.status_code == 200
    after = scrape(client)
    reused = value(after, "sahabat_engine_reused_prompt_tokens_total") - value(
        before, "sahabat_engine_reused_prompt_tokens_total"
    )
    assert reused >= response.json()["input_length"] // 2  # the system message is most of this short prompt


def test_running_requests_gauge_follows_a_generation(client: TestClient, engine: LocalEngine) -> None:
    results: list[int] = []
    request = threading.Thread(
        target=lambda: results.append(
            client.post(
                "/api/v1/generate-text",
                headers=AUTH,
                json={"text": "Tulis cerita panjang tentang laut.", "max_new_tokens": 48, "temperature": 0},
            ).status_code
        )
    )
    request.start()
    deadline = time.monotonic() + 30
    while engine.running == 0 and request.is_alive() and time.monotonic() < deadline:
        time.sleep(0.005)
    during = scrape(client)
    request.join(600)  # a hang guard
    assert results == [200]
    assert value(during, "sahabat_engine_running_requests") == 1
    assert value(scrape(client), "sahabat_engine_running_requests") == 0
