"""Mean-pool GQA conversion (the GQA paper's), data-free: each group's K/V projection rows are averaged.

Query head h then uses KV head h // (H/G), exactly as transformers' `repeat_kv` groups consecutive heads.
Two data-free refinements, both exact reparametrisations of the input model before the average:
- grouping="similarity": which KV heads share a group is chosen from the K/V weights alone (row-space overlap,
  `gqa_grouping.head_similarity` on the raw weights) and realised as a head permutation (q rows, o columns);
- align=True (align-then-merge): before averaging, each head of a group is rotated onto the group's consensus.
  Keys: per RoPE frequency pair a 2x2 rotation (commutes with RoPE) found by orthogonal Procrustes, applied to
  the head's key rows and to its query heads' rows, so q.k is unchanged; non-rotary dims get a full orthogonal
  map. Values: an orthogonal d x d map, compensated in the query heads' o_proj columns. Kept per group and
  side only where it lowers the merge error ||K_j - mean||^2 / ||K_j||^2 (recorded per layer).
Works one layer's q/k/v/o at a time (`LayerMerger`), so it still streams.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..models import AttentionView
from .gqa_grouping import head_similarity, permute_heads, similarity_groups
from .gqa_layout import LayerAttention, kv_roles, layer_tensors, read_layer, split_fused, tensor_names
from .gqa_stats import augment_rows, split_rows


def pool_heads(t: torch.Tensor, kv_heads: int, head_dim: int, groups: int) -> torch.Tensor:
    """[KV*d, ...] -> [G*d, ...]: mean over the KV/G consecutive heads of each group (fp32 math, t's dtype).

    groups == kv_heads returns `t` itself, bit for bit.
    """
    if groups == kv_heads:
        return t
    r = kv_heads // groups
    x = t.float().reshape(groups, r, head_dim, *t.shape[1:]).mean(dim=1)
    return x.reshape(groups * head_dim, *t.shape[1:]).to(t.dtype)


def mean_pool_tensor(view: AttentionView, role: str, t: torch.Tensor, groups: int) -> torch.Tensor:
    """Convert one K/V-holding tensor (`role` from `gqa_layout.kv_roles`: k, v, k_bias, v_bias, qkv, qkv_bias)."""
    kv, d = view.num_kv_heads, view.head_dim
    if role in ("qkv", "qkv_bias"):
        q, k, v = split_fused(t, view.num_heads, kv, d)
        return torch.cat([q, pool_heads(k, kv, d, groups), pool_heads(v, kv, d, groups)])
    return pool_heads(t, kv, d, groups)


def merge_error(x: torch.Tensor) -> float:
    """x: [m, d, n] heads of one group -> sum_j ||x_j - mean||^2 / sum_j ||x_j||^2 (fp32 math, fp64 sums)."""
    x = x.float()
    spread = (x - x.mean(0)).pow(2).sum(dtype=torch.float64)
    return float(spread / x.pow(2).sum(dtype=torch.float64).clamp_min(1e-30))


def rotation_2x2(a: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """The rotation R [..., 2, 2] minimising ||R a - ref||_F (a, ref: [..., 2, n]) in closed form: with
    N = a ref^T, tr(R N) = cos t (N00 + N11) + sin t (N01 - N10) is largest at t = atan2(N01 - N10, N00 + N11)
    (what the SVD solution gives, without thousands of tiny LAPACK calls)."""
    n = a @ ref.transpose(-1, -2)
    t = torch.atan2(n[..., 0, 1] - n[..., 1, 0], n[..., 0, 0] + n[..., 1, 1])
    c, s = torch.cos(t), torch.sin(t)
    return torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)


def procrustes(a: torch.Tensor, ref: torch.Tensor, proper: bool) -> torch.Tensor:
    """Orthogonal R [..., k, k] minimising ||R a - ref||_F (a, ref: [..., k, n], batched);
    `proper`: det R = +1 (a rotation)."""
    if proper and a.shape[-2] == 2:
        return rotation_2x2(a, ref)
    u, _, vh = torch.linalg.svd(ref @ a.transpose(-1, -2))
    if proper:
        sign = torch.linalg.det(u @ vh).sign()
        u = torch.cat([u[..., :-1], u[..., -1:] * sign[..., None, None]], dim=-1)
    return u @ vh


def _generalised_procrustes(xb: torch.Tensor, proper: bool, iters: int) -> torch.Tensor:
    """xb: [m, B, k, n] (m heads, B independent blocks) -> R [m, B, k, k] with R_j x_j close to their mean."""
    ref = xb[0]
    rs = None
    for _ in range(iters):
        rs = procrustes(xb, ref, proper)
        ref = (rs @ xb).mean(0)
    return rs


def align_group(x: torch.Tensor, rot: int, iters: int = 4) -> torch.Tensor:
    """Per-head orthogonal maps R [m, d, d] (block diagonal) with R_j x_j close to their mean, x: [m, d, n].

    The first `rot` dims are RoPE pairs (f, f + rot/2): one 2x2 rotation each (commutes with RoPE); the
    remaining dims form one block with a free orthogonal map."""
    m, d, _ = x.shape
    maps = torch.eye(d, dtype=x.dtype).repeat(m, 1, 1)
    half = rot // 2
    if half:
        pairs = torch.stack([torch.arange(half), torch.arange(half) + half], dim=1)  # [F, 2]
        maps[:, pairs[:, :, None], pairs[:, None, :]] = _generalised_procrustes(x[:, pairs], True, iters)
    if rot < d:
        rest = torch.arange(rot, d)
        maps[:, rest[:, None], rest[None, :]] = _generalised_procrustes(x[:, rest][:, None], False, iters)[:, 0]
    return maps


def merge_layer(w: LayerAttention, view: AttentionView, groups: int, grouping: str = "similarity",
                align: bool = True) -> tuple[LayerAttention, dict[str, Any]]:
    """One layer's projections (fp32) -> the merged ones: k/v [groups*d, hidden], q/o rotated where aligned.

    Figures: `kv_order` (heads in group order), mean merge errors of keys and values before/after alignment.
    """
    heads, kv, d = view.num_heads, view.num_kv_heads, view.head_dim
    r, m = heads // kv, kv // groups
    if groups == kv:
        return w, {"kv_order": list(range(kv))}
    ka = augment_rows(w.k, w.k_bias, view.k_bias).reshape(kv, d, -1)
    va = augment_rows(w.v, w.v_bias, view.v_bias).reshape(kv, d, -1)
    order = list(range(kv))
    if grouping == "similarity" and groups > 1:
        order = [j for g in similarity_groups(head_similarity(ka, va), groups) for j in g]
        w = permute_heads(w, order, heads, d)
        ka, va = ka[order], va[order]
    qa = augment_rows(w.q, w.q_bias, True).reshape(heads, d, -1)  # [H, d, n+1]
    o = w.o.double().reshape(-1, heads, d)  # [hidden, H, d]
    rot = view.rope.rotary_dim if view.rope is not None else 0
    k_rows, v_rows, figs = [], [], {"key_error": [], "key_error_aligned": [], "value_error": [],
                                    "value_error_aligned": []}
    for g in range(groups):
        js = list(range(g * m, (g + 1) * m))
        kx, vx = ka[js], va[js]
        e_k, e_v = merge_error(kx), merge_error(vx)
        figs["key_error"].append(e_k)
        figs["value_error"].append(e_v)
        if align and not view.qk_norm:  # a per-head norm does not commute with a rotation of its input
            rk = align_group(kx, rot)
            kx2 = rk @ kx
            e2 = merge_error(kx2)
            if e2 < e_k:
                kx, e_k = kx2, e2
                for i, j in enumerate(js):
                    hs = slice(j * r, (j + 1) * r)
                    qa[hs] = rk[i] @ qa[hs]
        if align:
            rv = align_group(vx, 0)
            vx2 = rv @ vx
            e2 = merge_error(vx2)
            if e2 < e_v:
                vx, e_v = vx2, e2
                for i, j in enumerate(js):
                    hs = slice(j * r, (j + 1) * r)
                    o[:, hs] = o[:, hs] @ rv[i].T
        figs["key_error_aligned"].append(e_k)
        figs["value_error_aligned"].append(e_v)
        k_rows.append(kx.mean(0))
        v_rows.append(vx.mean(0))
    q, q_bias = split_rows(qa.reshape(heads * d, -1), True, view.q_bias)
    k, k_bias = split_rows(torch.cat(k_rows), view.k_bias, view.k_bias)
    v, v_bias = split_rows(torch.cat(v_rows), view.v_bias, view.v_bias)
    out = LayerAttention(q, k, v, o.reshape(o.shape[0], -1).float(), q_bias, k_bias, v_bias, w.o_bias)
    return out, {"kv_order": order, **{k: sum(x) / groups for k, x in figs.items()}}


class LayerMerger:
    """`convert(name, tensor)` for `write_converted`: merges a layer when its first attention tensor is asked
    for (reading that layer's q/k/v/o through `get(name)`) and hands out its tensors, in the source's dtype;
    at most one layer's results are held (a layer's tensors are adjacent in checkpoints)."""

    def __init__(self, get: Callable[[str], torch.Tensor], view: AttentionView, groups: int,
                 grouping: str = "similarity", align: bool = True):
        self.get, self.view, self.groups, self.grouping, self.align = get, view, groups, grouping, align
        # the plain consecutive mean changes only K/V rows: each is pooled as it streams past, q/o are copied
        self.plain = not align and (grouping == "consecutive" or groups == 1)
        self.kv_roles = kv_roles(view)
        self.roles = {name: layer for layer in range(view.num_layers) for name in tensor_names(view, layer).values()}
        if self.plain:
            self.roles = {name: layer for name, (layer, _) in self.kv_roles.items()}
        self.pending: dict[int, dict[str, torch.Tensor]] = {}
        self.layers: dict[int, dict[str, Any]] = {}

    @property
    def exact(self) -> bool:
        """True when the merge is the plain consecutive mean (only K/V tensors change)."""
        return self.groups == self.view.num_kv_heads

    def changes(self, name: str) -> bool:
        return name in self.roles and not self.exact

    def _layer(self, layer: int) -> dict[str, torch.Tensor]:
        if layer not in self.pending:
            w = read_layer(self.get, self.view, layer)
            new, figs = merge_layer(w, self.view, self.groups, self.grouping, self.align)
            self.pending[layer] = layer_tensors(self.view, layer, new)
            self.layers[layer] = figs
        return self.pending[layer]

    def _pool(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """The plain mean of one K/V-holding tensor; merge errors of its weight rows recorded per layer."""
        layer, role = self.kv_roles[name]
        view, m = self.view, self.view.num_kv_heads // self.groups
        if role == "qkv":
            _, k, v = split_fused(t, view.num_heads, view.num_kv_heads, view.head_dim)
            sides = {"key": k, "value": v}
        else:
            sides = {"k": {"key": t}, "v": {"value": t}}.get(role, {})  # biases: no merge error of their own
        figs = self.layers.setdefault(layer, {"kv_order": list(range(view.num_kv_heads))})
        for side, x in sides.items():
            x = x.reshape(self.groups, m, view.head_dim, -1)
            figs[f"{side}_error"] = figs[f"{side}_error_aligned"] = \
                sum(merge_error(x[g]) for g in range(self.groups)) / self.groups
        return mean_pool_tensor(view, role, t, self.groups)

    def __call__(self, name: str, t: torch.Tensor) -> torch.Tensor:
        if not self.changes(name):
            return t
        if self.plain:
            return self._pool(name, t)
        layer = self.roles[name]
        tensors = self._layer(layer)
        out = tensors.pop(name).to(t.dtype).contiguous()
        if not tensors:
            del self.pending[layer]
        return out

    def metrics(self) -> dict[str, Any]:
        """Per layer figures and their means (merge errors before / after alignment)."""
        layers = [self.layers[i] for i in sorted(self.layers)]
        keys = ("key_error", "key_error_aligned", "value_error", "value_error_aligned")
        summary = {k: sum(f[k] for f in layers) / len(layers) for k in keys if layers and k in layers[0]}
        return {"grouping": self.grouping, "align": self.align, **summary, "layers": layers}

    def replacements(self) -> dict[str, torch.Tensor]:
        """Every changed tensor (fp32), for callers that build a model in memory (healing)."""
        out: dict[str, torch.Tensor] = {}
        for name in self.roles:
            if self.changes(name):
                out[name] = self(name, self.get(name).float())
        return out
