"""Second-moment statistics of the attention inputs, for the closed-form calibrated GQA fit.

Per layer the fit needs S = sum_t x_t x_t^T of the input x of q/k/v (optionally augmented with a constant 1,
so projection biases are fitted like weights), and a whitening L with S ~= L L^T: for any row functional w,
||X w||^2 = ||w L||^2, so least squares on activations becomes plain linear algebra on `W @ L`.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from tqdm.auto import tqdm

from ..models import AttentionView


@torch.no_grad()
def augmented_grams(model, view: AttentionView, batches: Iterable[torch.Tensor], augment: bool,
                    progress: bool = True) -> tuple[list[torch.Tensor], int]:
    """Per layer S[l] = sum_t [x_t; 1][x_t; 1]^T (Tensor[hidden+1, hidden+1], fp64) or x x^T without `augment`.

    One forward pass per calibration batch (LongTensor[1, S]); hooks fold each attention input into its
    layer's matrix, so no activations are kept. Returns (matrices, token count).
    """
    modules = dict(model.named_modules())
    mods = [modules[view.layer_prefix(i)] for i in range(view.num_layers)]
    n = view.hidden_size + int(augment)
    grams = [torch.zeros(n, n, dtype=torch.float64) for _ in mods]

    def hook(layer: int):
        def fn(module, args, kwargs):
            x = kwargs.get("hidden_states", args[0] if args else None)
            x = x.reshape(-1, x.shape[-1]).to(dtype=torch.float64, device="cpu")
            if augment:
                x = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], dim=1)
            grams[layer].addmm_(x.T, x)
        return fn

    handles = [m.register_forward_pre_hook(hook(i), with_kwargs=True) for i, m in enumerate(mods)]
    device = next(model.parameters()).device
    tokens = 0
    try:
        for ids in tqdm(list(batches), desc="calibration", disable=not progress, leave=False):
            model(ids.to(device), use_cache=False)
            tokens += ids.numel()
    finally:
        for h in handles:
            h.remove()
    return grams, tokens


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
