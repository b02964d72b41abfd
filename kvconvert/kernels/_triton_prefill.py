"""Triton block-sparse causal prefill kernel. Imported only when run."""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._triton_common import block, dot_f32, num_warps, tile_update


@triton.jit
def _block_sparse_prefill_kernel(
    Q, K, V, CNT, IDX, OUT,
    sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sob, soh, sot, scb, sch, scq, sib, sih, siq,
    H, SQ, SK, scale,
    G: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, DOT_F32: tl.constexpr,
):
    qb = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    g = h // G
    rows = qb * BLOCK + tl.arange(0, BLOCK)
    cols = tl.arange(0, BLOCK)
    dims = tl.arange(0, BLOCK_D)
    row_ok = rows < SQ
    dim_ok = dims < D
    q = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sqt + dims[None, :],
                mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
    qpos = SK - SQ + rows
    count = tl.load(CNT + b * scb + g * sch + qb * scq)
    m_i = tl.full([BLOCK], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK], tl.float32)
    acc = tl.zeros([BLOCK, BLOCK_D], tl.float32)
    kbase = K + b * skb + g * skh
    vbase = V + b * svb + g * svh
    for r in range(count):
        j = tl.load(IDX + b * sib + g * sih + qb * siq + r)
        kpos = j * BLOCK + cols
        kok = kpos < SK
        k = tl.load(kbase + kpos[:, None] * skt + dims[None, :], mask=kok[:, None] & dim_ok[None, :], other=0.0)
        v = tl.load(vbase + kpos[:, None] * svt + dims[None, :], mask=kok[:, None] & dim_ok[None, :], other=0.0)
        valid = kok[None, :] & (kpos[None, :] <= qpos[:, None])
        m_i, l_i, acc = tile_update(q, k, v, valid, m_i, l_i, acc, scale, DOT_F32)
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(OUT + b * sob + h * soh + rows[:, None] * sot + dims[None, :], out.to(OUT.dtype.element_ty),
             mask=row_ok[:, None] & dim_ok[None, :])


def block_sparse_prefill_triton(q, k, v, counts, indices, block_size: int, scale: float):
    b, h, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    if h % hkv or sk < sq or v.shape[:3] != k.shape[:3] or v.shape[-1] != d or k.shape[-1] != d:
        raise ValueError(f"block_sparse_prefill: shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} "
                         "need H % Hkv == 0, Sk >= Sq and equal head dims")
    if block_size & (block_size - 1) or block_size < 16:
        raise ValueError(f"block_sparse_prefill: block_size={block_size} must be a power of two >= 16")
    nq = math.ceil(sq / block_size)
    if counts.shape != (b, hkv, nq):
        raise ValueError(f"block_sparse_prefill: counts {tuple(counts.shape)} should be {(b, hkv, nq)}")
    for t in (q, k, v):
        if t.stride(-1) != 1:
            raise ValueError("block_sparse_prefill: the last (head_dim) dimension must be contiguous")
    counts = counts.to(torch.int32)
    indices = indices.to(torch.int32)
    out = torch.empty_like(q)
    _block_sparse_prefill_kernel[(nq, b * h)](
        q, k, v, counts, indices, out,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        counts.stride(0), counts.stride(1), counts.stride(2), indices.stride(0), indices.stride(1), indices.stride(2),
        h, sq, sk, scale,
        G=h // hkv, D=d, BLOCK=block_size, BLOCK_D=block(d), DOT_F32=dot_f32(q.dtype), num_warps=num_warps(),
    )
    return out
