"""Measurements: perplexity, KV size, needle retrieval."""
