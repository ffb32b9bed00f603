"""ASGI middleware: CORS, the body limit, request ids and logs, and the API-key check routes depend on."""
