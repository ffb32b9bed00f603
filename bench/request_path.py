"""Which project files one streamed /v1/chat/completions request crosses (issue 26's measure of the request path).

Runs the app in-process on the embedded model (ENGINE as set, default batched), sends one streamed request in the
OpenAI shape (after an unmeasured one), and records every call from one project file into another (a hop), on
every thread. It prints:
- the files, in order of first entry, their number and the number of hops (4 generated tokens by default);
- the route's steps (each call the route function makes: its builder, the engine's checks, `Engine.submit`, ...) and
  the files each step enters; a web-layer file entered by two steps is a bounce (route -> builder -> route -> engine
  -> route -> back into the builder's files). The engine's own two calls (`ensure_ready`, then `submit`) are not.

    .venv/bin/python bench/request_path.py [--max-tokens 4]

Figures: docs/architecture.md#files-a-request-crosses.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from pathlib import Path
from types import FrameType

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
PROJECT = tuple(str(ROOT / p) for p in ("inference", "webapp"))
ROUTE = "chat_completions"  # the route function's name (webapp/api/openai/chat.py)
KEY = "trace-key-0123456789"


def relative(filename: str) -> str:
    return os.path.relpath(filename, ROOT)


class Tracer:
    """A profile hook: hops between project files, and the route's steps with the files each one enters."""

    def __init__(self) -> None:
        self.recording = threading.Event()
        self.lock = threading.Lock()
        self.hops: list[tuple[str, str]] = []
        self.steps: list[tuple[str, set[str]]] = []  # (the route's callee, files its calls enter)
        self._step_frames: dict[FrameType, int] = {}  # frame of a route step (kept alive: ids get reused) -> index

    def __call__(self, frame: FrameType, event: str, arg: object) -> None:
        if event != "call" or not self.recording.is_set():
            return
        callee = frame.f_code.co_filename
        if not callee.startswith(PROJECT):
            return
        caller = frame.f_back
        while caller is not None and not caller.f_code.co_filename.startswith(PROJECT):
            caller = caller.f_back
        source = caller.f_code.co_filename if caller is not None else "<outside>"
        with self.lock:
            if source != callee:
                self.hops.append((relative(source), relative(callee)))
            self._note_step(frame, callee)

    def _note_step(self, frame: FrameType, callee: str) -> None:
        """Attribute the call to the route's step it happens in (the route's callee on the stack)."""
        child, parent = frame, frame.f_back
        while parent is not None and parent.f_code.co_name != ROUTE:
            child, parent = parent, parent.f_back
        if parent is None or (child is frame and frame.f_code.co_name == ROUTE):
            return
        index = self._step_frames.get(child)
        if index is None:
            index = self._step_frames[child] = len(self.steps)
            self.steps.append((f"{relative(child.f_code.co_filename)}:{child.f_code.co_name}", set()))
        if child.f_code.co_filename.startswith(PROJECT) or callee != child.f_code.co_filename:
            self.steps[index][1].add(relative(callee))


def trace(max_tokens: int) -> Tracer:
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from fastapi.testclient import TestClient

    from inference import build_engine
    from webapp.server import create_app
    from webapp.settings import Settings

    settings = Settings(model_id="embedded", _env_file=None)  # type: ignore[call-arg]
    engine = build_engine(settings)
    app = create_app(settings, engine, [KEY], with_ui=False)
    tracer = Tracer()
    body = {
        "model": "sahabat-ai",
        "stream": True,
        "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": "Halo"}],
    }
    headers = {"Authorization": f"Bearer {KEY}"}
    # Set before any thread starts (the engine's, the test client's portal); it records only while `recording`.
    threading.setprofile(tracer)
    sys.setprofile(tracer)
    try:
        with TestClient(app) as client:
            while engine.state == "loading":
                time.sleep(0.2)
            client.post("/v1/chat/completions", json=body, headers=headers)  # first-use work stays out
            tracer.recording.set()
            response = client.post("/v1/chat/completions", json=body, headers=headers)
            tracer.recording.clear()
    finally:
        sys.setprofile(None)
        threading.setprofile(None)
    if response.status_code != 200:
        raise SystemExit(f"the request failed: {response.status_code} {response.text}")
    return tracer


def bounces(tracer: Tracer) -> list[str]:
    """The web-layer files that two of the route's steps enter, each with the two steps."""
    seen: dict[str, str] = {}
    found = []
    for step, entered in tracer.steps:
        for name in sorted(entered):
            if name.startswith("webapp/") and name in seen and seen[name] != step:
                found.append(f"{name} ({seen[name]}, then {step})")
            seen.setdefault(name, step)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-tokens", type=int, default=4)
    args = parser.parse_args()
    tracer = trace(args.max_tokens)
    files = list(dict.fromkeys(target for _, target in tracer.hops))
    print("files, in order of first entry:")
    for name in files:
        print("  ", name)
    print(f"files: {len(files)}   hops: {len(tracer.hops)}")
    print("the route's steps, and the files each enters:")
    for step, entered in tracer.steps:
        print(f"   {step}: {', '.join(sorted(entered))}")
    print("files two steps enter (bounces):", "; ".join(bounces(tracer)) or "none")


if __name__ == "__main__":
    main()
