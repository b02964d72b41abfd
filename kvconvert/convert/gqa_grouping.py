"""Which KV heads share a group: consecutive (as `repeat_kv` groups them) or chosen by similarity.

Any grouping is realised by permuting heads before the consecutive merge: KV head blocks of k/v rows, and the
matching query heads (q rows, o_proj columns) move along, which changes no function.
"""

from __future__ import annotations

import torch

from .gqa_layout import LayerAttention


def head_similarity(kw: torch.Tensor, vw: torch.Tensor) -> torch.Tensor:
    """[KV, KV] similarity in [0, 2] of whitened key and value functionals (kw, vw: [KV, d, n]):
    the squared-cosine overlap of the row spaces, keys and values added."""
    def overlap(x: torch.Tensor) -> torch.Tensor:
        kv, d = x.shape[:2]
        flat = x.reshape(kv * d, -1).float()  # a ranking: fp32 GEMM (one [KV*d, KV*d] Gram) is precise enough
        g = (flat @ flat.T).reshape(kv, d, kv, d).double().pow(2).sum((1, 3))  # ||X_a X_b^T||_F^2
        diag = g.diagonal().sqrt().clamp_min(1e-30)
        return g / (diag[:, None] * diag[None, :])
    return overlap(kw) + overlap(vw)


def similarity_groups(sim: torch.Tensor, groups: int) -> list[list[int]]:
    """Partition heads into `groups` equal groups greedily: seed with the head least like the rest, then add
    the heads most similar to the group so far."""
    kv = sim.shape[0]
    size = kv // groups
    left = set(range(kv))
    out = []
    for _ in range(groups):
        rest = sorted(left)
        seed = min(rest, key=lambda j: sum(float(sim[j, k]) for k in rest if k != j))
        group = [seed]
        left.remove(seed)
        while len(group) < size:
            best = max(sorted(left), key=lambda k: sum(float(sim[g, k]) for g in group))
            group.append(best)
            left.remove(best)
        out.append(sorted(group))
    return sorted(out)


def permute_heads(w: LayerAttention, kv_order: list[int], heads: int, head_dim: int) -> LayerAttention:
    """Reorder KV heads to `kv_order` and their query heads with them (q rows, q bias, o columns)."""
    kv = len(kv_order)
    r = heads // kv
    q_order = [j * r + i for j in kv_order for i in range(r)]

    def rows(t: torch.Tensor | None, order: list[int]) -> torch.Tensor | None:
        if t is None:
            return None
        return t.reshape(len(order), head_dim, *t.shape[1:])[order].reshape(t.shape)

    o = w.o.reshape(w.o.shape[0], heads, head_dim)[:, q_order].reshape(w.o.shape)
    return w.with_(q=rows(w.q, q_order), q_bias=rows(w.q_bias, q_order), k=rows(w.k, kv_order),
                   k_bias=rows(w.k_bias, kv_order), v=rows(w.v, kv_order), v_bias=rows(w.v_bias, kv_order), o=o)
