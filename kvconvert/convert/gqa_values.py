"""Closed-form value side of the calibrated GQA fit.

A group's m value heads v_j = V_j x~ (whitened input x~) are replaced by one shared v' = P^T x~ of head_dim d,
and each head gets a free linear map B_j (folded into its query heads' o_proj columns: O_h B_j), so
v_j ~= B_j v'. The error that reaches the residual stream is sum_{h} ||O_h (v_j - B_j v')||^2; with
R_j^T R_j = sum_{h of head j} O_h^T O_h, the best P is the top-d right singular subspace of [R_j V_j]_j.
"""

from __future__ import annotations

import torch


def psd_sqrt(g: torch.Tensor) -> torch.Tensor:
    evals, evecs = torch.linalg.eigh(g)
    return (evecs * evals.clamp_min(0).sqrt()) @ evecs.T


def fit_shared_values(vw: torch.Tensor, o_gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """vw: whitened values of the group's m heads [m, d, n]; o_gram: sum of O_h^T O_h per head [m, d, d].

    Returns (v' [d, n] whitened shared value, B [m, d, d] with v_j ~= B_j v', relative o-weighted error).
    """
    m, d, n = vw.shape
    stacked = torch.cat([psd_sqrt(o_gram[j]) @ vw[j] for j in range(m)])  # [m*d, n]
    _, s, vh = torch.linalg.svd(stacked, full_matrices=False)
    p = vh[:d].T  # [n, d] orthonormal
    scale = vw.pow(2).sum(-1).mean().sqrt().clamp_min(1e-30)  # keep v' at the size of the original values
    shared = p.T * scale
    maps = (vw @ p) / scale
    err = float((s[d:].pow(2).sum() / s.pow(2).sum().clamp_min(1e-30)))
    return shared, maps, err
