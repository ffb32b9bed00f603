"""The path of one request (docs/architecture.md#files-a-request-crosses): a streamed /v1/chat/completions request,
traced through the app in-process on the embedded model, enters no web-layer file from two of the route's steps
(route -> builder -> route -> engine -> route -> back into the builder's files: the bounce issue 26 removed)."""

from __future__ import annotations

from bench.request_path import bounces, trace


def test_a_chat_completion_takes_one_path_through_the_web_layer() -> None:
    tracer = trace(max_tokens=2)
    steps = [step for step, _ in tracer.steps]
    assert any(step.endswith(":openai_request") for step in steps), steps  # the builder, called once by the route
    # the engine is reached from one step (submit_to_model: ready, model name, submit)
    assert [step for step, files in tracer.steps if "inference/engines/batched/engine.py" in files] == [
        "webapp/api/openai/models.py:submit_to_model"
    ], tracer.steps
    assert bounces(tracer) == []
    entered = {name for _, name in tracer.hops}
    assert "webapp/api/openai/tools.py" in entered  # tools are resolved, once, by the builder
