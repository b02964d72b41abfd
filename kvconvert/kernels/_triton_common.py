"""Triton pieces shared by the kernels: the online-softmax tile update and launch helpers."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import interpreting, next_pow2


@triton.jit
def tile_update(q, k, v, valid, m_i, l_i, acc, scale, DOT_F32: tl.constexpr):
    """One flash-attention step: q [M, D], k/v [N, D], valid [M, N] -> new (m [M], l [M], acc [M, D] fp32)."""
    if DOT_F32:
        s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k))
    s = tl.where(valid, s * scale, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m_i - m_safe)
    p = tl.exp(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if DOT_F32:
        acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return m_new, l_i, acc


@triton.jit
def group_queries(Q, b, g, sqb, sqh, rows, dims, row_ok, dim_ok, G: tl.constexpr):
    """Queries [BLOCK_G, BLOCK_D] of the G query heads sharing KV head g of sequence b (zeros past G and D)."""
    return tl.load(Q + b * sqb + (g * G + rows[:, None]) * sqh + dims[None, :],
                   mask=row_ok[:, None] & dim_ok[None, :], other=0.0)


@triton.jit
def split_pages(CNT, b, g, scb, sch, split, pages_per_split):
    """[start, stop) of the selected-page ranks that split-KV program `split` reads for (b, g)."""
    count = tl.load(CNT + b * scb + g * sch)
    start = split * pages_per_split
    return start, tl.minimum(start + pages_per_split, count)


@triton.jit
def visible(pos, t, sliding, sink, window):
    """Which slots `pos` a query at position t attends to: causal (pos <= t), within the model's sliding window
    when `sliding` > 0, and under a sink + recent-window policy when `window` > 0 (pos < sink or t - pos < window)."""
    ok = pos <= t
    if sliding > 0:
        ok = ok & (pos > t - sliding)
    if window > 0:
        ok = ok & ((pos < sink) | (t - pos < window))
    return ok


@triton.jit
def store_partials(MP, LP, AP, part, rows, cols, m_i, l_i, acc, BLOCK_G: tl.constexpr, BLOCK_W: tl.constexpr):
    """Split-KV partial `part`: running max m_i [BLOCK_G], denominator l_i [BLOCK_G] and unnormalised acc
    [BLOCK_G, BLOCK_W], in the layout `_combine_kernel` reads (MP/LP [parts, BLOCK_G], AP [parts, BLOCK_G, BLOCK_W])."""
    tl.store(MP + part * BLOCK_G + rows, m_i)
    tl.store(LP + part * BLOCK_G + rows, l_i)
    tl.store(AP + (part * BLOCK_G + rows[:, None]) * BLOCK_W + cols[None, :], acc)


def dot_f32(dtype: torch.dtype) -> bool:
    """fp32 inputs (and every input under the interpreter) use exact fp32 dots; fp16/bf16 use native dots."""
    return interpreting() or dtype == torch.float32


def block(n: int, minimum: int = 16) -> int:
    return max(minimum, next_pow2(n))


def num_warps(default: int = 4) -> int:
    return 1 if interpreting() else default
