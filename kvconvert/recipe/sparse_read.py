"""What share of the KV cache a sparse decode policy reads per generated token, at a given context."""

from __future__ import annotations


def decode_read_fraction(policy, num_layers: int, context: int) -> float:
    """Mean over layers of (cached tokens read by one decode step) / context, for a `SparsePolicy`."""
    from ..runtime.sparse import PageTopKPolicy, SinkWindowPolicy

    total = 0.0
    for layer in range(num_layers):
        p = policy.for_layer(layer).decode
        if isinstance(p, PageTopKPolicy):
            read = min(context, p.pages_kept(context) * p.page)
        elif isinstance(p, SinkWindowPolicy):
            read = min(context, p.sink + p.window)
        else:
            read = context
        total += read / context
    return total / num_layers if num_layers else 1.0
