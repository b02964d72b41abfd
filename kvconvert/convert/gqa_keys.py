"""Closed-form key side of the calibrated GQA fit, exact with respect to RoPE.

Rotate-half RoPE pairs dims (f, f + r/2) of a head into one complex number per frequency f; RoPE multiplies it
by e^{i theta_f t}. A key-side map that commutes with RoPE is therefore one complex scalar per frequency (a 2x2
rotation-scaling), and it can be folded into the query: Re(q conj(c k')) = Re((q conj(c)) conj(k')).

Per frequency, the keys of the m heads merged into one group are complex functionals z_j of the whitened
input; the shared key z' and per-head scalars c_j minimise sum_j w_j ||z_j - c_j z'||^2, a weighted rank-1
fit solved by one SVD. The weights w_j are the energy that head j's queries put on frequency f, because the
summed squared score error over all (query, key) pairs is sum_f E|q_f|^2 E|k_f - k'_f|^2 once RoPE's
relative rotations average out the cross terms. Non-rotated dims (partial rotary) get a shared subspace and
a free linear map per head instead.
"""

from __future__ import annotations

import torch


def query_energy(qw: torch.Tensor, rotary_dim: int) -> torch.Tensor:
    """Whitened queries qw [H, d, n] -> energy per (head, frequency) [H, r/2], plus non-rotary energy [H]."""
    half = rotary_dim // 2
    e = qw.pow(2).sum(-1)
    return e[:, :half] + e[:, half:rotary_dim], e[:, rotary_dim:].sum(-1)


def fit_shared_keys(kw: torch.Tensor, weight: torch.Tensor, rotary_dim: int, compensate: bool = True
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, float]:
    """Shared key for one group.

    kw: whitened keys of the group's m heads [m, d, n]; weight: query energy per (head, frequency) [m, r/2]
    (non-rotary dims use the row-sum). Returns (k' [d, n] whitened, c [m, r/2] complex scalars with
    k_j ~= c_j k' per frequency, A [m, d-r, d-r] real maps for non-rotary dims with k_j ~= A_j k' (None
    when r == d), relative weighted error). `compensate=False` (per-head QK-norm: nothing can be folded)
    returns the query-energy-weighted mean key with c = 1 and A = I.
    """
    m, d, n = kw.shape
    half = rotary_dim // 2
    z = torch.complex(kw[:, :half], kw[:, half:rotary_dim])  # [m, F, n]
    w = weight.clamp_min(0).to(kw.dtype)  # [m, F]
    if compensate:
        a = (w.sqrt()[..., None] * z).transpose(0, 1)  # [F, m, n]
        _, _, vh = torch.linalg.svd(a, full_matrices=False)
        u = vh[:, 0, :]  # [F, n] unit
        c = torch.einsum("fn,mfn->mf", u.conj(), z)  # projection coefficients [m, F]
        wsum = w.sum(0).clamp_min(1e-30)
        scale = ((w * c.abs().pow(2)).sum(0) / wsum).sqrt().clamp_min(1e-30)
        phase = torch.polar(torch.ones_like(scale), torch.angle((w * c).sum(0)))
        shared = u * (scale * phase)[:, None]
        c = c / (scale * phase)[None]
    else:
        shared = (w[..., None] * z).sum(0) / w.sum(0).clamp_min(1e-30)[:, None]
        c = torch.ones(m, half, dtype=z.dtype)
    err = (w * (z - c[..., None] * shared[None]).abs().pow(2).sum(-1)).sum()
    tot = (w * z.abs().pow(2).sum(-1)).sum().clamp_min(1e-30)
    k_shared = torch.zeros(d, n, dtype=kw.dtype)
    k_shared[:half], k_shared[half:rotary_dim] = shared.real, shared.imag
    maps = None
    if rotary_dim < d:
        rest = kw[:, rotary_dim:]  # [m, d-r, n]
        dn = d - rotary_dim
        if compensate:
            _, s, vh = torch.linalg.svd(rest.reshape(m * dn, n), full_matrices=False)
            p = vh[:dn].T * (s[:dn] / m**0.5).clamp_min(1e-30)  # [n, dn]; scaled to the keys' size
            basis = torch.linalg.pinv(p)  # [dn, n]
            k_shared[rotary_dim:] = basis
            maps = rest @ p  # [m, dn, dn]: k_j ~= maps_j @ k'
            approx = maps @ basis
        else:
            k_shared[rotary_dim:] = rest.mean(0)
            maps = torch.eye(dn, dtype=kw.dtype).expand(m, dn, dn).clone()
            approx = k_shared[rotary_dim:].expand_as(rest)
        err = err + (rest - approx).pow(2).sum()
        tot = tot + rest.pow(2).sum()
    return k_shared, c, maps, float(err / tot)


def fold_into_queries(q: torch.Tensor, c: torch.Tensor, maps: torch.Tensor | None, rotary_dim: int) -> torch.Tensor:
    """Queries of one KV head's query heads q [hq, d, n'] (weights with bias column) -> q' with
    q'_f = q_f conj(c_f) per frequency and q'_rest = A^T q_rest, so q' . k' == q . (c k') under RoPE."""
    half = rotary_dim // 2
    a, b = q[:, :half], q[:, half:rotary_dim]
    cr, ci = c.real.to(q.dtype)[:, None], c.imag.to(q.dtype)[:, None]
    out = q.clone()
    out[:, :half] = cr * a + ci * b
    out[:, half:rotary_dim] = cr * b - ci * a
    if maps is not None:
        out[:, rotary_dim:] = torch.einsum("ij,hin->hjn", maps.to(q.dtype), q[:, rotary_dim:])
    return out
