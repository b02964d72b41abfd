"""Selections: which KV pages / blocks a kernel reads. Shared by the reference, the Triton kernels and plugins.

Pure torch (a leaf). Every step is deterministic and written so that ONNX ops reproduce it exactly:
scores in fp32, ranking by a *stable* descending sort (equal scores: lower page/block index first,
the same rule as ONNX TopK), the kept set returned in ascending index order, padded with -1.
See docs/architecture.md, "Sparse attention and kernels".
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

PAD = -1


@dataclass
class PageSelection:
    """Pages read at one decode step, per (sequence, KV head); all query heads of a group share them.

    page_size: tokens per page; page p covers cache positions [p*page_size, (p+1)*page_size).
    seq_lens: int32 [B]          valid tokens in each sequence's cache (the current token included).
    counts:   int32 [B, Hkv]     pages selected.
    indices:  int32 [B, Hkv, P]  selected page indices, ascending; entries at rank >= counts are -1.
    """

    page_size: int
    seq_lens: torch.Tensor
    counts: torch.Tensor
    indices: torch.Tensor

    def args(self) -> tuple:
        """(seq_lens, counts, indices, page_size): the selection arguments of the decode kernels."""
        return self.seq_lens, self.counts, self.indices, self.page_size

    def kept_fraction(self) -> float:
        pages = torch.clamp((self.seq_lens.long() + self.page_size - 1) // self.page_size, min=1)
        return float((self.counts.float() / pages[:, None].float()).mean())


@dataclass
class BlockSelection:
    """Key blocks read by each query block of a causal prefill, per (sequence, KV head).

    block_size: tokens per query block and per key block. Query block i covers query rows
    [i*block, (i+1)*block); key block j covers key positions [j*block, (j+1)*block). Query row r sits at
    key position q_offset + r with q_offset = Sk - Sq (the new tokens end the sequence).
    counts:  int32 [B, Hkv, NQ]      key blocks selected per query block.
    indices: int32 [B, Hkv, NQ, NK]  ascending; -1 at rank >= counts.
    """

    block_size: int
    counts: torch.Tensor
    indices: torch.Tensor

    def args(self) -> tuple:
        return self.counts, self.indices, self.block_size


def num_pages(seq_lens: torch.Tensor, page_size: int) -> torch.Tensor:
    return (seq_lens.long() + page_size - 1) // page_size


def page_summaries(keys: torch.Tensor, seq_lens: torch.Tensor, page_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Element-wise min and max of each page's keys.

    keys [B, Hkv, L, D], seq_lens [B] -> kmin, kmax [B, Hkv, ceil(L/page), D] (keys' dtype). Positions >=
    seq_len are ignored; a page with no valid position gets zeros (it is never scored: see select_pages).
    """
    b, hkv, length, d = keys.shape
    pages = math.ceil(length / page_size)
    pad = pages * page_size - length
    valid = torch.arange(pages * page_size, device=keys.device)[None, :] < seq_lens.to(keys.device)[:, None].long()
    valid = valid[:, None, :, None]
    k = torch.nn.functional.pad(keys, (0, 0, 0, pad)) if pad else keys
    big = torch.tensor(torch.finfo(keys.dtype).max, dtype=keys.dtype, device=keys.device)
    kmin = torch.where(valid, k, big).view(b, hkv, pages, page_size, d).amin(3)
    kmax = torch.where(valid, k, -big).view(b, hkv, pages, page_size, d).amax(3)
    empty = (kmin > kmax).any(-1, keepdim=True)
    return kmin.masked_fill(empty, 0), kmax.masked_fill(empty, 0)


def update_page_summaries(kmin: torch.Tensor, kmax: torch.Tensor, new_keys: torch.Tensor, start: int,
                          page_size: int) -> None:
    """In place: fold keys written at positions start.. start+n-1 (same for all sequences) into the summaries.

    kmin/kmax [B, Hkv, P, D] must already hold pages up to ceil((start+n)/page); a page that starts at or
    after `start` is overwritten, an earlier partial page is merged with min/max.
    """
    n = new_keys.shape[2]
    first, last = start // page_size, (start + n - 1) // page_size
    for p in range(first, last + 1):
        lo, hi = max(p * page_size, start), min((p + 1) * page_size, start + n)
        chunk = new_keys[:, :, lo - start:hi - start]
        cmin, cmax = chunk.amin(2), chunk.amax(2)
        if lo == p * page_size:
            kmin[:, :, p], kmax[:, :, p] = cmin, cmax
        else:
            torch.minimum(kmin[:, :, p], cmin, out=kmin[:, :, p])
            torch.maximum(kmax[:, :, p], cmax, out=kmax[:, :, p])


def score_pages(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor) -> torch.Tensor:
    """Quest upper bound of q.k over each page, max over the query heads of each KV group.

    q [B, H, D], kmin/kmax [B, Hkv, P, D] -> fp32 [B, Hkv, P]:
    score[b, g, p] = max_{h in group g} (max(q[b,h], 0) . kmax[b,g,p] + min(q[b,h], 0) . kmin[b,g,p])
    (= sum_d max(q_d*kmin_d, q_d*kmax_d), written as two fp32 matmuls), group g = query heads
    g*H/Hkv .. (g+1)*H/Hkv - 1 (transformers' repeat_kv order).
    """
    b, h, d = q.shape
    hkv = kmin.shape[1]
    qg = q.float().view(b, hkv, h // hkv, d)
    per_head = torch.matmul(qg.clamp(min=0), kmax.float().transpose(-1, -2)) + torch.matmul(
        qg.clamp(max=0), kmin.float().transpose(-1, -2))
    return per_head.amax(2)


def select_pages(scores: torch.Tensor, seq_lens: torch.Tensor, page_size: int, keep: torch.Tensor | int,
                 sink_pages: int, recent_pages: int) -> PageSelection:
    """Top pages per (sequence, KV head); sink and recent pages always kept.

    scores [B, Hkv, P] (fp32, P >= ceil(max seq_len / page)), seq_lens [B], keep: pages kept per sequence
    (int or [B]; clamped to [min(n, sink+recent), n] with n = ceil(seq_len/page)).
    Rank key: +inf for p < sink_pages or p >= n - recent_pages, -inf for p >= n, NaN -> -inf, else the
    score. The first `keep` entries of a stable descending sort are kept, then sorted ascending.
    """
    b, hkv, p = scores.shape
    dev = scores.device
    n = num_pages(seq_lens, page_size).to(dev)
    keep_t = torch.as_tensor(keep, device=dev).long().expand(b)
    k = torch.minimum(torch.maximum(keep_t, torch.full_like(keep_t, sink_pages + recent_pages)), n)
    pos = torch.arange(p, device=dev)[None, None, :]
    nb = n[:, None, None]
    forced = (pos < sink_pages) | (pos >= nb - recent_pages)
    rank_key = torch.nan_to_num(scores.float(), nan=-math.inf)
    rank_key = torch.where(forced, torch.full_like(rank_key, math.inf), rank_key)
    rank_key = torch.where(pos >= nb, torch.full_like(rank_key, -math.inf), rank_key)
    order = torch.sort(rank_key, dim=-1, descending=True, stable=True).indices
    chosen = torch.arange(p, device=dev)[None, None, :] < k[:, None, None]
    picked = torch.where(chosen, order, torch.full_like(order, p))
    picked = torch.sort(picked, dim=-1).values
    indices = torch.where(picked == p, torch.full_like(picked, PAD), picked).to(torch.int32)
    counts = k[:, None].expand(b, hkv).to(torch.int32).contiguous()
    return PageSelection(page_size, seq_lens.to(dev).to(torch.int32), counts, indices.contiguous())


def all_pages(seq_lens: torch.Tensor, page_size: int, num_kv_heads: int) -> PageSelection:
    """The selection that reads every page (dense attention through the sparse kernels)."""
    n = num_pages(seq_lens, page_size)
    p = int(n.max()) if n.numel() else 0
    pos = torch.arange(p, device=seq_lens.device)[None, None, :].expand(len(seq_lens), num_kv_heads, p)
    indices = torch.where(pos < n[:, None, None], pos, torch.full_like(pos, PAD)).to(torch.int32)
    counts = n[:, None].expand(len(seq_lens), num_kv_heads).to(torch.int32).contiguous()
    return PageSelection(page_size, seq_lens.to(torch.int32), counts, indices.contiguous())


def _pool(x: torch.Tensor, block: int) -> torch.Tensor:
    """Mean of each block of rows over its valid rows: [B, H, S, D] -> fp32 [B, H, ceil(S/block), D]."""
    b, h, s, d = x.shape
    nblk = math.ceil(s / block)
    pad = nblk * block - s
    xf = torch.nn.functional.pad(x.float(), (0, 0, 0, pad)).view(b, h, nblk, block, d).sum(3)
    sizes = torch.full((nblk,), float(block), device=x.device)
    sizes[-1] = s - (nblk - 1) * block
    return xf / sizes[:, None]


def block_diagonal(nq: int, sq: int, sk: int, block: int, device=None) -> torch.Tensor:
    """Last key block each query block may see: int64 [NQ], (Sk - Sq + min((i+1)*block, Sq) - 1) // block."""
    last_row = torch.clamp(torch.arange(1, nq + 1, device=device) * block, max=sq) - 1
    return (sk - sq + last_row) // block


def block_importance(q: torch.Tensor, k: torch.Tensor, block: int, scale: float | None = None) -> torch.Tensor:
    """Cheap block attention: q [B, H, Sq, D], k [B, Hkv, Sk, D] -> fp32 [B, Hkv, NQ, NK].

    probs[b, h, i, :] = softmax over key blocks j <= diag(i) of (mean q rows of block i) . (mean keys of
    block j) * scale; then the mean over the query heads of each KV group.
    """
    b, h, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    scale = d ** -0.5 if scale is None else scale
    qb, kb = _pool(q, block), _pool(k, block)
    nq, nk = qb.shape[2], kb.shape[2]
    qb = qb.view(b, hkv, h // hkv, nq, d)
    logits = torch.einsum("bgrqd,bgkd->bgrqk", qb, kb) * scale
    allowed = torch.arange(nk, device=q.device)[None, :] <= block_diagonal(nq, sq, sk, block, q.device)[:, None]
    logits = logits.masked_fill(~allowed, -math.inf)
    return torch.softmax(logits, dim=-1).mean(2)


def select_blocks(probs: torch.Tensor, sq: int, sk: int, block: int, *, mass: float | None = 0.95,
                  density: float | None = None, sink_blocks: int = 1, local_blocks: int = 1) -> BlockSelection:
    """Key blocks per query block: sink + local blocks, then the most important until `mass` or `density`.

    probs [B, Hkv, NQ, NK] (block_importance). Allowed: j <= diag(i). Forced: allowed and (j < sink_blocks
    or j > diag(i) - local_blocks). Candidates = allowed and not forced, ranked by a stable descending sort of
    probs (ties: lower j first). With `density`: keep the first max(0, ceil(density*allowed) - forced)
    candidates. Else with `mass`: keep candidate at rank r iff forced_mass + (sum of candidates ranked
    before r) < mass (fp32 cumsum).
    """
    b, hkv, nq, nk = probs.shape
    dev = probs.device
    j = torch.arange(nk, device=dev)[None, :]
    diag = block_diagonal(nq, sq, sk, block, dev)[:, None]
    allowed = j <= diag
    forced = allowed & ((j < sink_blocks) | (j > diag - local_blocks))
    cand = allowed & ~forced
    p = probs.float()
    key = torch.where(cand, torch.nan_to_num(p, nan=0.0), torch.full_like(p, -math.inf))
    sorted_vals, order = torch.sort(key, dim=-1, descending=True, stable=True)
    n_cand = cand.sum(-1)
    rank = torch.arange(nk, device=dev)
    if density is not None:
        n_forced = forced.sum(-1)
        target = torch.ceil(density * allowed.sum(-1).double() - 1e-9).long()
        take = torch.clamp(target - n_forced, min=0)[None, None]
        take = torch.minimum(take, n_cand[None, None])
        take_rank = (rank < take[..., None]).expand(b, hkv, nq, nk)
    else:
        fm = torch.where(forced, p, torch.zeros_like(p)).sum(-1, keepdim=True)
        vals = torch.where(torch.isinf(sorted_vals), torch.zeros_like(sorted_vals), sorted_vals)
        before = torch.cumsum(vals, -1) - vals
        take_rank = ((fm + before) < mass) & (rank < n_cand[..., None])
    kept_cand = torch.zeros_like(cand.expand(b, hkv, nq, nk)).scatter(-1, order, take_rank)
    kept = forced | kept_cand
    counts = kept.sum(-1).to(torch.int32)
    pos = torch.where(kept, j.expand(b, hkv, nq, nk), torch.full((b, hkv, nq, nk), nk, device=dev))
    pos = torch.sort(pos, dim=-1).values
    indices = torch.where(pos == nk, torch.full_like(pos, PAD), pos).to(torch.int32)
    return BlockSelection(block, counts.contiguous(), indices.contiguous())


def all_blocks(batch: int, num_kv_heads: int, sq: int, sk: int, block: int, device=None) -> BlockSelection:
    """The causal selection that reads every allowed key block (dense prefill through the kernel)."""
    nq, nk = math.ceil(sq / block), math.ceil(sk / block)
    diag = block_diagonal(nq, sq, sk, block, device)
    j = torch.arange(nk, device=device)[None, :]
    idx = torch.where(j <= diag[:, None], j, torch.full_like(j, PAD)).to(torch.int32)
    indices = idx[None, None].expand(batch, num_kv_heads, nq, nk).contiguous()
    counts = (diag + 1).to(torch.int32)[None, None].expand(batch, num_kv_heads, nq).contiguous()
    return BlockSelection(block, counts, indices)
