"""Sink + window decode attention (StreamingLLM) and its eager reference.

q [B, H, D], k_cache/v_cache [B, Hkv, Lmax, D], seq_lens int32 [B] -> out [B, H, D]. Sequence b attends to
positions [0, min(sink, L)) and [max(L - window, min(sink, L)), L) with L = seq_lens[b].
"""

from __future__ import annotations

import torch

from ._common import check_device, default_scale
from .paged_decode import _grouped_attention


def sink_window_positions(seq_lens: torch.Tensor, sink: int, window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions read: long [B, sink + window] (clamped to 0 when invalid) and their validity mask."""
    lens = seq_lens.long()[:, None]
    j = torch.arange(sink + window, device=seq_lens.device)[None, :]
    sink_end = torch.clamp(lens, max=sink)
    win_start = torch.maximum(lens - window, sink_end)
    pos = torch.where(j < sink, j, win_start + (j - sink))
    valid = torch.where(j < sink, j < sink_end, pos < lens)
    return torch.where(valid, pos, torch.zeros_like(pos)), valid


def sink_window_decode_reference(q, k_cache, v_cache, seq_lens, sink: int, window: int, scale=None):
    scale = default_scale(q.shape[-1], scale)
    pos, valid = sink_window_positions(seq_lens.to(q.device), sink, window)
    b, hkv, _, d = k_cache.shape
    idx = pos[:, None, :, None].expand(b, hkv, pos.shape[1], d)
    k = torch.gather(k_cache, 2, idx)
    v = torch.gather(v_cache, 2, idx[..., :1].expand(b, hkv, pos.shape[1], v_cache.shape[-1]))
    return _grouped_attention(q, k, v, valid[:, None, :].expand(b, hkv, -1), scale).to(q.dtype)


def sink_window_decode(q, k_cache, v_cache, seq_lens, sink: int, window: int, scale=None):
    """Triton kernel (GQA-aware: one program per (sequence, KV head) for the whole query group)."""
    check_device(q, k_cache, v_cache, seq_lens, name="sink_window_decode")
    from ._triton_decode import sink_window_decode_triton

    return sink_window_decode_triton(q, k_cache, v_cache, seq_lens, sink, window, default_scale(q.shape[-1], scale))
