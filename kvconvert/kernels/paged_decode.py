"""Decode attention over selected KV pages (GQA-aware), its eager reference, and the dense decode path.

Shapes: q [B, H, D] (one new token per sequence), k_cache/v_cache [B, Hkv, Lmax, D] (the fixed-capacity
cache buffer, positions >= seq_len ignored), seq_lens int32 [B], counts int32 [B, Hkv], indices int32
[B, Hkv, P] (`kvconvert.kernels.selection.PageSelection`) -> out [B, H, D] in q's dtype.
Query head h uses KV head h // (H / Hkv). Softmax and accumulation in fp32.
"""

from __future__ import annotations

import torch

from ._common import check_device, default_scale


def _grouped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor,
                       scale: float) -> torch.Tensor:
    """q [B, H, D], k/v [B, Hkv, T, D], valid bool [B, Hkv, T] -> fp32 [B, H, D]."""
    b, h, d = q.shape
    hkv = k.shape[1]
    qg = q.float().view(b, hkv, h // hkv, d)
    s = torch.einsum("bgrd,bgtd->bgrt", qg, k.float()) * scale
    s = s.masked_fill(~valid[:, :, None, :], float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    return torch.einsum("bgrt,bgtd->bgrd", p, v.float()).reshape(b, h, v.shape[-1])


_WORKSPACE: dict = {}


def workspace(name: str, numel: int, like: torch.Tensor) -> torch.Tensor:
    """A reused flat buffer (fresh multi-MB allocations cost more than the copies on CPU)."""
    key = (name, like.dtype, like.device)
    buf = _WORKSPACE.get(key)
    if buf is None or buf.numel() < numel:
        buf = _WORKSPACE[key] = torch.empty(numel, dtype=like.dtype, device=like.device)
    return buf[:numel]


def gather_pages(cache: torch.Tensor, indices: torch.Tensor, page_size: int, name: str | None = None) -> torch.Tensor:
    """cache [B, Hkv, L, D], indices [B, Hkv, P] (-1 allowed) -> [B, Hkv, P*page, D].

    Page -1 and positions >= L read some valid position (callers mask them). A contiguous cache whose
    capacity L is a multiple of the page copies whole pages (one index_select of page*D-element rows);
    otherwise rows are copied token by token.
    """
    b, hkv, length, d = cache.shape
    pages = indices.long().clamp(min=0)
    if cache.is_contiguous() and length % page_size == 0:
        n = length // page_size
        pages = pages.clamp(max=n - 1)
        base = (torch.arange(b * hkv, device=cache.device) * n).view(b, hkv, 1)
        flat = (pages + base).flatten()
        src = cache.view(b * hkv * n, page_size * d)
        if name is None:
            rows = src.index_select(0, flat)
        else:
            rows = workspace(name, flat.numel() * page_size * d, cache).view(flat.numel(), page_size * d)
            torch.index_select(src, 0, flat, out=rows)
        return rows.view(b, hkv, pages.shape[2] * page_size, d)
    tok = pages[..., None] * page_size + torch.arange(page_size, device=cache.device)
    tok = tok.flatten(2).clamp(max=length - 1)
    base = (torch.arange(b * hkv, device=cache.device) * length).view(b, hkv, 1)
    flat = (tok + base).flatten()
    src = cache.reshape(b * hkv * length, d)
    if name is None:
        rows = src.index_select(0, flat)
    else:
        rows = workspace(name, flat.numel() * d, cache).view(flat.numel(), d)
        torch.index_select(src, 0, flat, out=rows)
    return rows.view(b, hkv, tok.shape[2], d)


def paged_decode_reference(q, k_cache, v_cache, seq_lens, counts, indices, page_size: int, scale=None):
    """Eager reference of `paged_decode`: reads only the selected pages (gather), fp32 softmax."""
    scale = default_scale(q.shape[-1], scale)
    width = int(counts.max()) if counts.numel() else 0
    idx = indices[..., :max(width, 1)]
    k = gather_pages(k_cache, idx, page_size, "paged_decode.k")
    v = gather_pages(v_cache, idx, page_size, "paged_decode.v")
    rank = torch.arange(idx.shape[-1], device=q.device)
    page_ok = rank[None, None, :] < counts[..., None].long()
    tok = idx.long()[..., None] * page_size + torch.arange(page_size, device=q.device)
    valid = (page_ok[..., None] & (tok < seq_lens.long()[:, None, None, None])).flatten(2)
    return _grouped_attention(q, k, v, valid, scale).to(q.dtype)


def dense_decode_reference(q, k_cache, v_cache, seq_lens, scale=None):
    """Our dense decode path: every cached position < seq_len, no gather (q [B,H,D] -> [B,H,D])."""
    scale = default_scale(q.shape[-1], scale)
    length = int(seq_lens.max())
    valid = torch.arange(length, device=q.device)[None, :] < seq_lens.long()[:, None]
    valid = valid[:, None, :].expand(q.shape[0], k_cache.shape[1], length)
    return _grouped_attention(q, k_cache[:, :, :length], v_cache[:, :, :length], valid, scale).to(q.dtype)


def paged_decode(q, k_cache, v_cache, seq_lens, counts, indices, page_size: int, scale=None, num_splits=None):
    """Triton kernel: one program per (sequence, KV head, split) reads its selected pages once for the
    whole query group; splits of the page list are merged by a second kernel (split-KV)."""
    check_device(q, k_cache, v_cache, counts, indices, name="paged_decode")
    from ._triton_decode import paged_decode_triton

    return paged_decode_triton(q, k_cache, v_cache, seq_lens, counts, indices, page_size,
                               default_scale(q.shape[-1], scale), num_splits)


def dense_decode(q, k_cache, v_cache, seq_lens, scale=None, page_size: int = 64, num_splits=None):
    """Dense decode through the paged kernel with every page selected (our dense GPU path)."""
    from .selection import all_pages

    sel = all_pages(seq_lens, page_size, k_cache.shape[1])
    return paged_decode(q, k_cache, v_cache, sel.seq_lens, sel.counts, sel.indices, page_size, scale, num_splits)
