"""Triton decode kernels: paged (selected pages, split-KV) and sink+window. Imported only when run."""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._triton_common import block, dot_f32, group_queries, num_warps, split_pages, store_partials, tile_update


@triton.jit
def _paged_decode_kernel(
    Q, K, V, SEQ, CNT, IDX, OUT, MP, LP, AP,
    sqb, sqh, skb, skh, skt, svb, svh, svt, scb, sch, sib, sih, sob, soh,
    HKV, pages_per_split, num_splits, scale,
    G: tl.constexpr, D: tl.constexpr, PAGE: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    SPLIT: tl.constexpr, DOT_F32: tl.constexpr,
):
    """Each iteration reads BLOCK_N // BLOCK_P selected pages as one tile of BLOCK_N slots."""
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = bh // HKV
    g = bh % HKV
    rows = tl.arange(0, BLOCK_G)
    dims = tl.arange(0, BLOCK_D)
    slots = tl.arange(0, BLOCK_N)
    which = slots // BLOCK_P
    within = slots % BLOCK_P
    row_ok = rows < G
    dim_ok = dims < D
    q = group_queries(Q, b, g, sqb, sqh, rows, dims, row_ok, dim_ok, G)
    seq_len = tl.load(SEQ + b)
    start, stop = split_pages(CNT, b, g, scb, sch, split, pages_per_split)
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    kbase = K + b * skb + g * skh
    vbase = V + b * svb + g * svh
    for r in range(start, stop, BLOCK_N // BLOCK_P):
        rank_ok = r + which < stop
        page = tl.load(IDX + b * sib + g * sih + r + which, mask=rank_ok, other=0)
        pos = page * PAGE + within
        ok = rank_ok & (within < PAGE) & (pos < seq_len)
        k = tl.load(kbase + pos[:, None] * skt + dims[None, :], mask=ok[:, None] & dim_ok[None, :], other=0.0)
        v = tl.load(vbase + pos[:, None] * svt + dims[None, :], mask=ok[:, None] & dim_ok[None, :], other=0.0)
        m_i, l_i, acc = tile_update(q, k, v, ok[None, :], m_i, l_i, acc, scale, DOT_F32)
    if SPLIT:
        store_partials(MP, LP, AP, bh * num_splits + split, rows, dims, m_i, l_i, acc, BLOCK_G, BLOCK_D)
    else:
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(OUT + b * sob + (g * G + rows[:, None]) * soh + dims[None, :], out.to(OUT.dtype.element_ty),
                 mask=row_ok[:, None] & dim_ok[None, :])


@triton.jit
def _combine_kernel(
    MP, LP, AP, OUT, sob, soh, HKV, num_splits,
    G: tl.constexpr, D: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr,
):
    bh = tl.program_id(0)
    b = bh // HKV
    g = bh % HKV
    rows = tl.arange(0, BLOCK_G)
    dims = tl.arange(0, BLOCK_D)
    m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    for s in range(num_splits):
        m = tl.maximum(m, tl.load(MP + (bh * num_splits + s) * BLOCK_G + rows))
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    l_tot = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for s in range(num_splits):
        part = bh * num_splits + s
        w = tl.exp(tl.load(MP + part * BLOCK_G + rows) - m_safe)
        l_tot += w * tl.load(LP + part * BLOCK_G + rows)
        acc += w[:, None] * tl.load(AP + (part * BLOCK_G + rows[:, None]) * BLOCK_D + dims[None, :])
    out = acc / tl.where(l_tot > 0, l_tot, 1.0)[:, None]
    tl.store(OUT + b * sob + (g * G + rows[:, None]) * soh + dims[None, :], out.to(OUT.dtype.element_ty),
             mask=(rows < G)[:, None] & (dims < D)[None, :])


def _default_splits(programs: int, max_pages: int, device: torch.device) -> int:
    if device.type == "cuda":
        target = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        target = 4
    return max(1, min(math.ceil(target / max(programs, 1)), math.ceil(max_pages / 4), 64))


def _check_decode(q, k_cache, v_cache):
    b, h, d = q.shape
    if k_cache.shape[0] != b or k_cache.shape[-1] != d or v_cache.shape[:3] != k_cache.shape[:3]:
        raise ValueError(f"decode: q {tuple(q.shape)} does not match caches {tuple(k_cache.shape)}, "
                         f"{tuple(v_cache.shape)}")
    if h % k_cache.shape[1]:
        raise ValueError(f"decode: {h} query heads are not a multiple of {k_cache.shape[1]} KV heads")
    for t in (q, k_cache, v_cache):
        if t.stride(-1) != 1:
            raise ValueError("decode: the last (head_dim) dimension must be contiguous")


def paged_decode_triton(q, k_cache, v_cache, seq_lens, counts, indices, page_size: int, scale: float,
                        num_splits: int | None = None, block_n: int = 64):
    _check_decode(q, k_cache, v_cache)
    b, h, d = q.shape
    hkv, dv = k_cache.shape[1], v_cache.shape[-1]
    if dv != d:
        raise ValueError("paged_decode: value head_dim must equal key head_dim")
    g = h // hkv
    seq_lens = seq_lens.to(torch.int32).contiguous()
    counts = counts.to(torch.int32)
    indices = indices.to(torch.int32)
    max_pages = int(counts.max()) if counts.numel() else 0
    splits = num_splits or _default_splits(b * hkv, max_pages, q.device)
    splits = max(1, min(splits, max(max_pages, 1)))
    bp = block(page_size)
    bn = max(bp, block_n)
    per_tile = bn // bp
    pps = per_tile * max(1, math.ceil(max_pages / splits / per_tile))
    splits = max(1, math.ceil(max_pages / pps)) if max_pages else 1
    out = torch.empty_like(q)
    bg, bd = block(g), block(d)
    if splits > 1:
        mp = torch.empty(b * hkv * splits * bg, device=q.device, dtype=torch.float32)
        lp = torch.empty_like(mp)
        ap = torch.empty(b * hkv * splits * bg * bd, device=q.device, dtype=torch.float32)
    else:
        mp = lp = ap = out
    _paged_decode_kernel[(b * hkv, splits)](
        q, k_cache, v_cache, seq_lens, counts, indices, out, mp, lp, ap,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), counts.stride(0), counts.stride(1),
        indices.stride(0), indices.stride(1), out.stride(0), out.stride(1),
        hkv, pps, splits, scale,
        G=g, D=d, PAGE=page_size, BLOCK_G=bg, BLOCK_P=bp, BLOCK_N=bn, BLOCK_D=bd,
        SPLIT=splits > 1, DOT_F32=dot_f32(q.dtype), num_warps=num_warps(),
    )
    if splits > 1:
        _combine_kernel[(b * hkv,)](mp, lp, ap, out, out.stride(0), out.stride(1), hkv, splits,
                                    G=g, D=d, BLOCK_G=bg, BLOCK_D=bd, num_warps=num_warps())
    return out


@triton.jit
def _sink_window_kernel(
    Q, K, V, SEQ, OUT, sqb, sqh, skb, skh, skt, svb, svh, svt, sob, soh, HKV, sink, window, scale,
    G: tl.constexpr, D: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_F32: tl.constexpr,
):
    bh = tl.program_id(0)
    b = bh // HKV
    g = bh % HKV
    rows = tl.arange(0, BLOCK_G)
    dims = tl.arange(0, BLOCK_D)
    toks = tl.arange(0, BLOCK_N)
    row_ok = rows < G
    dim_ok = dims < D
    q = group_queries(Q, b, g, sqb, sqh, rows, dims, row_ok, dim_ok, G)
    seq_len = tl.load(SEQ + b)
    sink_end = tl.minimum(seq_len, sink)
    win_start = tl.maximum(seq_len - window, sink_end)
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    kbase = K + b * skb + g * skh
    vbase = V + b * svb + g * svh
    for t0 in range(0, sink_end, BLOCK_N):
        pos = t0 + toks
        ok = pos < sink_end
        k = tl.load(kbase + pos[:, None] * skt + dims[None, :], mask=ok[:, None] & dim_ok[None, :], other=0.0)
        v = tl.load(vbase + pos[:, None] * svt + dims[None, :], mask=ok[:, None] & dim_ok[None, :], other=0.0)
        m_i, l_i, acc = tile_update(q, k, v, ok[None, :], m_i, l_i, acc, scale, DOT_F32)
    for t0 in range(win_start, seq_len, BLOCK_N):
        pos = t0 + toks
        ok = pos < seq_len
        k = tl.load(kbase + pos[:, None] * skt + dims[None, :], mask=ok[:, None] & dim_ok[None, :], other=0.0)
        v = tl.load(vbase + pos[:, None] * svt + dims[None, :], mask=ok[:, None] & dim_ok[None, :], other=0.0)
        m_i, l_i, acc = tile_update(q, k, v, ok[None, :], m_i, l_i, acc, scale, DOT_F32)
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(OUT + b * sob + (g * G + rows[:, None]) * soh + dims[None, :], out.to(OUT.dtype.element_ty),
             mask=row_ok[:, None] & dim_ok[None, :])


def sink_window_decode_triton(q, k_cache, v_cache, seq_lens, sink: int, window: int, scale: float,
                              block_n: int = 64):
    _check_decode(q, k_cache, v_cache)
    b, h, d = q.shape
    hkv = k_cache.shape[1]
    g = h // hkv
    out = torch.empty_like(q)
    _sink_window_kernel[(b * hkv,)](
        q, k_cache, v_cache, seq_lens.to(torch.int32).contiguous(), out,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), out.stride(0), out.stride(1),
        hkv, int(sink), int(window), scale,
        G=g, D=d, BLOCK_G=block(g), BLOCK_N=block_n, BLOCK_D=block(d), DOT_F32=dot_f32(q.dtype),
        num_warps=num_warps(),
    )
    return out
