"""OpenAI's Responses API: POST /v1/responses, stateless, on top of the chat builder."""
