"""`dense`: every query attends to every earlier token (the model's own attention), both phases."""

from __future__ import annotations

from typing import Literal

from .registry import Policy, register_policy


def causal_pairs(sq: int, sk: int) -> float:
    """(query, key) pairs of causal attention of the last `sq` of `sk` positions."""
    return sq * (sk - sq) + sq * (sq + 1) / 2


def dense_decode(q1, k, v, scale: float):
    """SDPA of q1 [B, H, D] over k/v [B, Hkv, L, D] -> [B, H, D]."""
    import torch

    return torch.nn.functional.scaled_dot_product_attention(q1[:, :, None], k, v, scale=scale,
                                                            enable_gqa=True)[:, :, 0]


def dense_prefill(q, k, v, scale: float):
    """Causal SDPA of q [B, H, S, D] (the last S of L positions) over k/v [B, Hkv, L, D] -> [B, H, S, D]."""
    import torch

    sq, sk = q.shape[2], k.shape[2]
    mask = None
    if sk != sq:
        rows = sk - sq + torch.arange(sq, device=q.device)
        mask = torch.arange(sk, device=q.device)[None, :] <= rows[:, None]
    return torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale, enable_gqa=True)


@register_policy
class DensePolicy(Policy):
    """Every token attends to every earlier token (the model's own attention)."""

    onnx_lowering = "dense"
    kind: Literal["dense"] = "dense"

    def decode(self, q1, k, v, seq_lens, scale, pages, use_kernels):
        return dense_decode(q1, k, v, scale)

    def prefill(self, q, k, v, scale, use_kernels):
        pairs = causal_pairs(q.shape[2], k.shape[2])
        return dense_prefill(q, k, v, scale), pairs, pairs
