"""The documented API (`/api/v1/generate-text`, `/api/v1/chat`), docs/api.md."""
