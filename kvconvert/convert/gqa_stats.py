"""Second-moment statistics of the attention inputs, for the closed-form calibrated GQA fit.

Per layer the fit needs S = sum_t x_t x_t^T of the input x of q/k/v (optionally augmented with a constant 1,
so projection biases are fitted like weights), and a whitening L with S ~= L L^T: for any row functional w,
||X w||^2 = ||w L||^2, so least squares on activations becomes plain linear algebra on `W @ L`.
The matrices come from `kvconvert.convert.activations.attention_input_grams(..., augment=True)`.
"""

from __future__ import annotations

import torch


def whitening(gram: torch.Tensor, damping: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(L, L_inv) with gram + damping*mean(eig) I = L L^T; both Tensor[n, n] fp64."""
    evals, evecs = torch.linalg.eigh(gram)
    evals = evals.clamp_min(0) + damping * evals.clamp_min(0).mean() + 1e-12
    root = evals.sqrt()
    return evecs * root, (evecs / root).T


def augment_rows(w: torch.Tensor, b: torch.Tensor | None, augment: bool) -> torch.Tensor:
    """[rows, hidden] weight (+ [rows] bias) -> [rows, hidden(+1)] fp64 functional on [x; 1]."""
    w = w.double()
    if not augment:
        return w
    b = torch.zeros(w.shape[0], dtype=w.dtype) if b is None else b.double()
    return torch.cat([w, b[:, None]], dim=1)


def split_rows(wa: torch.Tensor, augment: bool, bias: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Inverse of `augment_rows`: (weight [rows, hidden], bias [rows] or None), fp32."""
    if not augment:
        return wa.float(), None
    return wa[:, :-1].float(), (wa[:, -1].float() if bias else None)
