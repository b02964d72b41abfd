"""Calibrated GQA conversion: closed-form fit of shared K/V per group on calibration activations.

Per layer (statistics from `gqa_stats`, one forward pass over the calibration batches):
1. optionally regroup KV heads by similarity (`gqa_grouping`, a function-preserving head permutation);
2. keys (`gqa_keys`): per RoPE frequency a query-energy-weighted rank-1 complex fit; the per-head complex
   scalars are folded into q_proj rows (exact under RoPE). Per-head QK-norm (Qwen3) forbids folding through
   the norm, so there the shared key is the query-energy-weighted mean and nothing is folded;
3. values (`gqa_values`): o_proj-weighted whitened SVD; the per-head maps are folded into o_proj columns.
With groups == KV heads (or heads that are exact copies) the fit reproduces the input function.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..models import AttentionView
from .activations import attention_input_grams
from .gqa_grouping import head_similarity, permute_heads, similarity_groups
from .gqa_keys import fit_shared_keys, fold_into_queries
from .gqa_layout import LayerAttention, layer_tensors, read_layer
from .gqa_stats import augment_rows, split_rows, whitening
from .gqa_values import fit_shared_values


def _space(gram: torch.Tensor, biased: bool) -> torch.Tensor:
    return gram if biased else gram[:-1, :-1]


def fit_layer(w: LayerAttention, gram: torch.Tensor, view: AttentionView, groups: int, grouping: str,
              damping: float) -> tuple[LayerAttention, dict[str, Any]]:
    """Fit one layer. gram: augmented input second moment [hidden+1, hidden+1] (fp64).

    Returns the converted projections (k/v: [groups*d, hidden]) and fit figures.
    """
    heads, kv, d = view.num_heads, view.num_kv_heads, view.head_dim
    r, m = heads // kv, kv // groups
    rot = view.rope.rotary_dim if view.rope is not None else 0
    lk, lk_inv = whitening(_space(gram, view.k_bias), damping)
    lv, lv_inv = whitening(_space(gram, view.v_bias), damping)
    kw = (augment_rows(w.k, w.k_bias, view.k_bias) @ lk).reshape(kv, d, -1)
    vw = (augment_rows(w.v, w.v_bias, view.v_bias) @ lv).reshape(kv, d, -1)
    order = list(range(kv))
    if grouping == "similarity" and 1 < groups < kv:
        order = [j for g in similarity_groups(head_similarity(kw, vw), groups) for j in g]
        w = permute_heads(w, order, heads, d)
        kw, vw = kw[order], vw[order]
    qa = augment_rows(w.q, w.q_bias, True)
    qenergy = ((qa @ gram) * qa).sum(-1).reshape(heads, d)
    half = rot // 2
    freq_energy = (qenergy[:, :half] + qenergy[:, half:rot]).reshape(kv, r, half).sum(1)  # [KV, F]
    o = w.o.double().reshape(-1, heads, d)  # [hidden, H, d]
    o_gram = torch.einsum("ehd,ehf->hdf", o, o).reshape(kv, r, d, d).sum(1)  # [KV, d, d]
    q_new, o_new = qa.reshape(heads, d, -1).clone(), o.clone()
    k_rows, v_rows, kerr, verr = [], [], [], []
    for g in range(groups):
        js = list(range(g * m, (g + 1) * m))
        k_sh, c, kmaps, e = fit_shared_keys(kw[js], freq_energy[js], rot, compensate=not view.qk_norm)
        k_rows.append(k_sh @ lk_inv)
        kerr.append(e)
        v_sh, vmaps, e = fit_shared_values(vw[js], o_gram[js])
        v_rows.append(v_sh @ lv_inv)
        verr.append(e)
        for i, j in enumerate(js):
            hs = slice(j * r, (j + 1) * r)
            q_new[hs] = fold_into_queries(q_new[hs], c[i], None if kmaps is None else kmaps[i], rot)
            o_new[:, hs] = o[:, hs] @ vmaps[i]
    q, q_bias = split_rows(q_new.reshape(heads * d, -1), True, view.q_bias)
    k, k_bias = split_rows(torch.cat(k_rows), view.k_bias, view.k_bias)
    v, v_bias = split_rows(torch.cat(v_rows), view.v_bias, view.v_bias)
    out = LayerAttention(q, k, v, o_new.reshape(o_new.shape[0], -1).float(), q_bias, k_bias, v_bias, w.o_bias)
    return out, {"key_error": sum(kerr) / groups, "value_error": sum(verr) / groups, "kv_order": order}


class TensorSpill:
    """A name -> tensor mapping kept on disk (one safetensors file per `update`) so fitted layers do not pile
    up in memory; read back one tensor at a time."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._where: dict[str, Path] = {}

    def update(self, tensors: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        f = self.folder / f"part-{len(self._where):06d}.safetensors"
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(f))
        self._where.update({k: f for k in tensors})

    def __contains__(self, name: object) -> bool:
        return name in self._where

    def __getitem__(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(str(self._where[name]), framework="pt") as sf:
            return sf.get_tensor(name)

    def keys(self):
        return self._where.keys()


def fit_calibrated(model, view: AttentionView, cfg, batches, progress: bool = True,
                   weights: Callable[[str], torch.Tensor] | None = None, store=None
                   ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Fit every layer of `model` (the original) to `cfg.groups` KV heads on `batches`
    (LongTensor[1, S] token ids). `weights(name)` gives a checkpoint tensor (default: the model's state dict;
    pass the checkpoint reader's `get` when the model is offloaded or held at low precision).
    `model` may be a `runtime.layerwise.LayerwiseModel`: each layer is then fitted as soon as its Gram matrix
    is complete and the Gram freed, so memory holds one layer's statistics.
    Returns (checkpoint name -> new tensor, fit metrics)."""
    from .activations import is_layerwise

    if weights is None:
        weights = model.reader.get if is_layerwise(model) else model.state_dict().__getitem__
    replacements = {} if store is None else store  # e.g. a TensorSpill
    layers: list[dict[str, Any]] = []

    def fit(layer: int, grams: list) -> None:
        new, figures = fit_layer(read_layer(weights, view, layer), grams[layer], view, cfg.groups, cfg.grouping,
                                 cfg.damping)
        grams[layer] = None
        replacements.update(layer_tensors(view, layer, new))
        layers.append(figures)

    if is_layerwise(model):
        _, tokens = attention_input_grams(model, view, batches, progress=progress, augment=True, after_layer=fit)
    else:
        grams, tokens = attention_input_grams(model, view, batches, progress=progress, augment=True)
        for layer in tqdm(range(view.num_layers), desc="fit", disable=not progress, leave=False):
            fit(layer, grams)
    metrics = {
        "calibration_tokens": tokens,
        "key_error": sum(f["key_error"] for f in layers) / len(layers),
        "value_error": sum(f["value_error"] for f in layers) / len(layers),
        "qk_norm_fallback": view.qk_norm,
        "layers": layers,
    }
    return replacements, metrics
