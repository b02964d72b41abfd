"""Memory a layer-by-layer run needs, stated before anything is loaded."""

from __future__ import annotations

import math


def layerwise_bytes(reader, view, tokens: int, compute_bytes: int = 4, extra: int = 0) -> int:
    """Largest decoder layer + the non-layer tensors (embeddings, head) at `compute_bytes` per element, the
    hidden states of `tokens` tokens (x4: input, output, attention and MLP intermediates) and `extra` bytes."""
    prefix = view.attn_prefix.split("{layer}")[0]
    per_layer: dict[str, int] = {}
    outer = 0
    for name, (shape, _) in reader.shapes().items():
        n = math.prod(shape)
        if name.startswith(prefix):
            idx = name[len(prefix):].split(".", 1)[0]
            per_layer[idx] = per_layer.get(idx, 0) + n
        else:
            outer += n
    layer = max(per_layer.values(), default=0)
    hidden = tokens * view.hidden_size * 4 * 4
    return (layer + outer) * compute_bytes + hidden + extra
