"""Per-row choices inside a pass: sampling, penalties, logprobs, grammar masks."""
