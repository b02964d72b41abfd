"""Where the attention projections of one layer live in a checkpoint, by head, for any registered architecture.

Rows of q/k/v weights are head-major: head h owns rows h*head_dim .. (h+1)*head_dim - 1; o_proj columns
follow the same order. A fused `qkv` weight stacks rows `[q heads | k heads | v heads]`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from ..models import AttentionView


@dataclass
class LayerAttention:
    """One layer's attention projections (fp32). Shapes with H query heads, KV key/value heads, d = head_dim:
    q [H*d, hidden], k/v [KV*d, hidden], o [hidden, H*d]; biases [rows] or None."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    o: torch.Tensor
    q_bias: torch.Tensor | None = None
    k_bias: torch.Tensor | None = None
    v_bias: torch.Tensor | None = None
    o_bias: torch.Tensor | None = None

    def with_(self, **changes) -> "LayerAttention":
        return replace(self, **changes)


def tensor_names(view: AttentionView, layer: int) -> dict[str, str]:
    """Role -> checkpoint name for one layer: q/k/v/o (`.weight`), q_bias/k_bias/v_bias/o_bias, or qkv/qkv_bias."""
    pre, n = view.layer_prefix(layer), view.names
    names = {"o": f"{pre}.{n.o}.weight"}
    if view.o_bias:
        names["o_bias"] = f"{pre}.{n.o}.bias"
    if view.fused_qkv:
        names["qkv"] = f"{pre}.{n.qkv}.weight"
        if view.q_bias or view.k_bias or view.v_bias:
            names["qkv_bias"] = f"{pre}.{n.qkv}.bias"
        return names
    for role in ("q", "k", "v"):
        names[role] = f"{pre}.{getattr(n, role)}.weight"
        if getattr(view, f"{role}_bias"):
            names[f"{role}_bias"] = f"{pre}.{getattr(n, role)}.bias"
    return names


def kv_roles(view: AttentionView) -> dict[str, tuple[int, str]]:
    """Checkpoint name -> (layer, role) for every tensor that holds K or V rows (k, v, their biases, qkv)."""
    kv = ("k", "v", "k_bias", "v_bias", "qkv", "qkv_bias")
    return {name: (layer, role) for layer in range(view.num_layers)
            for role, name in tensor_names(view, layer).items() if role in kv}


def split_fused(t: torch.Tensor, heads: int, kv_heads: int, head_dim: int) -> tuple[torch.Tensor, ...]:
    """Fused qkv rows [H*d | KV*d | KV*d] (weight or bias) -> (q, k, v)."""
    return torch.split(t, [heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=0)


def read_layer(get: Callable[[str], torch.Tensor], view: AttentionView, layer: int) -> LayerAttention:
    """Gather one layer's projections as fp32 via `get(name)`."""
    names = tensor_names(view, layer)
    f = {role: get(name).float() for role, name in names.items()}
    if view.fused_qkv:
        q, k, v = split_fused(f["qkv"], view.num_heads, view.num_kv_heads, view.head_dim)
        bias = f.get("qkv_bias")
        qb, kb, vb = split_fused(bias, view.num_heads, view.num_kv_heads, view.head_dim) if bias is not None \
            else (None, None, None)
        return LayerAttention(q, k, v, f["o"], qb, kb, vb, f.get("o_bias"))
    return LayerAttention(f["q"], f["k"], f["v"], f["o"], f.get("q_bias"), f.get("k_bias"), f.get("v_bias"),
                          f.get("o_bias"))


def layer_tensors(view: AttentionView, layer: int, w: LayerAttention) -> dict[str, torch.Tensor]:
    """Checkpoint name -> tensor for one layer's (converted) projections, fused again where the view says so."""
    names = tensor_names(view, layer)
    out = {names["o"]: w.o}
    if "o_bias" in names:
        out[names["o_bias"]] = w.o_bias
    if view.fused_qkv:
        out[names["qkv"]] = torch.cat([w.q, w.k, w.v])
        if "qkv_bias" in names:
            out[names["qkv_bias"]] = torch.cat([w.q_bias, w.k_bias, w.v_bias])
        return out
    for role in ("q", "k", "v"):
        out[names[role]] = getattr(w, role)
        if f"{role}_bias" in names:
            out[names[f"{role}_bias"]] = getattr(w, f"{role}_bias")
    return out
