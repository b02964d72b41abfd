"""What share of the KV cache a sparse decode policy reads per generated token, at a given context."""

from __future__ import annotations


def decode_read_fraction(policy, num_layers: int, context: int) -> float:
    """Mean over layers of (cached tokens read by one decode step) / context, for a `SparsePolicy`
    (each phase policy's own `decode_read` formula, the one the runtime's read statistics use)."""
    if not num_layers:
        return 1.0
    reads = [policy.for_layer(layer).decode.decode_read(context) for layer in range(num_layers)]
    return sum(r / context for r in reads) / num_layers
