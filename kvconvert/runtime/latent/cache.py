"""Measuring what a transformers cache really holds."""

from __future__ import annotations


def cache_bytes(cache) -> int:
    """Bytes of all key/value tensors held by `cache` (a transformers Cache), summed over layers.

    For a latent model the layers hold Tensor[batch, 1, tokens, width] latents, so this is
    batch x tokens x sum(latent widths) x dtype bytes (sliding-window layers hold at most the window).
    """
    total = 0
    for layer in cache.layers:
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if t is not None:
                total += t.numel() * t.element_size()
    return total
