"""Anthropic's Messages API on ENGINE=remote: a front (ENGINE=remote) before a real upstream (a second instance of
this service on the embedded model), both real uvicorn servers, driven by the official `anthropic` SDK; and the
engine-free pieces (which stop sequence ended a reply, field names in errors)."""

from __future__ import annotations

import time
from collections.abc import Iterator

import anthropic
import pytest

from inference.engines.remote import RemoteEngine
from inference.engines.upstream import upstream_stop_sequence
from inference.model.loading import LoadedModel
from inference.text.reply import ReplyAssembler
from tests.helpers import API_KEY, LiveServer, engine_for, start_live_server
from webapp.api.anthropic.builder import anthropic_param
from webapp.settings import Settings

MODEL = "sahabat-ai"
GREEDY = {"temperature": 0}  # an extension field: SDK 2.x has no temperature argument
ASK = [{"role": "user", "content": "Name three colours."}]


@pytest.fixture(scope="module")
def messages_upstream(settings: Settings, embedded_model: LoadedModel) -> Iterator[LiveServer]:
    live = start_live_server(settings, engine_for(settings, embedded_model, "sequential"))
    yield live
    live.server.should_exit = True


@pytest.fixture(scope="module")
def remote_anthropic(messages_upstream: LiveServer) -> Iterator[anthropic.Anthropic]:
    """The SDK on a front whose engine is ENGINE=remote before `messages_upstream`."""
    front_settings = Settings(  # type: ignore[call-arg]
        _env_file=None, engine="remote", remote_url=f"{messages_upstream.base_url}/v1", remote_api_key=API_KEY
    )
    engine = RemoteEngine(front_settings)
    front = start_live_server(front_settings, engine)
    deadline = time.monotonic() + 60  # a liveness limit: the probe takes milliseconds when it works
    while not engine.ready and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.ready, engine.state_reason
    yield anthropic.Anthropic(base_url=front.base_url, api_key=API_KEY, max_retries=0, timeout=600)
    front.server.should_exit = True


def test_create_through_the_remote_engine_matches_the_upstream(
    remote_anthropic: anthropic.Anthropic, messages_upstream: LiveServer
) -> None:
    direct = anthropic.Anthropic(base_url=messages_upstream.base_url, api_key=API_KEY, max_retries=0)
    via = remote_anthropic.messages.create(model=MODEL, max_tokens=10, extra_body=GREEDY, messages=ASK)
    here = direct.messages.create(model=MODEL, max_tokens=10, extra_body=GREEDY, messages=ASK)
    assert via.content[0].type == "text" and via.content[0].text == here.content[0].text
    assert via.stop_reason == here.stop_reason and via.usage.input_tokens == here.usage.input_tokens > 0
    assert via.usage.output_tokens == here.usage.output_tokens


def test_stream_through_the_remote_engine(remote_anthropic: anthropic.Anthropic) -> None:
    with remote_anthropic.messages.stream(model=MODEL, max_tokens=10, extra_body=GREEDY, messages=ASK) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text and final.content[0].text == text and final.stop_reason in ("end_turn", "max_tokens")
    assert final.usage.input_tokens > 0 and final.usage.output_tokens > 0


def test_count_tokens_through_the_remote_engine_is_the_upstreams_count(
    remote_anthropic: anthropic.Anthropic, messages_upstream: LiveServer
) -> None:
    direct = anthropic.Anthropic(base_url=messages_upstream.base_url, api_key=API_KEY, max_retries=0)
    system = "You answer briefly."
    via = remote_anthropic.messages.count_tokens(model=MODEL, system=system, messages=ASK).input_tokens
    assert via == direct.messages.count_tokens(model=MODEL, system=system, messages=ASK).input_tokens > 0
    made = remote_anthropic.messages.create(model=MODEL, max_tokens=2, extra_body=GREEDY, system=system, messages=ASK)
    assert made.usage.input_tokens == via


# --- engine-free pieces -----------------------------------------------------------------------------------------


def test_the_reply_records_the_stop_sequence_it_ended_on() -> None:
    reply = ReplyAssembler(["END", "x!"], started=0.0)
    shown = [reply.feed(piece) for piece in ("ab", "cx", "!yEND")]
    assert "".join(d.text for d in shown if d is not None) == "abc" and reply.stopped
    assert reply.result(1, 3, "stop").stop_sequence == "x!"  # the earliest match in the text, not the first listed
    unstopped = ReplyAssembler(["END"], started=0.0)
    unstopped.feed("abc")
    assert unstopped.result(1, 1, "stop").stop_sequence is None


def test_the_upstreams_stop_reason_names_the_sequence_only_when_asked_for() -> None:
    assert upstream_stop_sequence({"finish_reason": "stop", "stop_reason": "##"}, ("##",)) == "##"
    assert upstream_stop_sequence({"finish_reason": "stop", "stop_reason": 2}, ("##",)) is None  # a terminator's id
    assert upstream_stop_sequence({"finish_reason": "stop"}, ("##",)) is None  # OpenAI's shape does not say


def test_chat_field_names_become_the_messages_apis() -> None:
    origins = ["system", "messages.0", "messages.1", "messages.2.content.0", "messages.2"]
    assert anthropic_param("max_completion_tokens", origins) == "max_tokens"
    assert anthropic_param("stop", origins) == "stop_sequences"
    assert anthropic_param("messages.3.tool_call_id", origins) == "messages.2.content.0.tool_use_id"
    assert anthropic_param("tools.1.function.parameters", origins) == "tools.1.input_schema"
    assert anthropic_param("tools.0.function.name", origins) == "tools.0.name"
    assert anthropic_param("tool_choice.function.name", origins) == "tool_choice.name"
    assert anthropic_param("messages", origins) == "messages"
