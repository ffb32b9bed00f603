"""GET /v1/models and /v1/models/{id}, and the `model` names this server answers to on every OpenAI route: the
served model's id and the alias `sahabat-ai`.

Policy (docs/api.md, "Model names"): `GET /v1/models` lists exactly these names; a request body naming any other
model is a 404 `model_not_found`, as vLLM and OpenAI answer, so a client pointed at the wrong server or asking for a
model it will not get (LangChain's default `gpt-3.5-turbo`) hears so instead of getting another model's text under
the name it asked for. A body without `model` gets the served model. Responses always carry the served id.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping

from fastapi import APIRouter, Depends, Request

from inference import Engine, GenerationRequest, InvalidRequest, ModelInfo, StreamEvent
from webapp.api.openai.protocol import ERRORS, NOT_FOUND, OpenAIModel, OpenAIModelList
from webapp.errors import ModelNotFound, rename_param
from webapp.middleware.auth import authenticate

router = APIRouter(prefix="/v1", tags=["OpenAI-compatible"], dependencies=[Depends(authenticate)])

ALIAS = "sahabat-ai"  # the name the README's and docs' examples use, whatever model is served


def served_names(info: ModelInfo) -> list[str]:
    """The served id first (the remote engine and other clients take the first listed), then the alias."""
    return [info.model_id] if info.model_id == ALIAS else [info.model_id, ALIAS]


def check_model(name: str | None, info: ModelInfo, param: str | None = "model") -> None:
    """Raise ModelNotFound (404) for a name this server does not answer to; None (not sent) is the served model."""
    if name is not None and name not in served_names(info):
        raise ModelNotFound(name, served_names(info), param=param)


@router.get("/models", response_model=OpenAIModelList, responses=ERRORS)
async def list_models(request: Request) -> OpenAIModelList:
    info = request.app.state.engine.ensure_ready()
    created = request.app.state.started_at
    return OpenAIModelList(data=[OpenAIModel(id=name, created=created) for name in served_names(info)])


@router.get("/models/{model_id:path}", response_model=OpenAIModel, responses={**ERRORS, 404: NOT_FOUND})
async def retrieve_model(model_id: str, request: Request) -> OpenAIModel:
    info = request.app.state.engine.ensure_ready()
    check_model(model_id, info, param=None)
    return OpenAIModel(id=model_id, created=request.app.state.started_at)


async def submit_to_model(
    engine: Engine, generation: GenerationRequest, model: str | None, params: Mapping[str, str] | None = None
) -> tuple[ModelInfo, AsyncIterator[StreamEvent]]:
    """What every /v1 generation route does once its builder is done: the engine is ready (503 while loading), the
    body's `model` is one this server answers to (404), and the engine admits the request (its stream). `params`:
    the route's names for the fields an engine's 400 names in the chat API's terms."""
    info = engine.ensure_ready()
    check_model(model, info)
    try:
        return info, await engine.submit(generation)
    except InvalidRequest as error:
        rename_param(error, params or {})
        raise
