"""The engines behind the `Engine` seam: sequential, batched (continuous batching), remote; the factory picks one."""
