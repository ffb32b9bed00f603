"""MODEL_ID -> (model, tokenizer): GGUF, hub id or local directory, bitsandbytes; the converted cache; memory."""
