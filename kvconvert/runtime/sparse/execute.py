"""score -> select -> execute for one attention call, on tensors (no transformers here).

Shapes: q [B, H, S, D] (post-RoPE), k/v [B, Hkv, L, D] (the whole cache, the S new tokens last) -> [B, H, S, D].
Kernels run where tensors live: Triton on CUDA (when `use_kernels`), the eager references elsewhere.
"""

from __future__ import annotations

import torch

from ...kernels import (
    block_importance,
    block_sparse_prefill,
    block_sparse_prefill_reference,
    paged_decode,
    paged_decode_reference,
    score_pages,
    select_blocks,
    select_pages,
    sink_window_decode,
    sink_window_decode_reference,
    sink_window_prefill_reference,
)
from ...kernels.selection import block_diagonal
from .policies import BlockSparsePrefillPolicy, PageTopKPolicy, SinkWindowPolicy
from .state import PageSummaryCache, ReadStats


def decode_step(q, k, v, policy, scale: float, summaries: PageSummaryCache | None, use_kernels: bool,
                stats: ReadStats | None = None):
    """One new token per sequence: q [B, H, 1, D] -> [B, H, 1, D]."""
    b, _, _, _d = q.shape
    length = k.shape[2]
    q1 = q[:, :, 0]
    lens = torch.full((b,), length, dtype=torch.int32, device=q.device)
    if isinstance(policy, PageTopKPolicy) and length >= policy.dense_below:
        kmin, kmax = summaries.refresh(k, 1)
        keep = policy.pages_kept(length)
        sel = select_pages(score_pages(q1, kmin, kmax), lens, policy.page, keep, policy.sink_pages,
                           policy.recent_pages)
        fn = paged_decode if use_kernels else paged_decode_reference
        out = fn(q1, k, v, *sel.args(), scale=scale)
        if stats is not None:
            stats.add("decode", min(keep * policy.page, length), length)
    elif isinstance(policy, SinkWindowPolicy):
        fn = sink_window_decode if use_kernels else sink_window_decode_reference
        out = fn(q1, k, v, lens, policy.sink, policy.window, scale=scale)
        if stats is not None:
            stats.add("decode", min(policy.sink + policy.window, length), length)
    else:
        if summaries is not None:
            summaries.refresh(k, 1)
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True)[:, :, 0]
        if stats is not None:
            stats.add("decode", length, length)
    return out[:, :, None]


def prefill_step(q, k, v, policy, scale: float, summaries: PageSummaryCache | None, use_kernels: bool,
                 stats: ReadStats | None = None):
    """S > 1 new tokens: causal attention of q [B, H, S, D] over k/v [B, Hkv, L, D] -> [B, H, S, D]."""
    sq, sk = q.shape[2], k.shape[2]
    causal_pairs = sq * (sk - sq) + sq * (sq + 1) / 2
    if summaries is not None:
        summaries.refresh(k, sq)
    if isinstance(policy, BlockSparsePrefillPolicy) and sq >= policy.dense_below:
        probs = block_importance(q, k, policy.tile, scale)
        sel = select_blocks(probs, sq, sk, policy.tile, mass=None if policy.density else policy.mass,
                            density=policy.density, sink_blocks=policy.sink_blocks, local_blocks=policy.local_blocks)
        fn = block_sparse_prefill if use_kernels else block_sparse_prefill_reference
        out = fn(q, k, v, *sel.args(), scale=scale)
        if stats is not None:
            allowed = block_diagonal(sel.counts.shape[2], sq, sk, policy.tile).sum() + sel.counts.shape[2]
            stats.add("prefill", float(sel.counts.double().mean()) * sel.counts.shape[2], float(allowed))
        return out
    if isinstance(policy, SinkWindowPolicy):
        if stats is not None:
            seen = sum(min(t + 1, policy.sink + policy.window) for t in range(sk - sq, sk))
            stats.add("prefill", seen, causal_pairs)
        return sink_window_prefill_reference(q, k, v, policy.sink, policy.window, scale=scale)
    if stats is not None:
        stats.add("prefill", causal_pairs, causal_pairs)
    mask = None
    if sk != sq:
        mask = torch.arange(sk, device=q.device)[None, :] <= (sk - sq + torch.arange(sq, device=q.device))[:, None]
    return torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale, enable_gqa=True)
