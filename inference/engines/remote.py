"""ENGINE=remote: the engine seam served by an OpenAI-compatible upstream.

The upstream is vLLM's OpenAI server, TGI's Messages API, llama.cpp's server or another instance of this
service. This process loads no model and imports neither torch nor transformers: it validates and admits
a request, opens one streamed `chat/completions` call (`completions` for a raw prompt) with the official `openai`
client, and turns its chunks into the same `TextDelta`... `GenerationResult` stream the local engines produce.

- The chat template is the upstream's: messages go as messages. Templates without a system role
  (Gemma2's raises on one) get system text folded into the next user turn (REMOTE_SYSTEM_ROLE).
- Totals come from the upstream's `usage` (asked for with `stream_options.include_usage`).
- Closing the stream closes the upstream response, so the upstream aborts the generation.
- Health: GET /models at start, then every REMOTE_HEALTH_INTERVAL_S while up and with a short back-off
  while down; `state`/`state_reason` say why the engine is not ready. The service recovers by itself
  when the upstream comes back.
- Failures: upstream unreachable -> EngineNotReady (503), upstream 400/422 -> InvalidRequest with its
  message, 429/503 -> EngineBusy, other 5xx, timeouts and broken streams -> UpstreamError (502).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import re
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import openai

from inference.engines.base import Engine
from inference.engines.upstream import (
    chat_completion_body,
    prompt_tokens_of,
    redact_url,
    upstream_logprobs,
    upstream_message,
    upstream_stop_sequence,
)
from inference.model.loading import EMBEDDED_SERVED_ID
from inference.settings import EngineSettings
from inference.text.reply import ReplyAssembler
from inference.types import (
    ContextTooLong,
    EngineBusy,
    EngineNotReady,
    GenerationRequest,
    InvalidRequest,
    ModelInfo,
    StreamEvent,
    UpstreamError,
)

logger = logging.getLogger(__name__)

# How upstreams word "this template has no system role" (HF Gemma templates, vLLM, TGI).
_SYSTEM_ROLE_REFUSED = re.compile(r"system role|system message|roles? must alternate|conversation roles", re.I)
# How upstreams word "prompt + max_tokens is over the context" (this service, vLLM, TGI).
_CONTEXT_REFUSED = re.compile(r"context length|model's context|maximum context|must be <= ?\d+", re.I)
_RETRY_MIN_S, _RETRY_MAX_S = 0.5, 5.0


class UpstreamContextTooLong(ContextTooLong):
    """The upstream said the prompt and max_new_tokens do not fit its context (its own words, its numbers)."""

    def __init__(self, message: str, max_new_tokens: int) -> None:
        InvalidRequest.__init__(self, message)
        self.prompt_tokens = 0  # unknown here: the upstream tokenizes
        self.max_new_tokens = max_new_tokens
        self.context_length = 0


def _describe_connection_error(error: BaseException) -> str:
    cause = error.__cause__ or error.__context__
    detail = f"{type(cause).__name__}: {cause}" if cause is not None and str(cause) else type(error).__name__
    return detail.splitlines()[0][:200]


def _is_connect_failure(error: openai.APIConnectionError) -> bool:
    """True if no connection could be made (as opposed to a connection that went quiet or broke)."""
    cause = error.__cause__
    return cause is not None and type(cause).__name__ in ("ConnectError", "ConnectTimeout")


def _retry_after(error: openai.APIStatusError, default: int = 1) -> int:
    value = error.response.headers.get("retry-after", "")
    try:
        return max(1, int(float(value)))
    except ValueError:
        return default


class RemoteStream:
    """What `submit` returns: the events of one upstream generation.

    `aclose()` always closes the upstream response, even if the stream was never iterated (a client that
    left before the first byte), so the upstream sees the disconnect and stops generating.
    """

    def __init__(self, events: AsyncIterator[StreamEvent], upstream: Any, on_close: Callable[[], None]) -> None:
        self._events = events
        self._upstream = upstream
        self._on_close: Callable[[], None] | None = on_close

    def __aiter__(self) -> RemoteStream:
        return self

    async def __anext__(self) -> StreamEvent:
        try:
            return await self._events.__anext__()
        except BaseException:  # the end, an error or a cancellation: this generation no longer runs
            self._closed()
            raise

    async def aclose(self) -> None:
        self._closed()
        try:
            await self._events.aclose()  # type: ignore[attr-defined]
        finally:
            await self._upstream.close()

    def _closed(self) -> None:
        if self._on_close is not None:
            self._on_close()
            self._on_close = None


class RemoteEngine(Engine):
    name = "remote"

    def __init__(self, settings: EngineSettings, client: openai.AsyncOpenAI | None = None) -> None:
        super().__init__()
        if not settings.remote_url:
            raise ValueError("REMOTE_URL is required when ENGINE=remote")
        self.settings = settings
        self.display_url = redact_url(settings.remote_url)
        self.state_reason = f"connecting to the upstream at {self.display_url}"
        api_key = settings.remote_api_key.get_secret_value() if settings.remote_api_key else "none"
        self.client = client or openai.AsyncOpenAI(
            base_url=settings.remote_url,
            api_key=api_key,
            timeout=openai.Timeout(settings.remote_read_timeout_s, connect=settings.remote_connect_timeout_s),
            max_retries=0,  # a refused or failed call is answered at once; the client decides whether to retry
        )
        self.fold_system = settings.remote_system_role == "fold"
        self._monitor: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None
        self._warned_no_usage = False
        self._streams = 0  # open upstream generations

    @property
    def running(self) -> int:
        """Generations streaming from the upstream now (the upstream queues and batches them)."""
        return self._streams

    def drain(self, reason: str = "the service is shutting down") -> None:
        if self.state in ("loading", "ready", "unavailable"):
            self.state, self.state_reason = "stopping", reason

    # --- lifecycle and health ------------------------------------------------------------------------

    def load(self) -> None:
        """Nothing to load: `start` probes the upstream."""

    async def start(self) -> None:
        """Probe the upstream once, then keep probing in the background. Never fails: a down upstream is a state."""
        self._wake = asyncio.Event()
        await self.probe()
        self._monitor = asyncio.create_task(self._watch(), name="remote-engine-health")

    async def probe(self) -> bool:
        """GET /models once; sets `state`, `state_reason` and `info`. True when the upstream can serve."""
        timeout = openai.Timeout(
            self.settings.remote_connect_timeout_s + 5, connect=self.settings.remote_connect_timeout_s
        )
        wanted = self.settings.remote_model
        try:
            page = await self.client.models.list(timeout=timeout)
            models = list(page.data)
        except (openai.AuthenticationError, openai.PermissionDeniedError) as error:
            return self._set_down(
                f"the upstream at {self.display_url} refused REMOTE_API_KEY (HTTP {error.status_code}): "
                f"{upstream_message(error)}"
            )
        except openai.NotFoundError as error:
            if wanted:  # no /models route (some servers), but the server answered: serve REMOTE_MODEL
                return self._set_up(wanted, None)
            return self._set_down(
                f"the upstream at {self.display_url} has no GET /models (HTTP 404): set REMOTE_MODEL, and check "
                f"that REMOTE_URL ends in /v1 ({upstream_message(error)})"
            )
        except openai.APIStatusError as error:
            return self._set_down(
                f"the upstream at {self.display_url} answered GET /models with HTTP {error.status_code}: "
                f"{upstream_message(error)}"
            )
        except openai.APIConnectionError as error:
            return self._set_down(
                f"the upstream at {self.display_url} is unreachable ({_describe_connection_error(error)})"
            )
        except Exception as error:  # a malformed answer is a down upstream too, never a crashed monitor
            return self._set_down(
                f"the upstream at {self.display_url} gave an unusable GET /models answer ({type(error).__name__})"
            )
        ids = [m.id for m in models]
        if not ids:
            return self._set_down(f"the upstream at {self.display_url} serves no model")
        if wanted and wanted not in ids:
            return self._set_down(
                f"REMOTE_MODEL {wanted!r} is not served by the upstream at {self.display_url} "
                f"(it serves: {', '.join(ids[:5])})"
            )
        chosen = next(m for m in models if m.id == (wanted or ids[0]))
        return self._set_up(chosen.id, getattr(chosen, "max_model_len", None))

    def _set_up(self, model_id: str, upstream_context: object) -> bool:
        context = self.settings.remote_context_length
        if context is None and isinstance(upstream_context, int) and upstream_context > 0:
            context = upstream_context
        self.info = ModelInfo(
            model_id=model_id,
            quantization="upstream",
            dtype="upstream",
            device=self.display_url,
            context_length=context or 0,  # 0: unknown here; the upstream checks the context
            is_embedded_demo=model_id == EMBEDDED_SERVED_ID,
            engine=self.name,
            extra={"upstream": self.display_url},
        )
        if self.state == "stopping":
            return True
        if self.state != "ready":
            logger.info("upstream ready: %s serves %s", self.display_url, model_id)
        self.state, self.state_reason = "ready", "ready"
        return True

    def _set_down(self, reason: str) -> bool:
        if self.state == "stopping":
            return False
        if self.state != "unavailable" or self.state_reason != reason:
            logger.warning("upstream not ready: %s", reason)
        self.state, self.state_reason = "unavailable", reason
        return False

    def _recheck_soon(self) -> None:
        if self._wake is not None:
            self._wake.set()

    async def _watch(self) -> None:
        assert self._wake is not None
        retry = _RETRY_MIN_S
        while self.state != "stopping":
            wait = self.settings.remote_health_interval_s if self.ready else retry
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=wait)
            self._wake.clear()
            if self.state == "stopping":
                return
            try:
                ok = await self.probe()
            except Exception:  # never let the monitor die
                logger.exception("upstream probe failed")
                ok = False
            limit = min(_RETRY_MAX_S, self.settings.remote_health_interval_s)
            retry = _RETRY_MIN_S if ok else min(retry * 2, limit)

    def close(self) -> None:
        super().close()
        if self._monitor is not None:
            self._monitor.cancel()
        with contextlib.suppress(RuntimeError):  # no running loop: the client is collected with the process
            asyncio.get_running_loop().create_task(self.client.close())

    async def aclose(self) -> None:
        """close() and wait for the HTTP client to release its connections."""
        super().close()
        if self._monitor is not None:
            self._monitor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._monitor
        await self.client.close()

    # --- generation ----------------------------------------------------------------------------------

    async def submit(self, request: GenerationRequest) -> RemoteStream:
        info = self.ensure_ready()
        if request.prompt is None and (not request.messages or request.messages[-1].role != "user"):
            raise InvalidRequest("the conversation must end with a user message", param="messages")
        started = time.perf_counter()
        upstream = await self._open(request, info.model_id)
        self._streams += 1
        return RemoteStream(self._events(upstream, request, started), upstream, self._stream_closed)

    async def count_prompt_tokens(self, request: GenerationRequest) -> int:
        """The upstream's own count, from any OpenAI-compatible upstream: a one-token generation's
        `usage.prompt_tokens` (the upstream's chat template applied)."""
        info = self.ensure_ready()
        probe = dataclasses.replace(request, max_new_tokens=1, logprobs=None, response_format=None, stop=())
        return await prompt_tokens_of(await self._open(probe, info.model_id))

    def _stream_closed(self) -> None:
        self._streams -= 1

    async def _open(self, request: GenerationRequest, model: str) -> Any:
        fold = self.fold_system
        try:
            return await self._create(request, model, fold)
        except InvalidRequest as error:
            has_system = any(m.role == "system" for m in request.messages)
            if (
                self.settings.remote_system_role != "auto"
                or fold
                or not has_system
                or not _SYSTEM_ROLE_REFUSED.search(str(error))
            ):
                raise
            upstream = await self._create(request, model, True)  # still refused: that error goes to the client
            logger.info("the upstream's chat template has no system role: folding system messages into user turns")
            self.fold_system = True
            return upstream

    async def _create(self, request: GenerationRequest, model: str, fold: bool) -> Any:
        body = chat_completion_body(request, model, fold)
        options: dict[str, Any] = {}
        if request.request_id:
            options["headers"] = {"X-Request-Id": request.request_id}
        try:
            # The client's generic POST: its transport, auth, error mapping and SSE decoder, with the chunks
            # left as dicts (cast_to=object). Building typed chunk models cost about a fifth of this process's
            # CPU per streamed token under load.
            return await self.client.post(
                "/chat/completions" if request.prompt is None else "/completions",
                cast_to=object,
                body=body,
                options=options,
                stream=True,
                stream_cls=openai.AsyncStream[object],
            )
        except openai.APIStatusError as error:
            raise self._status_error(error, request) from None
        except openai.APIConnectionError as error:
            if _is_connect_failure(error):
                reason = f"the upstream at {self.display_url} is unreachable ({_describe_connection_error(error)})"
                self._set_down(reason)
                self._recheck_soon()
                raise EngineNotReady(reason) from None
            if isinstance(error, openai.APITimeoutError):
                raise UpstreamError(
                    f"the upstream did not answer within {self.settings.remote_read_timeout_s:g} s "
                    "(REMOTE_READ_TIMEOUT_S)"
                ) from None
            self._recheck_soon()
            raise UpstreamError(
                f"the connection to the upstream failed ({_describe_connection_error(error)})"
            ) from None

    def _status_error(self, error: openai.APIStatusError, request: GenerationRequest) -> Exception:
        code, message = error.status_code, upstream_message(error)
        if code in (400, 413, 422):
            if _CONTEXT_REFUSED.search(message):
                return UpstreamContextTooLong(message, request.max_new_tokens)
            param = error.param  # the upstream's own name for the field (OpenAI's error shape), if it gave one
            return InvalidRequest(message, param=param if isinstance(param, str) and param else None)
        if code in (401, 403):
            reason = f"the upstream at {self.display_url} refused REMOTE_API_KEY (HTTP {code})"
            self._set_down(reason)
            return UpstreamError(reason)
        if code in (429, 503):
            return EngineBusy(f"the upstream is busy: {message}", retry_after_s=_retry_after(error))
        return UpstreamError(f"the upstream failed (HTTP {code}): {message}")

    async def _events(self, upstream: Any, request: GenerationRequest, started: float) -> AsyncIterator[StreamEvent]:
        reply = ReplyAssembler((), started)  # no stop matching here: the upstream applies `stop`
        finish: str | None = None
        stop_sequence: str | None = None
        usage: Any = None
        try:
            async for chunk in upstream:
                if not isinstance(chunk, dict):
                    continue
                if chunk.get("usage"):
                    usage = chunk["usage"]
                choices = chunk.get("choices") or []
                if choices:
                    choice = choices[0]
                    if request.logprobs is not None and request.prompt is None:  # chat chunks' logprobs only
                        reply.add_tokens(upstream_logprobs(choice))
                    # chat chunks carry `delta.content`; completions chunks (a raw prompt) carry `text`
                    text = (
                        choice.get("text") if request.prompt is not None else (choice.get("delta") or {}).get("content")
                    )
                    if text:
                        delta = reply.feed(text)
                        if delta is not None:
                            yield delta
                    if choice.get("finish_reason"):
                        finish = choice["finish_reason"]
                        stop_sequence = upstream_stop_sequence(choice, request.stop)
        except openai.APITimeoutError:
            raise UpstreamError(
                f"the upstream went silent for {self.settings.remote_read_timeout_s:g} s mid-stream "
                "(REMOTE_READ_TIMEOUT_S)"
            ) from None
        except openai.APIConnectionError as error:
            self._recheck_soon()
            raise UpstreamError(f"the upstream's stream broke ({_describe_connection_error(error)})") from None
        except openai.APIError as error:  # an error event inside the stream
            raise UpstreamError(f"the upstream failed mid-stream: {upstream_message(error)}") from None
        finally:
            await upstream.close()
        if finish is None:
            raise UpstreamError("the upstream's stream ended without a finish reason")
        if usage is not None:
            input_length = int(usage.get("prompt_tokens") or 0)
            output_length = int(usage.get("completion_tokens") or 0)
        else:
            if not self._warned_no_usage:
                logger.warning("the upstream sends no usage in streams: output_length counts chunks, input_length is 0")
                self._warned_no_usage = True
            input_length, output_length = 0, len(reply.parts)
        self.generated_tokens_total += output_length
        result = reply.result(input_length, output_length, "length" if finish == "length" else "stop")
        result = dataclasses.replace(result, stop_sequence=stop_sequence)
        self.report_result(request, result)  # metrics and request logs
        yield result
