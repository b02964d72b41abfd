"""Mean-pool GQA conversion (the GQA paper's): each group's K/V projection rows (and biases) are averaged.

Query head h then uses KV head h // (H/G), exactly as transformers' `repeat_kv` groups consecutive heads.
Works tensor by tensor, so it streams: nothing but the current tensor is converted in memory.
"""

from __future__ import annotations

import torch

from ..models import AttentionView
from .gqa_layout import split_fused


def pool_heads(t: torch.Tensor, kv_heads: int, head_dim: int, groups: int) -> torch.Tensor:
    """[KV*d, ...] -> [G*d, ...]: mean over the KV/G consecutive heads of each group (fp32 math, t's dtype).

    groups == kv_heads returns `t` itself, bit for bit.
    """
    if groups == kv_heads:
        return t
    r = kv_heads // groups
    x = t.float().reshape(groups, r, head_dim, *t.shape[1:]).mean(dim=1)
    return x.reshape(groups * head_dim, *t.shape[1:]).to(t.dtype)


def mean_pool_tensor(view: AttentionView, role: str, t: torch.Tensor, groups: int) -> torch.Tensor:
    """Convert one K/V-holding tensor (`role` from `gqa_layout.kv_roles`: k, v, k_bias, v_bias, qkv, qkv_bias)."""
    kv, d = view.num_kv_heads, view.head_dim
    if role in ("qkv", "qkv_bias"):
        q, k, v = split_fused(t, view.num_heads, kv, d)
        return torch.cat([q, pool_heads(k, kv, d, groups), pool_heads(v, kv, d, groups)])
    return pool_heads(t, kv, d, groups)
