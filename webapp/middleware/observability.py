"""Per-request observation: request ids, the one log line per request, and HTTP metrics.

`RequestObserverMiddleware` is a plain ASGI middleware (so it sees streamed responses to their last byte).
For each HTTP request it
- takes the incoming `X-Request-ID` when it is sane, else makes one, and returns it as `X-Request-ID`;
- records the request in `sahabat_http_requests_total` and the latency histogram, by route template;
- writes one log line: request id, method, path, route, status, prompt/generated tokens, TTFT, duration.

Token counts and TTFT come from the engine (`Engine.add_result_listener`): the listener finds the
request's record through a context variable (or the request id carried by the GenerationRequest).
One `RequestObserver` per app holds both ends.
Never logged: headers (so never a key), query strings, and the prompt unless LOG_PROMPTS=true.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from starlette.datastructures import MutableHeaders
from starlette.routing import Mount
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from inference import GenerationRequest, GenerationResult
from webapp.ops.metrics import ServiceMetrics

REQUEST_ID_HEADER = "X-Request-ID"
SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:\-]{0,127}")
QUIET_ROUTES = frozenset({"/health", "/ready", "/metrics"})  # probes and scrapes log at DEBUG
LOGGED_PROMPT_CHARS = 2000

access_logger = logging.getLogger("webapp.access")


@dataclass
class RequestRecord:
    request_id: str
    method: str
    path: str
    started: float = field(default_factory=time.perf_counter)
    route: str = ""
    status: int = 0
    prompt_tokens: int | None = None
    generated_tokens: int | None = None
    ttft_s: float | None = None
    finish_reason: str | None = None
    prompt: str | None = None
    open: bool = True
    owner: object = None  # the RequestObserver (app) serving it

    def add_result(self, request: GenerationRequest, result: GenerationResult, log_prompt: bool) -> None:
        """Add one generation's totals (a request may run several, e.g. OpenAI `n`)."""
        self.prompt_tokens = (self.prompt_tokens or 0) + result.input_length
        self.generated_tokens = (self.generated_tokens or 0) + result.output_length
        if result.time_to_first_token_s is not None and self.ttft_s is None:
            self.ttft_s = result.time_to_first_token_s
        self.finish_reason = result.finish_reason
        if log_prompt and (request.messages or request.prompt is not None):
            text = request.messages[-1].content if request.messages else request.prompt or ""
            self.prompt = text[:LOGGED_PROMPT_CHARS]

    def fields(self, duration_s: float) -> dict[str, Any]:
        out: dict[str, Any] = {
            "request_id": self.request_id,
            "method": self.method,
            "path": self.path,
            "route": self.route,
            "status": self.status,
        }
        if self.generated_tokens is not None:
            out["prompt_tokens"] = self.prompt_tokens
            out["generated_tokens"] = self.generated_tokens
            out["finish_reason"] = self.finish_reason
        if self.ttft_s is not None:
            out["ttft_ms"] = round(self.ttft_s * 1000, 1)
        out["duration_ms"] = round(duration_s * 1000, 1)
        if self.prompt is not None:
            out["prompt"] = self.prompt
        return out


_current: ContextVar[RequestRecord | None] = ContextVar("current_request", default=None)


def current_request_id() -> str:
    """The id of the HTTP request being served in this context, or ""."""
    record = _current.get()
    return record.request_id if record is not None else ""


def new_request_id() -> str:
    """A fresh request id: for an HTTP request that brings no sane one, and for each reply of the chat page."""
    return uuid.uuid4().hex


def request_id_from(scope: Scope) -> str:
    for name, value in scope.get("headers", ()):
        if name == b"x-request-id":
            candidate = value.decode("latin-1").strip()
            if SANE_REQUEST_ID.fullmatch(candidate):
                return candidate
            break
    return new_request_id()


def route_template(scope: Scope) -> str:
    """The matched route's template (`/api/v1/chat`), never the raw path: bounded label values."""
    route = scope.get("route")
    if route is None:
        return "unmatched"
    path = getattr(route, "path", None)
    if not isinstance(path, str):
        return "unmatched"
    if isinstance(route, Mount):
        return f"{path}/{{path}}"
    return path or "/"


class RequestObserver:
    """One app's observation state: open request records, HTTP metrics, the engine result listener."""

    def __init__(self, metrics: ServiceMetrics, log_prompts: bool = False) -> None:
        self.metrics = metrics
        self.log_prompts = log_prompts
        self._open: dict[str, RequestRecord] = {}

    def begin(self, scope: Scope) -> RequestRecord:
        request_id = request_id_from(scope)
        record = RequestRecord(request_id, method=scope.get("method", ""), path=scope.get("path", ""), owner=self)
        self._open[request_id] = record
        return record

    def finish(self, record: RequestRecord, scope: Scope) -> None:
        if self._open.get(record.request_id) is record:
            del self._open[record.request_id]
        record.open = False
        record.route = route_template(scope)
        duration = time.perf_counter() - record.started
        self.metrics.observe_request(record.method, record.route, record.status, duration)
        level = logging.DEBUG if record.route in QUIET_ROUTES and record.status < 400 else logging.INFO
        access_logger.log(
            level, "%s %s %s", record.method, record.path, record.status, extra={"fields": record.fields(duration)}
        )

    def on_result(self, request: GenerationRequest, result: GenerationResult) -> None:
        """The engine's result listener: metrics, and the tokens/TTFT of the request's log line."""
        record = _current.get()
        if record is None or not record.open:
            record = self._open.get(request.request_id) if request.request_id else None
        if record is not None and record.owner is not self:
            return  # another app on the same engine (tests) counts it
        self.metrics.observe_generation(request, result)
        if record is not None and record.open:
            record.add_result(request, result, self.log_prompts)


class RequestObserverMiddleware:
    """ASGI middleware: request id in and out, and `RequestObserver.finish` once the response is done."""

    def __init__(self, app: ASGIApp, observer: RequestObserver) -> None:
        self.app = app
        self.observer = observer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        record = self.observer.begin(scope)
        request_id = record.request_id
        token = _current.set(record)
        scope.setdefault("state", {})["request_id"] = request_id  # the routes read `request.state.request_id`

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                record.status = int(message["status"])
                MutableHeaders(scope=message)[REQUEST_ID_HEADER] = request_id
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except BaseException:
            if record.status == 0:
                record.status = 500  # what the outer error handler answers
            raise
        finally:
            _current.reset(token)
            self.observer.finish(record, scope)


class TextFormatter(logging.Formatter):
    """`time level logger: message key=value ...`"""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict) and fields:
            tail = " ".join(f"{key}={_text_value(value)}" for key, value in fields.items())
            first, newline, rest = line.partition("\n")
            line = f"{first} {tail}{newline}{rest}"
        return line


def _text_value(value: Any) -> str:
    text = "-" if value is None else str(value)
    return json.dumps(text, ensure_ascii=False) if (not text or any(c in text for c in ' "=\n')) else text


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, the record's fields, and the exception."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            out.update(fields)
        if record.exc_info:
            out["exc_info"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False, default=str)


def configure_logging(level: str, log_format: str) -> None:
    """Root logging for the process; uvicorn's loggers propagate to it (its access log is replaced by ours)."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    root = logging.getLogger()
    for existing in list(root.handlers):
        root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
    for noisy in ("httpx", "httpx2", "httpcore", "urllib3"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
