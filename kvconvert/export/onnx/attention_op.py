"""The `kvconvert::KVAttention` op: PyTorch reference semantics and its ONNX symbolic.

One node per layer. Inputs (new tokens already projected, normed and rotated):
  query [B, H, S, D], key [B, KV, S, D], value [B, KV, S, Dv],
  past_key [B, KV, T, D], past_value [B, KV, T, Dv] (fixed-capacity buffers), cache_length int64 [B].
Outputs: output [B, S, H, Dv], present_key [B, KV, T, D], present_value [B, KV, T, Dv].
The new K/V of token s of sequence b is written at slot cache_length[b] + s; query s (position
t = cache_length[b] + s) attends to slots j <= t, and j > t - sliding_window when sliding_window > 0 (the
model's own window), and j < sink or j > t - window for a sink_window policy (`policy_{phase}_sink`,
`policy_{phase}_window`; phase = decode when S == 1, else prefill; window 0 = no policy restriction).
A decode step of a `page_topk` layer (`policy_decode_page` > 0) with L = cache_length + 1 >=
`policy_decode_dense_below` reads only the pages `kvconvert.kernels.selection.select_pages` picks (per KV
head; Quest scores from per-page key min/max).
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
    attrs.update(PAGE_TOPK_OFF)
    attrs.update(BLOCK_SPARSE_OFF)
    for key, value in (policy or {}).items():
        attrs["policy" if key == "kind" else f"policy_{key}"] = value
    return attrs


BLOCK_SPARSE_OFF = {"policy_prefill_tile": 0, "policy_prefill_mass": 0.0, "policy_prefill_density": 0.0,
                    "policy_prefill_sink_blocks": 0, "policy_prefill_local_blocks": 0,
                    "policy_prefill_dense_below": 0}
PAGE_TOPK_OFF = {"policy_decode_page": 0, "policy_decode_keep": 0.0, "policy_decode_budget": 0,
                 "policy_decode_sink_pages": 0, "policy_decode_recent_pages": 0, "policy_decode_dense_below": 0}


def page_topk_mask(query: torch.Tensor, present_key: torch.Tensor, cache_length: torch.Tensor,
                   attrs: dict[str, Any]) -> torch.Tensor | None:
    """bool [B, KV, 1, 1, T]: slots in the pages a page_topk decode step reads (None: not a page_topk step)."""
    page = attrs["policy_decode_page"]
    if page <= 0 or query.shape[2] != 1:
        return None
    from ...kernels.selection import num_pages, page_summaries, score_pages, select_pages

    b, kv, t, _ = present_key.shape
    lengths = cache_length + 1
    n = num_pages(lengths, page)
    if attrs["policy_decode_budget"] > 0:
        keep = torch.full_like(n, -(-attrs["policy_decode_budget"] // page))
    else:
        keep = torch.ceil(n.double() * attrs["policy_decode_keep"] - 1e-9).long()
    dense_row = lengths < attrs["policy_decode_dense_below"]
    keep = torch.where(dense_row, n, keep)
    kmin, kmax = page_summaries(present_key, lengths, page)
    sel = select_pages(score_pages(query[:, :, 0], kmin, kmax), lengths, page, keep,
                       attrs["policy_decode_sink_pages"], attrs["policy_decode_recent_pages"])
    pages = torch.zeros(b, kv, kmin.shape[2] + 1, dtype=torch.bool)
    pages.scatter_(2, torch.where(sel.indices < 0, kmin.shape[2], sel.indices).long(), True)
    slots = pages[:, :, :-1].repeat_interleave(page, dim=2)[:, :, :t]
    return slots[:, :, None, None, :]


def block_sparse_mask(query: torch.Tensor, present_key: torch.Tensor, cache_length: torch.Tensor,
                      attrs: dict[str, Any]) -> torch.Tensor | None:
    """bool [B, KV, 1, S, T]: slots in the key blocks a block_sparse_prefill step reads (None: not such a step)."""
    tile, s = attrs["policy_prefill_tile"], query.shape[2]
    if tile <= 0 or s == 1 or s < attrs["policy_prefill_dense_below"]:
        return None
    from ...kernels.selection import block_importance, select_blocks

    b, kv, t, _ = present_key.shape
    nq = -(-s // tile)
    mask = torch.zeros(b, kv, 1, s, t, dtype=torch.bool)
    density = attrs["policy_prefill_density"] or None
    for row in range(b):
        length = int(cache_length[row]) + s
        probs = block_importance(query[row:row + 1], present_key[row:row + 1, :, :length], tile, attrs["scale"])
        sel = select_blocks(probs, s, length, tile, mass=None if density else attrs["policy_prefill_mass"],
                            density=density, sink_blocks=attrs["policy_prefill_sink_blocks"],
                            local_blocks=attrs["policy_prefill_local_blocks"])
        nk = probs.shape[-1]
        kept = torch.zeros(1, kv, nq, nk + 1, dtype=torch.bool)
        kept.scatter_(3, torch.where(sel.indices < 0, nk, sel.indices).long(), True)
        slots = kept[0, :, :, :nk].repeat_interleave(tile, 1).repeat_interleave(tile, 2)[:, :s, :length]
        mask[row, :, 0, :, :length] = slots
    return mask


def write_cache(past: torch.Tensor, new: torch.Tensor, cache_length: torch.Tensor) -> torch.Tensor:
    """past [B, X, T, W] with new [B, X, S, W] written at slots cache_length[b] + s (a new tensor)."""
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


def attend(query, present_key, present_value, cache_length, attrs: dict[str, Any]) -> torch.Tensor:
    """output [B, S, H, Dv]: query [B, H, S, D] (position cache_length + s) over the whole cache
    present_key [B, KV, T, D] / present_value [B, KV, T, Dv] under the mask and policy of the module doc."""
    b, h, s, d = query.shape
    kv, t = present_key.shape[1], present_key.shape[2]
    q = query.reshape(b, kv, (h // kv) * s, d)
    scores = torch.matmul(q, present_key.transpose(2, 3)) * attrs["scale"]
    if attrs["softcap"] > 0:
        scores = torch.tanh(scores / attrs["softcap"]) * attrs["softcap"]
    scores = scores.reshape(b, kv, h // kv, s, t)
    allowed = allowed_slots(cache_length, s, t, attrs)
    allowed = allowed[:, None, None]
    pages = page_topk_mask(query, present_key, cache_length, attrs)
    if pages is not None:
        allowed = allowed & pages
    blocks = block_sparse_mask(query, present_key, cache_length, attrs)
    if blocks is not None:
        allowed = allowed & blocks
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1).to(query.dtype).reshape(b, kv, (h // kv) * s, t)
    return torch.matmul(probs, present_value).reshape(b, h, s, -1).transpose(1, 2)


def kv_attention_reference(query, key, value, past_key, past_value, cache_length, attrs: dict[str, Any]):
    """Eager PyTorch semantics of KVAttention (what the ONNX function body computes); see module doc."""
    present_key = write_cache(past_key, key, cache_length)
    present_value = write_cache(past_value, value, cache_length)
    return attend(query, present_key, present_value, cache_length, attrs), present_key, present_value


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


def onnx_attrs(attrs_items) -> dict[str, Any]:
    """Node attributes as the TorchScript `g.op` keyword arguments (`name_i`, `name_f`, `name_s`)."""
    kwargs: dict[str, Any] = {}
    for name, val in attrs_items:
        _onnx_attr(kwargs, name, val)
    return kwargs


class KVAttentionFunction(torch.autograd.Function):
    """Runs the eager reference; the TorchScript ONNX exporter turns it into one kvconvert::KVAttention node."""

    @staticmethod
    def forward(ctx, query, key, value, past_key, past_value, cache_length, attrs_items):
        return kv_attention_reference(query, key, value, past_key, past_value, cache_length, dict(attrs_items))

    @staticmethod
    def symbolic(g, query, key, value, past_key, past_value, cache_length, attrs_items):
        kwargs = onnx_attrs(attrs_items)
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
