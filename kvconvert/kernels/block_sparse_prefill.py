"""Block-sparse causal prefill attention, its eager reference, and the sink+window prefill reference.

q [B, H, Sq, D], k/v [B, Hkv, Sk, D] with Sk >= Sq (the Sq new tokens end the sequence: query row r is at
key position Sk - Sq + r), counts int32 [B, Hkv, NQ], indices int32 [B, Hkv, NQ, NK]
(`kvconvert.kernels.selection.BlockSelection`) -> out [B, H, Sq, D] in q's dtype. Inside each selected key
block the causal rule (key position <= query position) is applied per token. fp32 softmax.
"""

from __future__ import annotations

import torch

from ._common import check_device, default_scale


def _grouped_masked_attention(q_rows, k_sel, v_sel, visible, scale: float, out_dtype):
    """fp32 softmax attention of a query group over gathered keys.

    q_rows [B, Hkv, G, R, D], k_sel/v_sel [B, Hkv, T, D], `visible` broadcastable to [B, Hkv, 1, R, T]
    -> [B, Hkv*G, R, Dv] in `out_dtype`; rows that see nothing give 0.
    """
    b, hkv, g, r, _ = q_rows.shape
    s = torch.einsum("bgrqd,bgtd->bgrqt", q_rows.float(), k_sel.float()) * scale
    p = torch.softmax(s.masked_fill(~visible, float("-inf")), -1).nan_to_num(0.0)
    return torch.einsum("bgrqt,bgtd->bgrqd", p, v_sel.float()).reshape(b, hkv * g, r, -1).to(out_dtype)


def block_sparse_prefill_reference(q, k, v, counts, indices, block_size: int, scale=None):
    """Eager reference: per query block, gather the selected key blocks of its KV head."""
    b, h, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    g = h // hkv
    scale = default_scale(d, scale)
    offset = sk - sq
    out = torch.empty(b, h, sq, v.shape[-1], dtype=q.dtype, device=q.device)
    arange_blk = torch.arange(block_size, device=q.device)
    for i in range(indices.shape[2]):
        r0, r1 = i * block_size, min((i + 1) * block_size, sq)
        cnt = counts[:, :, i].long()
        width = max(int(cnt.max()), 1)
        idx = indices[:, :, i, :width].long()
        tok = (idx.clamp(min=0)[..., None] * block_size + arange_blk).flatten(2)
        tok_c = tok.clamp(max=sk - 1)
        kk = torch.gather(k, 2, tok_c[..., None].expand(b, hkv, tok.shape[2], d))
        vv = torch.gather(v, 2, tok_c[..., None].expand(b, hkv, tok.shape[2], v.shape[-1]))
        blk_ok = (torch.arange(width, device=q.device)[None, None, :] < cnt[..., None])
        blk_ok = blk_ok[..., None].expand(b, hkv, width, block_size).flatten(2)
        qpos = offset + torch.arange(r0, r1, device=q.device)
        valid = blk_ok[:, :, None, :] & (tok[:, :, None, :] <= qpos[None, None, :, None]) & (tok < sk)[:, :, None]
        qq = q[:, :, r0:r1].view(b, hkv, g, r1 - r0, d)
        out[:, :, r0:r1] = _grouped_masked_attention(qq, kk, vv, valid[:, :, None], scale, q.dtype)
    return out


def block_sparse_prefill(q, k, v, counts, indices, block_size: int, scale=None):
    """Triton kernel: one program per (query block, query head, sequence), looping over its selected key
    blocks (flash-attention style online softmax)."""
    check_device(q, k, v, counts, indices, name="block_sparse_prefill")
    from ._triton_prefill import block_sparse_prefill_triton

    return block_sparse_prefill_triton(q, k, v, counts, indices, block_size, default_scale(q.shape[-1], scale))


def sink_window_prefill_reference(q, k, v, sink: int, window: int, scale=None, chunk: int = 256):
    """Causal attention restricted to the first `sink` and the last `window` positions (query's own
    included) of each query: key j visible from query position t iff j <= t and (j < sink or t - j < window)."""
    b, h, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    g = h // hkv
    scale = default_scale(d, scale)
    offset = sk - sq
    out = torch.empty(b, h, sq, v.shape[-1], dtype=q.dtype, device=q.device)
    kpos = torch.arange(sk, device=q.device)
    for r0 in range(0, sq, chunk):
        r1 = min(r0 + chunk, sq)
        t = offset + torch.arange(r0, r1, device=q.device)[:, None]
        lo = max(0, offset + r0 - window + 1)
        cols = torch.cat([kpos[:min(sink, lo)], kpos[lo:offset + r1]])
        j = cols[None, :]
        valid = (j <= t) & ((j < sink) | (t - j < window))
        qq = q[:, :, r0:r1].view(b, hkv, g, r1 - r0, d)
        out[:, :, r0:r1] = _grouped_masked_attention(qq, k[:, :, cols], v[:, :, cols], valid, scale, q.dtype)
    return out
