"""The `model` names this server answers to, on every OpenAI route: the served model's id and the alias `sahabat-ai`.

Policy (docs/api.md, "Model names"): `GET /v1/models` lists exactly these names; a request body naming any other
model is a 404 `model_not_found`, as vLLM and OpenAI answer, so a client pointed at the wrong server or asking for a
model it will not get (LangChain's default `gpt-3.5-turbo`) hears so instead of getting another model's text under
the name it asked for. A body without `model` gets the served model. Responses always carry the served id.
"""

from __future__ import annotations

from inference import ModelInfo
from webapp.errors import ModelNotFound

ALIAS = "sahabat-ai"  # the name the README's and docs' examples use, whatever model is served


def served_names(info: ModelInfo) -> list[str]:
    """The served id first (the remote engine and other clients take the first listed), then the alias."""
    return [info.model_id] if info.model_id == ALIAS else [info.model_id, ALIAS]


def check_model(name: str | None, info: ModelInfo, param: str | None = "model") -> None:
    """Raise ModelNotFound (404) for a name this server does not answer to; None (not sent) is the served model."""
    if name is not None and name not in served_names(info):
        raise ModelNotFound(name, served_names(info), param=param)
