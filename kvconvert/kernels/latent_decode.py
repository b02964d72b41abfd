"""Decode attention straight from a latent KV cache (kvconvert fit-latent models) and its eager reference.

One new token per sequence. The cache holds pre-RoPE latents, one buffer per kind shared by all KV heads:
  q        [B, H, D]        the query, already rotated at its own slot (post-RoPE, as the scoring sees it)
  c_k      [B, 1, Lmax, Rk] key latents;   c_v [B, 1, Lmax, Rv] value latents (joint latent: pass c_k itself)
  seq_lens int32 [B]        valid slots per sequence (the current token included)
  weights  `LatentWeights`  up projections k_up [Rk, KV*D], v_up [Rv, KV*Dv], biases, k_norm, RoPE table [Lmax, R]
  counts/indices/page_size  a `PageSelection` (None: every slot < seq_len); `sink`/`window` > 0 further keep only
                            slots j < sink or j >= seq_len - window (`sink_window_pages` gives the pages to visit)
  -> out [B, H, Dv] in q's dtype.
Per slot j of KV head g: K_j = RoPE_j(k_norm(c_k[j] @ k_up_g + k_bias_g)); values are never rebuilt: with
p the softmax weights, sum_j p_j (c_v[j] @ v_up_g + v_bias_g) = (sum_j p_j c_v[j]) @ v_up_g + v_bias_g, so the
attention accumulates in latent space (Rv wide) and v_up is applied once per query head at the end.
Keys cannot be absorbed into the query: RoPE's rotation depends on the slot, and k_norm is not linear.
fp32 scores, softmax and accumulation; `scale=None` means D^-0.5. Query head h reads KV head h // (H/KV).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ._common import check_device, default_scale
from .selection import PageSelection, all_pages, num_pages


@dataclass
class LatentWeights:
    """One layer's latent up projections (the `KVLatentAttention` op's weight inputs).

    k_up [Rk, KV*D], k_bias [KV*D] | None, v_up [Rv, KV*Dv], v_bias [KV*Dv] | None, k_norm_weight [D] | None
    (None: no k_norm), k_norm_eps, rope_cos / rope_sin [Lmax, R] (R <= D: rotate-half on the first R dims).
    """

    num_kv_heads: int
    k_up: torch.Tensor
    v_up: torch.Tensor
    rope_cos: torch.Tensor
    rope_sin: torch.Tensor
    k_bias: torch.Tensor | None = None
    v_bias: torch.Tensor | None = None
    k_norm_weight: torch.Tensor | None = None
    k_norm_eps: float = 0.0
    _prepared: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def head_dim(self) -> int:
        return self.k_up.shape[1] // self.num_kv_heads

    @property
    def v_head_dim(self) -> int:
        return self.v_up.shape[1] // self.num_kv_heads

    @property
    def k_norm(self) -> bool:
        return self.k_norm_weight is not None and self.k_norm_eps > 0

    @classmethod
    def from_op_inputs(cls, attrs: dict, k_up, k_bias, v_up, v_bias, k_norm_weight, rope_cos, rope_sin):
        """From the KVLatentAttention weight inputs and attributes (zero biases and ones k_norm are kept)."""
        eps = float(attrs.get("k_norm_eps", 0.0))
        return cls(int(attrs["num_kv_heads"]), k_up, v_up, rope_cos, rope_sin, k_bias, v_bias,
                   k_norm_weight if eps > 0 else None, eps)

    def rotation_tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin widened to D: fp32 [Lmax, D], 1 / 0 on the dims RoPE does not touch."""
        if "tables" not in self._prepared:
            d, r = self.head_dim, self.rope_cos.shape[-1]
            cos = torch.ones(self.rope_cos.shape[0], d, dtype=torch.float32, device=self.k_up.device)
            sin = torch.zeros_like(cos)
            cos[:, :r], sin[:, :r] = self.rope_cos.float(), self.rope_sin.float()
            self._prepared["tables"] = (cos.contiguous(), sin.contiguous())
        return self._prepared["tables"]

    def rotated_half(self) -> dict[str, torch.Tensor]:
        """The linear maps of rotate_half(k) (0 on pass dims): k_up_r [Rk, KV*D], k_bias_r [KV*D], and the
        k_norm weight permuted the same way, w_r [D], all fp32 (rotate_half is a signed permutation of dims)."""
        if "half" not in self._prepared:
            kv, d, r = self.num_kv_heads, self.head_dim, self.rope_cos.shape[-1]
            perm = torch.arange(d)
            perm[: r // 2] += r // 2
            perm[r // 2: r] -= r // 2
            sign = torch.zeros(d)
            sign[: r // 2], sign[r // 2: r] = -1.0, 1.0
            sign = sign.to(self.k_up.device)
            up = self.k_up.float().view(-1, kv, d)
            bias = (self.k_bias.float() if self.k_bias is not None
                    else torch.zeros(kv * d, device=self.k_up.device)).view(kv, d)
            w = self.k_norm_weight.float() if self.k_norm else torch.ones(d, device=self.k_up.device)
            self._prepared["half"] = {
                "k_up_r": (up[..., perm] * sign).reshape(up.shape[0], kv * d).contiguous(),
                "k_bias_r": (bias[..., perm] * sign).reshape(-1).contiguous(),
                "w": w.contiguous(), "w_r": w[perm].contiguous(),
                "k_bias": bias.reshape(-1).contiguous(),
            }
        return self._prepared["half"]


def rebuild_keys(c_k: torch.Tensor, w: LatentWeights, positions: torch.Tensor, head: int | None = None) -> torch.Tensor:
    """Post-RoPE keys of latent rows: c_k [B, N, Rk], positions long [B, N] -> fp32 [B, KV, N, D]
    (`head` given: that KV head only, [B, N, D])."""
    b, n, _ = c_k.shape
    d = w.head_dim
    up = w.k_up.float()
    bias = w.k_bias.float() if w.k_bias is not None else None
    if head is not None:
        cols = slice(head * d, (head + 1) * d)
        up, bias = up[:, cols], (bias[cols] if bias is not None else None)
    c = c_k.float().reshape(b * n, -1)
    x = (torch.addmm(bias, c, up) if bias is not None else c @ up).view(b, n, -1, d)
    if w.k_norm:
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + w.k_norm_eps) * w.k_norm_weight.float()
    r = w.rope_cos.shape[-1]
    if bool((positions == torch.arange(n, device=positions.device)).all()):
        cos, sin = w.rope_cos.float()[None, :n, None], w.rope_sin.float()[None, :n, None]
    else:
        cos, sin = w.rope_cos.float()[positions][:, :, None], w.rope_sin.float()[positions][:, :, None]
    rot = x[..., :r]
    half = torch.cat([-rot[..., r // 2:], rot[..., : r // 2]], -1)
    out = rot * cos + half * sin
    if r < d:
        out = torch.cat([out, x[..., r:]], -1)
    return out.transpose(1, 2) if head is None else out[:, :, 0]


def rebuild_values(c_v: torch.Tensor, w: LatentWeights) -> torch.Tensor:
    """c_v [B, N, Rv] -> fp32 [B, KV, N, Dv] (used by the prefill fallback and the selection summaries)."""
    b, n, _ = c_v.shape
    x = c_v.float() @ w.v_up.float()
    if w.v_bias is not None:
        x = x + w.v_bias.float()
    return x.view(b, n, w.num_kv_heads, -1).transpose(1, 2)


def sink_window_pages(seq_lens: torch.Tensor, sink: int, window: int, page_size: int,
                      num_kv_heads: int) -> PageSelection:
    """The pages holding slots [0, min(sink, L)) and [max(L - window, 0), L): what a sink + window decode step
    visits (the kernel masks the other slots of those pages). Ascending, -1 padded, as `select_pages`."""
    lens = seq_lens.long()
    n = num_pages(lens, page_size)
    p = int(n.max()) if n.numel() else 0
    pages = torch.arange(p, device=seq_lens.device)[None, :]
    first_window = torch.clamp(lens - window, min=0)[:, None] // page_size
    keep = (pages < n[:, None]) & ((pages * page_size < sink) | (pages >= first_window))
    order = torch.where(keep, pages, torch.full_like(pages, p)).sort(-1).values
    indices = torch.where(order == p, torch.full_like(order, -1), order).to(torch.int32)
    counts = keep.sum(-1).to(torch.int32)
    b = len(seq_lens)
    return PageSelection(page_size, seq_lens.to(torch.int32), counts[:, None].expand(b, num_kv_heads).contiguous(),
                         indices[:, None].expand(b, num_kv_heads, p).contiguous())


def _selected_slots(seq_lens, counts, indices, page_size, sink, window, kv, device):
    """long [B, KV, N] slot per read position (clamped to 0 where invalid) and bool [B, KV, N] validity."""
    lens = seq_lens.long().to(device)
    if counts is None:
        length = int(lens.max())
        pos = torch.arange(length, device=device)[None, None, :].expand(len(lens), kv, length)
        ok = pos < lens[:, None, None]
    else:
        width = max(int(counts.max()) if counts.numel() else 0, 1)
        idx = indices[..., :width].long()
        rank_ok = torch.arange(width, device=device)[None, None, :] < counts[..., None].long()
        pos = (idx.clamp(min=0)[..., None] * page_size + torch.arange(page_size, device=device)).flatten(2)
        ok = (rank_ok[..., None].expand(*idx.shape, page_size).flatten(2)) & (pos < lens[:, None, None])
    if window > 0:
        ok = ok & ((pos < sink) | (pos >= lens[:, None, None] - window))
    return torch.where(ok, pos, torch.zeros_like(pos)), ok


def latent_decode_reference(q, c_k, c_v, seq_lens, weights: LatentWeights, counts=None, indices=None,
                            page_size: int = 64, sink: int = 0, window: int = 0, scale=None):
    """Eager twin of `latent_decode` (same signature and algebra): gathers the visited latent rows once per KV
    head, rebuilds their keys, attends in fp32, accumulates the value latents, then applies v_up."""
    scale = default_scale(q.shape[-1], scale)
    b, h, d = q.shape
    kv = weights.num_kv_heads
    g = h // kv
    joint = c_v is c_k
    pos, ok = _selected_slots(seq_lens, counts, indices, page_size, sink, window, kv, q.device)
    lmax = c_k.shape[2]
    if counts is None:  # every head reads the same rows: rebuild once for all heads
        n = pos.shape[2]
        ck = c_k[:, 0, :n]
        keys = rebuild_keys(ck, weights, pos[:, 0])                                   # [B, KV, N, D]
        cv = (ck if joint else c_v[:, 0, :n]).float()                                  # [B, N, Rv]
    else:
        flat = (pos + torch.arange(b, device=q.device)[:, None, None] * lmax).reshape(b, -1)
        ck = c_k.reshape(b * lmax, -1).index_select(0, flat.flatten()).view(b, kv, -1, c_k.shape[-1])
        n = ck.shape[2]
        keys = torch.stack([rebuild_keys(ck[:, i], weights, pos[:, i], head=i) for i in range(kv)], 1)
        cv = ck if joint else c_v.reshape(b * lmax, -1).index_select(0, flat.flatten()).view(b, kv, n, -1)
        cv = cv.float()
    qg = q.float().view(b, kv, g, d)
    s = torch.einsum("bkgd,bknd->bkgn", qg, keys) * scale
    p = torch.softmax(s.masked_fill(~ok[:, :, None, :], float("-inf")), -1).nan_to_num(0.0)
    if cv.dim() == 3:  # shared rows: one [B, KV*G, N] @ [B, N, Rv] product
        o_lat = torch.bmm(p.reshape(b, kv * g, -1), cv).view(b, kv, g, -1)
    else:
        o_lat = torch.einsum("bkgn,bknr->bkgr", p, cv)                                 # [B, KV, G, Rv]
    return project_values(o_lat, weights, p.sum(-1)).reshape(b, h, -1).to(q.dtype)


def project_values(o_lat: torch.Tensor, w: LatentWeights, mass: torch.Tensor | None = None) -> torch.Tensor:
    """Latent-space attention output o_lat fp32 [B, KV, G, Rv] -> [B, KV, G, Dv] = o_lat @ v_up_g + v_bias_g
    (`mass` [B, KV, G]: the softmax mass, 0 for a row that saw nothing, which then stays 0)."""
    kv = w.num_kv_heads
    up = w.v_up.float().view(w.v_up.shape[0], kv, -1)
    out = torch.einsum("bkgr,rkd->bkgd", o_lat, up)
    if w.v_bias is not None:
        bias = w.v_bias.float().view(kv, -1)[None, :, None, :]
        out = out + (bias if mass is None else bias * mass[..., None])
    return out


def latent_decode(q, c_k, c_v, seq_lens, weights: LatentWeights, counts=None, indices=None, page_size: int = 64,
                  sink: int = 0, window: int = 0, scale=None, num_splits=None):
    """Triton kernel: one program per (sequence, KV head, split) reads each visited latent row once for the
    whole query group, rebuilds the group's keys in registers and accumulates the value latents; splits are
    merged by the paged kernel's combine step, then v_up is applied (`project_values`)."""
    check_device(q, c_k, c_v, weights.k_up, name="latent_decode")
    from ._triton_latent import latent_decode_triton

    if counts is None:
        sel = (sink_window_pages(seq_lens, sink, window, page_size, weights.num_kv_heads) if window > 0
               else all_pages(seq_lens, page_size, weights.num_kv_heads))
        counts, indices = sel.counts, sel.indices
    scale = default_scale(q.shape[-1], scale)
    o_lat, mass = latent_decode_triton(q, c_k, c_v, seq_lens, weights, counts, indices, page_size, sink, window,
                                       scale, num_splits)
    b, h, _ = q.shape
    kv = weights.num_kv_heads
    out = project_values(o_lat.view(b, kv, h // kv, -1), weights, mass.view(b, kv, h // kv))
    return out.reshape(b, h, -1).to(q.dtype)


def latent_decode_step(q, c_k, c_v, seq_lens, weights: LatentWeights, **kw):
    """The entry point for one decode step from a latent cache (what `kvconvert.runtime.latent` calls): the
    Triton `latent_decode` kernel on CUDA, its eager twin `latent_decode_reference` elsewhere; same arguments."""
    if q.is_cuda:
        return latent_decode(q, c_k, c_v, seq_lens, weights, **kw)
    kw.pop("num_splits", None)
    return latent_decode_reference(q, c_k, c_v, seq_lens, weights, **kw)
