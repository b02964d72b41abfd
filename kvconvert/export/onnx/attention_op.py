"""The `kvconvert::KVAttention` op: PyTorch reference semantics and its ONNX symbolic.

One node per layer. Inputs (new tokens already projected, normed and rotated):
  query [B, H, S, D], key [B, KV, S, D], value [B, KV, S, Dv],
  past_key [B, KV, T, D], past_value [B, KV, T, Dv] (fixed-capacity buffers), cache_length int64 [B].
Outputs: output [B, S, H, Dv], present_key [B, KV, T, D], present_value [B, KV, T, Dv].
The new K/V of token s of sequence b is written at slot cache_length[b] + s; query s (position
t = cache_length[b] + s) attends to slots j <= t, and j > t - sliding_window when sliding_window > 0 (the
model's own window), and j < sink or j > t - window for a sink_window policy (`policy_{phase}_sink`,
`policy_{phase}_window`; phase = decode when S == 1, else prefill; window 0 = no policy restriction).
"""

from __future__ import annotations

from typing import Any

import torch

DOMAIN = "kvconvert"
OP_TYPE = "KVAttention"
PLUGIN_NAMESPACE = "kvconvert"
PLUGIN_VERSION = "1"


def node_attributes(*, num_heads: int, num_kv_heads: int, head_dim: int, scale: float, softcap: float = 0.0,
                    sliding_window: int = 0, layer: int = 0, policy: dict[str, Any] | None = None) -> dict[str, Any]:
    """The attribute set of one KVAttention node (also recorded in the graph metadata)."""
    attrs: dict[str, Any] = {
        "num_heads": int(num_heads), "num_kv_heads": int(num_kv_heads), "head_dim": int(head_dim),
        "scale": float(scale), "softcap": float(softcap or 0.0), "sliding_window": int(sliding_window or 0),
        "layer": int(layer), "policy": "dense",
        "plugin_namespace": PLUGIN_NAMESPACE, "plugin_version": PLUGIN_VERSION,
    }
    for phase in ("decode", "prefill"):
        attrs[f"policy_{phase}"] = "dense"
        attrs[f"policy_{phase}_sink"] = 0
        attrs[f"policy_{phase}_window"] = 0
    for key, value in (policy or {}).items():
        attrs["policy" if key == "kind" else f"policy_{key}"] = value
    return attrs


def write_cache(past: torch.Tensor, new: torch.Tensor, cache_length: torch.Tensor) -> torch.Tensor:
    """past [B, KV, T, D] with new [B, KV, S, D] written at slots cache_length[b] + s (a new tensor)."""
    s = new.shape[2]
    slots = cache_length[:, None] + torch.arange(s, device=new.device)[None, :]
    index = slots[:, None, :, None].expand(new.shape)
    return past.scatter(2, index, new)


def allowed_slots(cache_length: torch.Tensor, s: int, t: int, attrs: dict[str, Any]) -> torch.Tensor:
    """bool [B, S, T]: which cache slots query s of each sequence attends to (see the module doc)."""
    i = cache_length[:, None, None] + torch.arange(s, device=cache_length.device)[None, :, None]
    j = torch.arange(t, device=cache_length.device)[None, None, :]
    allowed = j <= i
    if attrs["sliding_window"] > 0:
        allowed = allowed & (j > i - attrs["sliding_window"])
    phase = "decode" if s == 1 else "prefill"
    sink, window = attrs[f"policy_{phase}_sink"], attrs[f"policy_{phase}_window"]
    if window > 0:
        allowed = allowed & ((j < sink) | (j > i - window))
    return allowed


def kv_attention_reference(query, key, value, past_key, past_value, cache_length, attrs: dict[str, Any]):
    """Eager PyTorch semantics of KVAttention (what the ONNX function body computes); see module doc."""
    present_key = write_cache(past_key, key, cache_length)
    present_value = write_cache(past_value, value, cache_length)
    b, h, s, d = query.shape
    kv, t = present_key.shape[1], present_key.shape[2]
    q = query.reshape(b, kv, (h // kv) * s, d)
    scores = torch.matmul(q, present_key.transpose(2, 3)) * attrs["scale"]
    if attrs["softcap"] > 0:
        scores = torch.tanh(scores / attrs["softcap"]) * attrs["softcap"]
    scores = scores.reshape(b, kv, h // kv, s, t)
    allowed = allowed_slots(cache_length, s, t, attrs)
    scores = scores.masked_fill(~allowed[:, None, None], float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1).to(query.dtype).reshape(b, kv, (h // kv) * s, t)
    out = torch.matmul(probs, present_value).reshape(b, h, s, -1).transpose(1, 2)
    return out, present_key, present_value


def _onnx_attr(g_kwargs: dict[str, Any], name: str, value: Any) -> None:
    if isinstance(value, bool):
        g_kwargs[f"{name}_i"] = int(value)
    elif isinstance(value, int):
        g_kwargs[f"{name}_i"] = value
    elif isinstance(value, float):
        g_kwargs[f"{name}_f"] = value
    elif isinstance(value, (list, tuple)) and all(isinstance(v, int) for v in value):
        g_kwargs[f"{name}_i"] = list(value)
    elif isinstance(value, (list, tuple)):
        g_kwargs[f"{name}_f"] = [float(v) for v in value]
    else:
        g_kwargs[f"{name}_s"] = str(value)


class KVAttentionFunction(torch.autograd.Function):
    """Runs the eager reference; the TorchScript ONNX exporter turns it into one kvconvert::KVAttention node."""

    @staticmethod
    def forward(ctx, query, key, value, past_key, past_value, cache_length, attrs_items):
        return kv_attention_reference(query, key, value, past_key, past_value, cache_length, dict(attrs_items))

    @staticmethod
    def symbolic(g, query, key, value, past_key, past_value, cache_length, attrs_items):
        kwargs: dict[str, Any] = {}
        for name, val in attrs_items:
            _onnx_attr(kwargs, name, val)
        out, present_key, present_value = g.op(f"{DOMAIN}::{OP_TYPE}", query, key, value, past_key, past_value,
                                               cache_length, outputs=3, **kwargs)
        attrs = dict(attrs_items)
        out.setType(query.type().with_sizes([None, None, attrs["num_heads"], None]))
        present_key.setType(past_key.type())
        present_value.setType(past_value.type())
        return out, present_key, present_value


def kv_attention(query, key, value, past_key, past_value, cache_length, attrs: dict[str, Any]):
    return KVAttentionFunction.apply(query, key, value, past_key, past_value, cache_length,
                                     tuple(sorted(attrs.items())))
