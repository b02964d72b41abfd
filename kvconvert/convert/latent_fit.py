"""The math of fit-latent: metric-weighted PCA of K/V outputs, factors, and their dense equivalent.

Per layer, with G = sum_t x_t x_t^T over N calibration tokens (x: attention input, [hidden]) and a
projection W ([kv_width, hidden]), the outputs Y = X W^T have covariance C = W G W^T / N. For a metric
M = L L^T on the output space (how much an error in each output direction matters), the best rank-r
latent is the top-r eigenvectors U_r of L^T C L:
    down A = U_r^T L^T W   [r, hidden]   (latent c = A x, what the cache stores)
    up   B = L^-T U_r      [kv_width, r] (K or V = B c + bias; biases stay outside the factorisation)
This is the activation-aware (whitened) SVD in its output-PCA form: no inverse or Cholesky of G, so a
singular G is harmless; at r = kv_width, B A = W exactly. The residual error at rank r is the sum of the
trailing eigenvalues, which the rank allocation uses.

Metrics (`metric="attention"`): keys are weighted by what the queries of their group see — the diagonal
query second moments averaged over each RoPE frequency pair (what survives averaging over relative
rotations), times scaling^2, so a key error is measured as attention-logit error; values by the o_proj
blocks of their query group (sum_h O_h^T O_h), so a value error is measured as attention-output error.
`metric="none"` is plain whitened SVD (identity metric).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..models import AttentionView


@dataclass
class AttentionWeights:
    """One layer's attention parameters in a normalized form (fp64 copies)."""

    q: torch.Tensor                 # [heads*head_dim, hidden]
    k: torch.Tensor                 # [kv_width, hidden]
    v: torch.Tensor                 # [kv_width, hidden]
    o: torch.Tensor                 # [hidden, heads*head_dim]
    q_bias: torch.Tensor | None
    k_bias: torch.Tensor | None
    v_bias: torch.Tensor | None
    q_norm: torch.Tensor | None     # [head_dim] (QK-norm models)
    k_norm: torch.Tensor | None


def attention_weights(model, view: AttentionView, layer: int) -> AttentionWeights:
    return attention_weights_from(dict(model.named_parameters()).get, view, layer)


def attention_weights_from(lookup, view: AttentionView, layer: int) -> AttentionWeights:
    """One layer's attention weights from `lookup(checkpoint name) -> Tensor | None` (a state dict's `get`, or a
    checkpoint reader's)."""
    pre = view.layer_prefix(layer)
    n = view.names

    def get(name):
        t = lookup(f"{pre}.{name}") if name else None
        return None if t is None else t.detach().double()

    if view.fused_qkv:
        qkv = get(f"{n.qkv}.weight")
        hq, kv = view.q_width, view.kv_width
        q, k, v = qkv[:hq], qkv[hq:hq + kv], qkv[hq + kv:]
        qb = kb = vb = None
        bias = get(f"{n.qkv}.bias")
        if bias is not None:
            qb, kb, vb = bias[:hq], bias[hq:hq + kv], bias[hq + kv:]
    else:
        q, k, v = get(f"{n.q}.weight"), get(f"{n.k}.weight"), get(f"{n.v}.weight")
        qb, kb, vb = get(f"{n.q}.bias"), get(f"{n.k}.bias"), get(f"{n.v}.bias")
    return AttentionWeights(q, k, v, get(f"{n.o}.weight"), qb, kb, vb,
                            get(f"{n.q_norm}.weight") if n.q_norm else None,
                            get(f"{n.k_norm}.weight") if n.k_norm else None)


@dataclass
class Spectrum:
    """Weighted PCA of one output (K, V, or joint KV) of one layer."""

    eigvals: torch.Tensor   # [width] descending, per calibration token
    eigvecs: torch.Tensor   # [width, width] columns
    lift: torch.Tensor      # L^T W  [width, hidden]   (down = U_r^T lift)
    unlift: torch.Tensor    # L^-T   [width, width]    (up = unlift U_r)

    def factors(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(down [rank, hidden], up [width, rank]); each latent component scaled so that its down row and up
        column have equal norms (same product, well-conditioned for low-precision storage and healing)."""
        u = self.eigvecs[:, :rank]
        down, up = u.T @ self.lift, self.unlift @ u
        scale = (up.norm(dim=0).clamp_min(1e-30) / down.norm(dim=1).clamp_min(1e-30)).sqrt()
        return down * scale[:, None], up / scale[None, :]

    def residual(self, rank: int) -> float:
        return float(self.eigvals[rank:].clamp_min(0).sum())


def _weighted_pca(w: torch.Tensor, gram: torch.Tensor, n: int, lmat: torch.Tensor,
                  lmat_inv_t: torch.Tensor) -> Spectrum:
    lift = lmat.T @ w
    cov = lift @ gram @ lift.T / max(n, 1)
    cov = (cov + cov.T) / 2
    vals, vecs = torch.linalg.eigh(cov)
    order = torch.argsort(vals, descending=True)
    return Spectrum(vals[order], vecs[:, order], lift, lmat_inv_t)


def _sqrt_metric(m: torch.Tensor, damping: float) -> tuple[torch.Tensor, torch.Tensor]:
    """For a PSD metric M: (L, L^-T) with M + damping*mean(diag M)*I = L L^T."""
    vals, vecs = torch.linalg.eigh((m + m.T) / 2)
    vals = vals.clamp_min(0) + damping * float(torch.diagonal(m).mean().clamp_min(1e-30))
    return vecs * vals.sqrt(), vecs * vals.rsqrt()


def key_metric(w: AttentionWeights, view: AttentionView, gram: torch.Tensor, n: int, scaling: float,
               inv_freq: torch.Tensor | None = None, context: int = 512) -> torch.Tensor:
    """Block-diagonal metric [kv_width, kv_width] on pre-RoPE keys, in attention-logit units.

    A key error e changes the logit of query q at relative distance D by scaling * q^T R(D)^T e, so the metric
    of kv head g is scaling^2 * E_D[R(D) C_g R(D)^T], with C_g the summed second moments of its query heads
    and D weighted like the (query, key) pairs of a causal window of `context` tokens (weight context - D).
    High-frequency RoPE pairs average to isotropic 2x2 blocks; low-frequency ones keep their correlations.
    """
    d, g, kvh = view.head_dim, view.group_size, view.num_kv_heads
    q = w.q.view(view.num_heads, d, -1)
    cov = torch.einsum("hik,kl,hjl->hij", q, gram, q) / max(n, 1)
    if w.q_bias is not None:
        b = w.q_bias.view(view.num_heads, d)
        cov = cov + b[:, :, None] * b[:, None, :]
    if w.q_norm is not None:
        scale = w.q_norm / torch.diagonal(cov, dim1=1, dim2=2).mean(dim=1, keepdim=True).clamp_min(1e-30).sqrt()
        cov = cov * scale[:, :, None] * scale[:, None, :]
    cov = cov.view(kvh, g, d, d).sum(dim=1)
    rd = view.rope.rotary_dim if view.rope else 0
    if rd:
        half = rd // 2
        freq = (inv_freq.double() if inv_freq is not None else
                view.rope.theta ** (-torch.arange(half, dtype=torch.float64) * 2 / rd))
        dist = torch.linspace(0, context - 1, 128, dtype=torch.float64)
        weight = (context - dist) / (context - dist).sum()
        ang = dist[:, None] * freq[None, :]
        c, s = torch.cos(ang), torch.sin(ang)
        rot = torch.eye(d, dtype=torch.float64).repeat(len(dist), 1, 1)
        idx = torch.arange(half)
        rot[:, idx, idx] = c
        rot[:, idx + half, idx + half] = c
        rot[:, idx, idx + half] = -s
        rot[:, idx + half, idx] = s
        cov = torch.einsum("t,tab,hbc,tdc->had", weight, rot, cov, rot)
    metric = cov * scaling ** 2
    if w.k_norm is not None:
        k_moment = (torch.einsum("ij,jk,ik->i", w.k, gram, w.k) / max(n, 1)).view(kvh, d)
        scale = w.k_norm / k_moment.mean(dim=1, keepdim=True).clamp_min(1e-30).sqrt()
        metric = metric * scale[:, :, None] * scale[:, None, :]
    return torch.block_diag(*metric)


def value_metric(w: AttentionWeights, view: AttentionView) -> torch.Tensor:
    """Block-diagonal metric [kv_width, kv_width]: sum over each group's query heads of O_h^T O_h."""
    d, g, kvh = view.head_dim, view.group_size, view.num_kv_heads
    o = w.o.view(w.o.shape[0], view.num_heads, d)
    blocks = torch.einsum("ahi,ahj->hij", o, o).view(kvh, g, d, d).sum(dim=1)
    return torch.block_diag(*blocks)


def layer_spectra(w: AttentionWeights, view: AttentionView, gram: torch.Tensor, n: int, metric: str,
                  scaling: float, damping: float = 1e-4, joint_weights: tuple[float, float] | None = None,
                  inv_freq: torch.Tensor | None = None, context: int = 512, fisher: torch.Tensor | None = None
                  ) -> dict[str, Spectrum]:
    """Spectra for 'k' and 'v' (separate) and, when `joint_weights` = (w_k, w_v) is given, for 'kv'.

    `metric="fisher"` uses `fisher` ([2*kv_width]^2, see latent_fisher) and ignores `joint_weights`."""
    kvw = view.kv_width
    eye = torch.eye(kvw, dtype=torch.float64)
    if metric == "fisher":
        lk, lk_it = _sqrt_metric(fisher[:kvw, :kvw], damping)
        lv, lv_it = _sqrt_metric(fisher[kvw:, kvw:], damping)
        out = {"k": _weighted_pca(w.k, gram, n, lk, lk_it), "v": _weighted_pca(w.v, gram, n, lv, lv_it)}
        if joint_weights is not None:
            lj, lj_it = _sqrt_metric(fisher, damping)
            out["kv"] = _weighted_pca(torch.cat([w.k, w.v]), gram, n, lj, lj_it)
        return out
    if metric == "none":
        lk = lk_it = lv = lv_it = eye
    else:
        lk, lk_it = _sqrt_metric(key_metric(w, view, gram, n, scaling, inv_freq, context), damping)
        lv, lv_it = _sqrt_metric(value_metric(w, view), damping)
    out = {"k": _weighted_pca(w.k, gram, n, lk, lk_it), "v": _weighted_pca(w.v, gram, n, lv, lv_it)}
    if joint_weights is not None:
        ak, av = (float(x) ** 0.5 for x in joint_weights)
        lj = torch.block_diag(lk * ak, lv * av)
        lj_it = torch.block_diag(lk_it / ak, lv_it / av)
        out["kv"] = _weighted_pca(torch.cat([w.k, w.v]), gram, n, lj, lj_it)
    return out


def allocate(spectra: list[dict[str, float | torch.Tensor]], budget: int, caps: list[int],
             min_rank: int = 1) -> list[int]:
    """Ranks for several eigen-spectra sharing one budget: keep the largest `gain` eigenvalues overall.

    `spectra[i]`: {"gain": Tensor[width] descending (KL-scaled eigenvalues), ...}; `caps[i]`: max rank.
    Each gets at least `min_rank`; the sum of ranks is min(budget, sum caps).
    """
    ranks = [min(min_rank, c) for c in caps]
    left = budget - sum(ranks)
    cand = []
    for i, s in enumerate(spectra):
        g = s["gain"]
        for j in range(ranks[i], caps[i]):
            cand.append((float(g[j]) if j < len(g) else 0.0, i, j))
    cand.sort(key=lambda c: -c[0])
    for _, i, _ in cand[:max(left, 0)]:
        ranks[i] += 1
    return ranks


def dense_weights(down: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """The K or V projection the factors amount to: up @ down, [kv_width, hidden]."""
    return up @ down


@torch.no_grad()
def set_dense_kv(model, view: AttentionView, layer: int, k: torch.Tensor | None, v: torch.Tensor | None) -> None:
    """Overwrite layer `layer`'s K and/or V projection weights in a stock model (biases untouched)."""
    params = dict(model.named_parameters())
    pre = view.layer_prefix(layer)
    if view.fused_qkv:
        qkv = params[f"{pre}.{view.names.qkv}.weight"]
        hq, kv = view.q_width, view.kv_width
        if k is not None:
            qkv[hq:hq + kv].copy_(k)
        if v is not None:
            qkv[hq + kv:].copy_(v)
        return
    if k is not None:
        params[f"{pre}.{view.names.k}.weight"].copy_(k)
    if v is not None:
        params[f"{pre}.{view.names.v}.weight"].copy_(v)
