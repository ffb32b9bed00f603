"""The page's documented API endpoint `/chat`, called with gradio_client against a live server (the whole app, the
embedded model, the default batched engine): listed by view_api (and nothing else is), a real reply, clear errors,
and GRADIO_AUTH guarding it like the page."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError

from inference import GenerationRequest
from inference.model.loading import LoadedModel
from tests.helpers import AUTH, LiveServer, engine_for, start_live_server
from webapp.settings import DEFAULT_CHAT_SYSTEM_MESSAGE, Settings

USER, PASSWORD = "tamu", "rahasia-0123"


def live(embedded_model: LoadedModel, **settings_fields: object) -> Iterator[LiveServer]:
    settings = Settings(model_id="embedded", _env_file=None, **settings_fields)  # type: ignore[call-arg]
    server = start_live_server(settings, engine_for(settings, embedded_model))
    yield server
    server.server.should_exit = True


@pytest.fixture(scope="module")
def open_server(embedded_model: LoadedModel) -> Iterator[LiveServer]:
    yield from live(embedded_model, max_new_tokens_cap=16)


@pytest.fixture(scope="module")
def guarded_server(embedded_model: LoadedModel) -> Iterator[LiveServer]:
    yield from live(embedded_model, gradio_auth=f"{USER}:{PASSWORD}")


@pytest.fixture(scope="module")
def ui_client(open_server: LiveServer) -> Client:
    return Client(open_server.base_url + "/", verbose=False)


def test_view_api_lists_chat_and_only_chat(ui_client: Client) -> None:
    info = ui_client.view_api(print_info=False, return_format="dict")
    assert list(info["named_endpoints"]) == ["/chat"]
    assert info["unnamed_endpoints"] == {}
    parameters = info["named_endpoints"]["/chat"]["parameters"]
    assert [p["parameter_name"] for p in parameters] == ["message", "system_message", "max_new_tokens", "temperature"]
    assert [p["parameter_has_default"] for p in parameters] == [False, True, True, True]
    returns = info["named_endpoints"]["/chat"]["returns"]
    assert len(returns) == 1 and returns[0]["type"]["type"] == "string"


def test_predict_returns_the_reply_of_the_embedded_model(ui_client: Client, open_server: LiveServer) -> None:
    reply = ui_client.predict("Halo! Apa kabar?", max_new_tokens=8, temperature=0, api_name="/chat")
    assert isinstance(reply, str) and reply.strip()
    # Greedy, on the same engine as the API, with the default system message: the words /v1 gives for the same turns.
    body = {
        "messages": [
            {"role": "system", "content": DEFAULT_CHAT_SYSTEM_MESSAGE},
            {"role": "user", "content": "Halo! Apa kabar?"},
        ],
        "max_tokens": 8,
        "temperature": 0,
    }
    api = httpx.post(f"{open_server.base_url}/v1/chat/completions", headers=AUTH, json=body, timeout=120).json()
    assert reply == api["choices"][0]["message"]["content"]


def test_the_message_alone_is_enough(ui_client: Client, open_server: LiveServer) -> None:
    """The call the README shows, defaults for the rest (max_new_tokens capped at 16 on this server); and the raw
    HTTP form of it (Gradio's /gradio_api/call/chat, two requests: the call, then its result as SSE). Each call is
    one request of the engine with its own request id (the engine's logs and a remote upstream carry it)."""
    seen: list[str] = []

    def listener(request: GenerationRequest, _result: object) -> None:
        seen.append(request.request_id)

    open_server.engine.add_result_listener(listener)
    try:
        assert ui_client.predict("Halo!", api_name="/chat").strip()
        assert ui_client.predict("Halo!", "", 2, 0).strip()  # the only endpoint: gradio_client finds it unnamed
        call = httpx.post(
            f"{open_server.base_url}/gradio_api/call/chat", json={"data": ["Halo!", "", 4, 0]}, timeout=30
        )
        assert call.status_code == 200, call.text
        result = httpx.get(f"{open_server.base_url}/gradio_api/call/chat/{call.json()['event_id']}", timeout=120).text
        assert "event: complete" in result, result
    finally:
        open_server.engine.remove_result_listener(listener)
    assert len(seen) == 3 and all(seen) and len(set(seen)) == 3, seen


def test_bad_inputs_are_clear_errors(ui_client: Client) -> None:
    cases = {
        "message: must be a non-empty string": {"message": "  "},
        "max_new_tokens: must be at most 16 (MAX_NEW_TOKENS_CAP)": {"message": "Halo", "max_new_tokens": 17},
        "max_new_tokens: must be a whole number of at least 1": {"message": "Halo", "max_new_tokens": 0},
        "temperature: must be a number from 0 to 2": {"message": "Halo", "temperature": 3},
    }
    for expected, inputs in cases.items():
        with pytest.raises(AppError, match=expected.replace("(", r"\(").replace(")", r"\)")):
            ui_client.predict(**inputs, api_name="/chat")


def test_gradio_auth_guards_the_endpoint(guarded_server: LiveServer) -> None:
    url = guarded_server.base_url + "/"
    with pytest.raises(ValueError, match="login"):
        Client(url, verbose=False)
    # Nor does the raw HTTP route answer without a login (the page's hidden handlers neither).
    for name in ("chat", "respond"):
        response = httpx.post(f"{guarded_server.base_url}/gradio_api/call/{name}", json={"data": ["Halo"]})
        assert response.status_code == 401, (name, response.status_code)
    with pytest.raises(ValueError):
        Client(url, auth=(USER, "wrong"), verbose=False)
    client = Client(url, auth=(USER, PASSWORD), verbose=False)
    reply = client.predict("Halo!", max_new_tokens=4, temperature=0, api_name="/chat")
    assert isinstance(reply, str) and reply.strip()
