"""score -> select -> execute for one attention call, on tensors (no transformers here).

Shapes: q [B, H, S, D] (post-RoPE), k/v [B, Hkv, L, D] (the whole cache, the S new tokens last) -> [B, H, S, D].
What runs is the layer's policy's `decode` / `prefill` (`runtime/sparse/policies/`); kernels run where
tensors live: Triton on CUDA (when `use_kernels`), the eager references elsewhere.
"""

from __future__ import annotations

import torch

from .policies import Policy
from .state import PageSummaryCache, ReadStats


def decode_step(q, k, v, policy: Policy, scale: float, summaries: PageSummaryCache | None, use_kernels: bool,
                stats: ReadStats | None = None):
    """One new token per sequence: q [B, H, 1, D] -> [B, H, 1, D]."""
    length = k.shape[2]
    lens = torch.full((q.shape[0],), length, dtype=torch.int32, device=q.device)
    pages = summaries.refresh(k, 1) if summaries is not None else None
    out = policy.decode(q[:, :, 0], k, v, lens, scale, pages, use_kernels)
    if stats is not None:
        stats.add("decode", policy.decode_read(length), length)
    return out[:, :, None]


def prefill_step(q, k, v, policy: Policy, scale: float, summaries: PageSummaryCache | None, use_kernels: bool,
                 stats: ReadStats | None = None):
    """S > 1 new tokens: causal attention of q [B, H, S, D] over k/v [B, Hkv, L, D] -> [B, H, S, D]."""
    if summaries is not None:
        summaries.refresh(k, q.shape[2])
    out, read, total = policy.prefill(q, k, v, scale, use_kernels)
    if stats is not None:
        stats.add("prefill", read, total)
    return out
