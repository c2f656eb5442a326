"""Gymnasium environments for token-level text generation (see the "text-generation env" issue)."""
