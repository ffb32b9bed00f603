"""Operations: /health, /ready, /metrics and the graceful shutdown."""
