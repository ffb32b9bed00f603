"""Continuous batching: the engine, its decode thread's runner, the scheduler's budgets, the KV caches."""
