"""Messages -> prompt token ids (chat template, system folding, control tokens); token ids -> reply text."""
