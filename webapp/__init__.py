"""HTTP API and chat page. Knows nothing of torch: it talks to an `inference.Engine`."""
