"""Names and shapes of an exported decoder's cache buffers: full K/V, or the latents of a latent-KV model.

Every buffer is [batch, heads, max_context, width]; the graph reads `past_<kind>_<layer>` and writes
`present_<kind>_<layer>` (same shape). Kinds: `key`/`value` (heads = num_kv_heads, width = head_dim), or for
`kvconvert fit-latent` models `key_latent`/`value_latent` (heads 1, width = the layer's latent rank) or one
`kv_latent` per layer (joint K/V latent), the layout of `kvconvert.runtime.latent`'s cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ...errors import UserError
from ...models import AttentionView
from .attention_op import OP_TYPE
from .latent_op import LATENT_OP_TYPE


@dataclass(frozen=True)
class Buffer:
    layer: int
    kind: str
    heads: int
    width: int

    @property
    def past(self) -> str:
        return f"past_{self.kind}_{self.layer}"

    @property
    def present(self) -> str:
        return f"present_{self.kind}_{self.layer}"


@dataclass(frozen=True)
class CacheLayout:
    """`kind`: "kv", "latent" (separate K/V latents) or "joint_latent"; `buffers` in graph input order."""

    kind: str
    num_layers: int
    buffers: tuple[Buffer, ...]

    @property
    def latent(self) -> bool:
        return self.kind != "kv"

    @property
    def op_type(self) -> str:
        return LATENT_OP_TYPE if self.latent else OP_TYPE

    def layer(self, i: int) -> tuple[Buffer, ...]:
        return tuple(b for b in self.buffers if b.layer == i)

    def io_names(self) -> tuple[list[str], list[str]]:
        """Graph input and output names."""
        return (["input_ids", "position_ids", "cache_length", *(b.past for b in self.buffers)],
                ["logits", *(b.present for b in self.buffers)])

    def elements_per_token(self) -> int:
        return sum(b.heads * b.width for b in self.buffers)

    def metadata(self, dtype_bytes: int) -> dict[str, Any]:
        return {"kind": self.kind, "shape": "[batch, heads, max_context, width]",
                "buffers": [{"past": b.past, "present": b.present, "layer": b.layer, "heads": b.heads,
                             "width": b.width} for b in self.buffers],
                "elements_per_token": self.elements_per_token(),
                "bytes_per_token": self.elements_per_token() * dtype_bytes}

    def describe(self) -> str:
        if not self.latent:
            return "[batch, num_kv_heads, max_context, head_dim]; new K/V written at cache_length + s"
        return ("[batch, 1, max_context, latent width] pre-RoPE latents; new latents written at cache_length + s; "
                "keys/values rebuilt from them every step")


def cache_layout(view: AttentionView, config: dict[str, Any]) -> CacheLayout:
    """The cache buffers the export of this model has (UserError for latent widths without a latent model)."""
    latent = config.get("model_type") == "kvconvert_latent"
    widths = view.widths()
    if not latent:
        standard = (view.kv_width,) * 2
        if any(tuple(w) != standard for w in widths):
            raise UserError(f"{view.model_type}: config.json carries latent KV widths but model_type is not "
                            "kvconvert_latent; export the folder kvconvert fit-latent wrote, unchanged")
        kv = view.num_kv_heads
        buffers = [Buffer(i, kind, kv, w // kv) for i, (k, v) in enumerate(widths)
                   for kind, w in (("key", k), ("value", v))]
        return CacheLayout("kv", view.num_layers, tuple(buffers))
    joint = bool((config.get("kvconvert_latent") or {}).get("joint_kv", False))
    if joint:
        buffers = [Buffer(i, "kv_latent", 1, k) for i, (k, _) in enumerate(widths)]
    else:
        buffers = [Buffer(i, kind, 1, w) for i, (k, v) in enumerate(widths)
                   for kind, w in (("key_latent", k), ("value_latent", v))]
    return CacheLayout("joint_latent" if joint else "latent", view.num_layers, tuple(buffers))
