"""Triton latent-KV decode kernel (keys rebuilt in registers, values accumulated as latents). Imported only when run."""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._triton_common import block, dot_f32, group_queries, num_warps, split_pages, store_partials, tile_update
from ._triton_decode import _combine_kernel, _default_splits


@triton.jit
def _latent_decode_kernel(
    Q, CK, CV, SEQ, CNT, IDX, KUP, KUPR, KB, KBR, KW, KWR, COS, SIN, OUT, MASS, MP, LP, AP,
    sqb, sqh, sckb, sckt, scvb, scvt, scb, sch, sib, sih, sob, soh, skup,
    HKV, pages_per_split, num_splits, scale, eps, sink, window,
    G: tl.constexpr, D: tl.constexpr, RK: tl.constexpr, RV: tl.constexpr, PAGE: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_RV: tl.constexpr, SUB: tl.constexpr, STEP: tl.constexpr,
    SPLIT: tl.constexpr, NORM: tl.constexpr, DOT_F32: tl.constexpr,
):
    """Tiles of BLOCK_N slots: STEP = BLOCK_N // BLOCK_P whole pages each, or (a page longer than the tile) SUB =
    BLOCK_P // BLOCK_N tiles per page. Per tile: x = c_k @ k_up_g + b and xr = c_k @ k_up_r_g + b_r (= rotate_half(x)),
    accumulated over chunks of BLOCK_R latent dims; optional k_norm; k = x * cos + xr * sin; scores for the G
    query rows; acc += p @ c_v in latent space. A joint latent passes the same buffer as CK and CV: the second
    read of a tile's rows hits the cache (each row leaves HBM once per program)."""
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = bh // HKV
    g = bh % HKV
    rows = tl.arange(0, BLOCK_G)
    dims = tl.arange(0, BLOCK_D)
    slots = tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_R)
    rv = tl.arange(0, BLOCK_RV)
    which = slots // BLOCK_P
    slot_in_page = slots % BLOCK_P
    row_ok = rows < G
    dim_ok = dims < D
    rv_ok = rv < RV
    q = group_queries(Q, b, g, sqb, sqh, rows, dims, row_ok, dim_ok, G)
    kb = tl.load(KB + g * D + dims, mask=dim_ok, other=0.0)
    kb_r = tl.load(KBR + g * D + dims, mask=dim_ok, other=0.0)
    kw = tl.load(KW + dims, mask=dim_ok, other=0.0)
    kw_r = tl.load(KWR + dims, mask=dim_ok, other=0.0)
    seq_len = tl.load(SEQ + b)
    start, stop = split_pages(CNT, b, g, scb, sch, split, pages_per_split)
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_RV], tl.float32)
    for t in range(start * SUB, stop * SUB, STEP):
        rank = t // SUB + which
        rank_ok = rank < stop
        page = tl.load(IDX + b * sib + g * sih + rank, mask=rank_ok, other=0)
        within = (t % SUB) * BLOCK_N + slot_in_page
        pos = page * PAGE + within
        ok = rank_ok & (within < PAGE) & (pos < seq_len)
        if window > 0:
            ok = ok & ((pos < sink) | (pos >= seq_len - window))
        x = tl.zeros([BLOCK_N, BLOCK_D], tl.float32) + kb[None, :]
        xr = tl.zeros([BLOCK_N, BLOCK_D], tl.float32) + kb_r[None, :]
        for r0 in tl.static_range(0, RK, BLOCK_R):
            rr = r0 + rk
            r_ok = rr < RK
            c = tl.load(CK + b * sckb + pos[:, None] * sckt + rr[None, :], mask=ok[:, None] & r_ok[None, :], other=0.0)
            w_off = rr[:, None] * skup + g * D + dims[None, :]
            w_mask = r_ok[:, None] & dim_ok[None, :]
            up = tl.load(KUP + w_off, mask=w_mask, other=0.0)
            up_r = tl.load(KUPR + w_off, mask=w_mask, other=0.0)
            if DOT_F32:
                x += tl.dot(c.to(tl.float32), up, input_precision="ieee")
                xr += tl.dot(c.to(tl.float32), up_r, input_precision="ieee")
            else:
                x += tl.dot(c, up.to(c.dtype))
                xr += tl.dot(c, up_r.to(c.dtype))
        if NORM:
            inv = 1.0 / tl.sqrt(tl.sum(x * x, 1) / D + eps)
            x = x * inv[:, None] * kw[None, :]
            xr = xr * inv[:, None] * kw_r[None, :]
        tab = pos[:, None] * D + dims[None, :]
        cos = tl.load(COS + tab, mask=ok[:, None] & dim_ok[None, :], other=0.0)
        sin = tl.load(SIN + tab, mask=ok[:, None] & dim_ok[None, :], other=0.0)
        k = x * cos + xr * sin
        v = tl.load(CV + b * scvb + pos[:, None] * scvt + rv[None, :], mask=ok[:, None] & rv_ok[None, :], other=0.0)
        m_i, l_i, acc = tile_update(q, k.to(q.dtype), v, ok[None, :], m_i, l_i, acc, scale, DOT_F32)
    if SPLIT:
        store_partials(MP, LP, AP, bh * num_splits + split, rows, rv, m_i, l_i, acc, BLOCK_G, BLOCK_RV)
    else:
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(OUT + b * sob + (g * G + rows[:, None]) * soh + rv[None, :], out, mask=row_ok[:, None] & rv_ok[None, :])
        tl.store(MASS + b * HKV * G + g * G + rows, tl.where(l_i > 0, 1.0, 0.0), mask=row_ok)


def _block_n(rank_v: int) -> int:
    """Slots per tile: 32 keeps fp16 SmolLM2-sized groups (D 64, ranks 96) at ~70 KB of shared memory, inside the
    ~99 KB of SM86/89 (64 slots take ~115 KB); wide value latents take 16."""
    return 32 if rank_v <= 128 else 16


def _check(q, c_k, c_v, w):
    b, h, d = q.shape
    kv = w.num_kv_heads
    if h % kv or w.head_dim != d:
        raise ValueError(f"latent_decode: q {tuple(q.shape)} does not fit {kv} KV heads of k_up {tuple(w.k_up.shape)}")
    if c_k.dim() != 4 or c_k.shape[1] != 1 or c_k.shape[0] != b or c_k.shape[-1] != w.k_up.shape[0]:
        raise ValueError(f"latent_decode: c_k {tuple(c_k.shape)} should be [B, 1, Lmax, {w.k_up.shape[0]}]")
    if c_v.shape[:3] != c_k.shape[:3] or c_v.shape[-1] != w.v_up.shape[0]:
        raise ValueError(f"latent_decode: c_v {tuple(c_v.shape)} does not match v_up {tuple(w.v_up.shape)}")
    for t in (q, c_k, c_v):
        if t.stride(-1) != 1:
            raise ValueError("latent_decode: the last dimension must be contiguous")


def latent_decode_triton(q, c_k, c_v, seq_lens, w, counts, indices, page_size: int, sink: int, window: int,
                         scale: float, num_splits: int | None = None, block_n: int | None = None):
    """-> (fp32 [B, H, Rv] attention output in latent space, fp32 [B, H] softmax mass: 1, or 0 for no slot)."""
    _check(q, c_k, c_v, w)
    b, h, d = q.shape
    hkv = w.num_kv_heads
    g = h // hkv
    rk, rv = c_k.shape[-1], c_v.shape[-1]
    seq_lens = seq_lens.to(torch.int32).contiguous()
    counts = counts.to(torch.int32)
    indices = indices.to(torch.int32)
    half = w.rotated_half()
    cos, sin = w.rotation_tables()
    up = w.k_up.float().contiguous()
    max_pages = int(counts.max()) if counts.numel() else 0
    splits = num_splits or _default_splits(b * hkv, max_pages, q.device)
    splits = max(1, min(splits, max(max_pages, 1)))
    bp = block(page_size)
    bn = block_n or _block_n(rv)
    per_tile = max(1, bn // bp)
    pps = per_tile * max(1, math.ceil(max_pages / splits / per_tile))
    splits = max(1, math.ceil(max_pages / pps)) if max_pages else 1
    bg, brv = block(g), block(rv)
    out = torch.zeros(b, h, rv, device=q.device, dtype=torch.float32)
    mass = torch.zeros(b, h, device=q.device, dtype=torch.float32)
    if splits > 1:
        mp = torch.empty(b * hkv * splits * bg, device=q.device, dtype=torch.float32)
        lp = torch.empty_like(mp)
        ap = torch.empty(b * hkv * splits * bg * brv, device=q.device, dtype=torch.float32)
    else:
        mp = lp = ap = out
    _latent_decode_kernel[(b * hkv, splits)](
        q, c_k, c_v, seq_lens, counts, indices, up, half["k_up_r"], half["k_bias"], half["k_bias_r"], half["w"],
        half["w_r"], cos, sin, out, mass, mp, lp, ap,
        q.stride(0), q.stride(1), c_k.stride(0), c_k.stride(2), c_v.stride(0), c_v.stride(2),
        counts.stride(0), counts.stride(1), indices.stride(0), indices.stride(1), out.stride(0), out.stride(1),
        up.stride(0), hkv, pps, splits, scale, float(w.k_norm_eps), int(sink), int(window),
        G=g, D=d, RK=rk, RV=rv, PAGE=page_size, BLOCK_G=bg, BLOCK_P=bp, BLOCK_N=bn, BLOCK_D=block(d),
        BLOCK_R=min(64, block(rk)), BLOCK_RV=brv, SUB=max(1, bp // bn), STEP=per_tile, SPLIT=splits > 1, NORM=w.k_norm, DOT_F32=dot_f32(q.dtype),
        num_warps=num_warps(),
    )
    if splits > 1:
        _combine_kernel[(b * hkv,)](mp, lp, ap, out, out.stride(0), out.stride(1), hkv, splits,
                                    G=g, D=rv, BLOCK_G=bg, BLOCK_D=brv, num_warps=num_warps())
        seen = (lp.view(b * hkv, splits, bg) > 0).any(1)[:, :g]
        mass = seen.reshape(b, h).float()
    return out, mass


def compile_latent_decode(dtype: str, group: int, head_dim: int, rank_k: int, rank_v: int, page: int = 64,
                          cc: int = 80, norm: bool = True, split: bool = True, num_warps: int = 4) -> tuple[str, str, dict]:
    """(kernel name, PTX, {num_warps, shared}) of `_latent_decode_kernel` for `dtype` ("fp16"/"bf16"/"fp32") cache
    and query on sm_`cc`, compiled (through ptxas) with no GPU: checks that a shape fits the target."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    ptr = f"*{dtype}"
    signature = {n: ptr for n in ("Q", "CK", "CV")} | {n: "*i32" for n in ("SEQ", "CNT", "IDX")}
    signature |= {n: "*fp32" for n in ("KUP", "KUPR", "KB", "KBR", "KW", "KWR", "COS", "SIN", "OUT", "MASS", "MP", "LP",
                                        "AP")}
    signature |= {n: "i32" for n in ("sqb", "sqh", "sckb", "sckt", "scvb", "scvt", "scb", "sch", "sib", "sih", "sob",
                                     "soh", "skup", "HKV", "pages_per_split", "num_splits")}
    signature |= {"scale": "fp32", "eps": "fp32", "sink": "i32", "window": "i32"}
    bp, bn = block(page), _block_n(rank_v)
    constexprs = {"G": group, "D": head_dim, "RK": rank_k, "RV": rank_v, "PAGE": page, "BLOCK_G": block(group),
                  "BLOCK_P": bp, "BLOCK_N": bn, "BLOCK_D": block(head_dim), "BLOCK_R": min(64, block(rank_k)),
                  "BLOCK_RV": block(rank_v), "SUB": max(1, bp // bn), "STEP": max(1, bn // bp), "SPLIT": split, "NORM": norm,
                  "DOT_F32": dtype == "fp32"}
    signature |= {n: "constexpr" for n in constexprs}
    fn = _latent_decode_kernel
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    compiled = triton.compile(src, target=GPUTarget("cuda", cc, 32), options={"num_warps": num_warps})
    return compiled.metadata.name, compiled.asm["ptx"], {"num_warps": compiled.metadata.num_warps,
                                                         "shared": compiled.metadata.shared}
