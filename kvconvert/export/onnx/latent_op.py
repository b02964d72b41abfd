"""The `kvconvert::KVLatentAttention` op: attention whose cache holds pre-RoPE K/V latents (fit-latent models).

One node per layer. Inputs with separate K and V latents (attribute `joint_kv` = 0):
  query [B, H, S, D] (q projection + q_norm, before RoPE), key_latent [B, 1, S, Rk], value_latent [B, 1, S, Rv],
  past_key_latent [B, 1, T, Rk], past_value_latent [B, 1, T, Rv] (fixed-capacity buffers), cache_length int64 [B],
  k_up [Rk, KV*D], k_bias [KV*D], v_up [Rv, KV*Dv], v_bias [KV*Dv], k_norm_weight [D], rope_cos [T, R],
  rope_sin [T, R].
Outputs: output [B, S, H, Dv], present_key_latent [B, 1, T, Rk], present_value_latent [B, 1, T, Rv].
With one joint latent (`joint_kv` = 1) `kv_latent` [B, 1, S, R] / `past_kv_latent` [B, 1, T, R] replace the two
latent inputs (v_up is then [R, KV*Dv]) and `present_kv_latent` the two present outputs.

The new latents are written at slots cache_length[b] + s. Then, for every slot j of the buffer,
  K_j = RoPE_j(k_norm(c_k[j] @ k_up + k_bias)) [B, KV, T, D],   V_j = c_v[j] @ v_up + v_bias [B, KV, T, Dv],
the query of slot cache_length + s is rotated with the same table row (positions are slot indices, exactly as
in `kvconvert.runtime.latent`), and KVAttention's attention runs (`attention_op.attend`: mask, sliding window,
soft-capping, every sparse policy). k_norm: `x / sqrt(mean(x^2) + k_norm_eps) * k_norm_weight` in fp32 over D
(`k_norm_eps` = 0: none). RoPE: rotate-half on the first R = rope_cos.shape[-1] dims of each head.
"""

from __future__ import annotations

from typing import Any

import torch

from .attention_op import DOMAIN, attend, node_attributes, onnx_attrs, write_cache

LATENT_OP_TYPE = "KVLatentAttention"
WEIGHTS = ["k_up", "k_bias", "v_up", "v_bias", "k_norm_weight", "rope_cos", "rope_sin"]


def latent_io(joint: bool) -> tuple[list[str], list[str]]:
    """(input names, output names) of the op in its separate or joint form."""
    if joint:
        return ["query", "kv_latent", "past_kv_latent", "cache_length", *WEIGHTS], ["output", "present_kv_latent"]
    return (["query", "key_latent", "value_latent", "past_key_latent", "past_value_latent", "cache_length", *WEIGHTS],
            ["output", "present_key_latent", "present_value_latent"])


def latent_node_attributes(*, joint_kv: bool, k_norm_eps: float = 0.0, **kw: Any) -> dict[str, Any]:
    """KVAttention's attributes (`attention_op.node_attributes`) plus `joint_kv` and `k_norm_eps`."""
    return {**node_attributes(**kw), "joint_kv": int(joint_kv), "k_norm_eps": float(k_norm_eps)}


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE of the first R = cos.shape[-1] dims of x [..., N, D]; cos/sin broadcast to [..., N, R]."""
    r = cos.shape[-1]
    x_rot, x_pass = x[..., :r], x[..., r:]
    half = torch.cat([-x_rot[..., r // 2:], x_rot[..., : r // 2]], dim=-1)
    return torch.cat([x_rot * cos + half * sin, x_pass], dim=-1)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def expand(latent: torch.Tensor, up: torch.Tensor, bias: torch.Tensor, kv: int) -> torch.Tensor:
    """latent [B, 1, T, R] @ up [R, KV*D] + bias -> [B, KV, T, D]."""
    b, _, t, _ = latent.shape
    return (latent[:, 0] @ up + bias).reshape(b, t, kv, -1).transpose(1, 2)


def kv_latent_attention_reference(*inputs: torch.Tensor, attrs: dict[str, Any]) -> tuple[torch.Tensor, ...]:
    """Eager PyTorch semantics of KVLatentAttention; `inputs` in the op's order (`latent_io`), see module doc.
    Returns (output, present latent buffer(s))."""
    joint = bool(attrs["joint_kv"])
    x = dict(zip(latent_io(joint)[0], inputs))
    cache_length = x["cache_length"]
    if joint:
        presents = (write_cache(x["past_kv_latent"], x["kv_latent"], cache_length),)
        c_k = c_v = presents[0]
    else:
        presents = (write_cache(x["past_key_latent"], x["key_latent"], cache_length),
                    write_cache(x["past_value_latent"], x["value_latent"], cache_length))
        c_k, c_v = presents
    kv = attrs["num_kv_heads"]
    keys = expand(c_k, x["k_up"], x["k_bias"], kv)
    if attrs["k_norm_eps"] > 0:
        keys = rms_norm(keys, x["k_norm_weight"], attrs["k_norm_eps"])
    cos, sin = x["rope_cos"], x["rope_sin"]
    keys = rotate(keys, cos, sin)
    values = expand(c_v, x["v_up"], x["v_bias"], kv)
    query = x["query"]
    pos = cache_length[:, None] + torch.arange(query.shape[2], device=query.device)[None, :]
    query = rotate(query, cos[pos][:, None], sin[pos][:, None])
    return (attend(query, keys, values, cache_length, attrs), *presents)


class KVLatentAttentionFunction(torch.autograd.Function):
    """Runs the eager reference; the TorchScript ONNX exporter turns it into one kvconvert::KVLatentAttention node."""

    @staticmethod
    def forward(ctx, attrs_items, *inputs):
        return kv_latent_attention_reference(*inputs, attrs=dict(attrs_items))

    @staticmethod
    def symbolic(g, attrs_items, *inputs):
        attrs = dict(attrs_items)
        joint = bool(attrs["joint_kv"])
        outs = g.op(f"{DOMAIN}::{LATENT_OP_TYPE}", *inputs, outputs=2 if joint else 3, **onnx_attrs(attrs_items))
        outs[0].setType(inputs[0].type().with_sizes([None, None, attrs["num_heads"], None]))
        for present, past in zip(outs[1:], inputs[2:3] if joint else inputs[3:5]):
            present.setType(past.type())
        return outs


def kv_latent_attention(*inputs: torch.Tensor, attrs: dict[str, Any]) -> tuple[torch.Tensor, ...]:
    return KVLatentAttentionFunction.apply(tuple(sorted(attrs.items())), *inputs)
