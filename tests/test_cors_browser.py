"""CORS seen by a real browser: a page served from another origin calls the API with `fetch` and a Bearer key.

Three servers on loopback: the API (the whole app, the embedded model, CORS_ALLOW_ORIGINS naming one origin), and
two tiny page servers on other ports: the listed origin and one that is not listed. Debian's Chromium, headless,
driven by Playwright, as in tests/test_ui_browser.py (this module too is skipped when Chromium is missing).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from playwright.sync_api import Browser, Page
from starlette.applications import Starlette
from starlette.responses import HTMLResponse
from starlette.routing import Route

from inference.model.loading import LoadedModel
from tests.helpers import API_KEY, TIMEOUT_MS, engine_for, serve, skip_without_chromium, start_live_server
from webapp.settings import Settings

PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>another origin</title></head><body>
<script>
async function callApi(url, key, body) {
  const init = {method: body === null ? "GET" : "POST", headers: {"Authorization": "Bearer " + key}};
  if (body !== null) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  try {
    const response = await fetch(url, init);
    return {
      status: response.status,
      requestId: response.headers.get("X-Request-ID"),
      body: await response.json(),
    };
  } catch (error) {
    return {blocked: String(error)};
  }
}
</script></body></html>"""

skip_without_chromium()

CHAT = {"model": "sahabat-ai", "messages": [{"role": "user", "content": "Halo!"}], "max_tokens": 4, "temperature": 0}


def page_app() -> Starlette:
    return Starlette(routes=[Route("/", lambda _request: HTMLResponse(PAGE))])


@pytest.fixture(scope="module")
def origins() -> Iterator[dict[str, str]]:
    """Two page servers: `allowed` (listed in CORS_ALLOW_ORIGINS) and `other`; their origins (no trailing /)."""
    with serve(page_app()) as allowed, serve(page_app()) as other:
        yield {"allowed": allowed.rstrip("/"), "other": other.rstrip("/")}


@pytest.fixture(scope="module")
def api_url(origins: dict[str, str], embedded_model: LoadedModel) -> Iterator[str]:
    settings = Settings(model_id="embedded", _env_file=None, cors_allow_origins=origins["allowed"])  # type: ignore[call-arg]
    live = start_live_server(settings, engine_for(settings, embedded_model))
    yield live.base_url
    live.server.should_exit = True


@pytest.fixture
def open_page(browser: Browser, origins: dict[str, str]) -> Iterator[Any]:
    context = browser.new_context()
    context.set_default_timeout(TIMEOUT_MS)

    def open_at(which: str) -> Page:
        page = context.new_page()
        page.goto(origins[which] + "/")
        return page

    yield open_at
    context.close()


def call(page: Page, url: str, key: str, body: dict[str, Any] | None) -> dict[str, Any]:
    return page.evaluate("([url, key, body]) => callApi(url, key, body)", [url, key, body])


def test_a_listed_origin_reads_a_chat_completion(open_page: Any, api_url: str) -> None:
    result = call(open_page("allowed"), f"{api_url}/v1/chat/completions", API_KEY, CHAT)
    assert result.get("status") == 200, result
    assert result["body"]["object"] == "chat.completion"
    assert result["body"]["usage"]["completion_tokens"] >= 1
    assert result["requestId"]  # an exposed header: readable by the page


def test_a_listed_origin_reads_the_documented_api_and_its_errors(open_page: Any, api_url: str) -> None:
    page = open_page("allowed")
    spec = call(page, f"{api_url}/api/v1/chat", API_KEY, {"text": "Halo!", "max_new_tokens": 4, "temperature": 0})
    assert spec.get("status") == 200, spec
    assert isinstance(spec["body"]["generated_text"], str)
    models = call(page, f"{api_url}/v1/models", API_KEY, None)
    assert models.get("status") == 200, models
    # An error is a reply the page can read (status, body, request id), not an opaque network failure.
    refused = call(page, f"{api_url}/v1/chat/completions", "sk-not-a-key", CHAT)
    assert refused.get("status") == 401, refused
    assert refused["body"]["error"]["type"] == "authentication_error"
    assert refused["requestId"]


def test_an_origin_not_listed_is_blocked_by_the_browser(open_page: Any, api_url: str) -> None:
    page = open_page("other")
    for url, body in ((f"{api_url}/v1/chat/completions", CHAT), (f"{api_url}/v1/models", None)):
        result = call(page, url, API_KEY, body)
        assert "status" not in result, result  # the page never sees the reply
        assert "Failed to fetch" in result["blocked"]
