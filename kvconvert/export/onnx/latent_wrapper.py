"""Route every `LatentAttention` module of a latent-KV model to one KVLatentAttention node while tracing.

The module keeps its own q projection + q_norm and latent down projections; the op gets the new latents,
the layer's cache buffers, the up projections (transposed to [rank, kv_heads*head_dim]), the K/V biases
(zeros when the base has none), the k_norm weight (ones without QK-norm) and the model's RoPE table for
slots [0, max_context) (one initializer shared by all layers).
"""

from __future__ import annotations

import functools
from contextlib import contextmanager
from typing import Any

import torch

from ...errors import UserError
from ...models import AttentionView
from .latent_op import kv_latent_attention, rms_norm


def _k_norm_eps(module, view: AttentionView) -> float:
    """k_norm's epsilon (0.0 without QK-norm); UserError unless it is `x / rms(x) * weight`."""
    norm = module.k_norm
    if norm is None:
        return 0.0
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
    weight = getattr(norm, "weight", None)
    probe = torch.randn(3, module.head_dim, generator=torch.Generator().manual_seed(0)).to(module.o_proj.weight)
    with torch.no_grad():
        ok = eps is not None and weight is not None and torch.allclose(norm(probe), rms_norm(probe, weight, float(eps)),
                                                                       rtol=1e-3, atol=1e-5)
    if not ok:
        raise UserError(f"{view.model_type}: k_norm {type(norm).__name__} is not an RMSNorm x / rms(x) * weight; "
                        "the latent ONNX op cannot express it")
    return float(eps)


def latent_layer_attributes(model: torch.nn.Module, view: AttentionView, joint: bool) -> list[dict[str, Any]]:
    """Per layer the KVLatentAttention attributes beyond KVAttention's (`joint_kv`, `k_norm_eps`); checks
    that every attention module is a LatentAttention with rotate-half RoPE."""
    from ...runtime.latent.attention import LatentAttention

    if view.rope is None or view.rope.layout != "rotate_half":
        raise UserError(f"{view.model_type}: latent ONNX export needs rotate-half RoPE "
                        f"(this model has {view.rope.layout if view.rope else 'none'})")
    out = []
    for i in range(view.num_layers):
        module = model.get_submodule(view.layer_prefix(i))
        if not isinstance(module, LatentAttention) or module.joint != joint:
            raise UserError(f"layer {i} ('{view.layer_prefix(i)}') is not a {'joint ' if joint else ''}latent "
                            "attention module; load the folder with kvconvert.load_latent")
        out.append({"joint_kv": int(joint), "k_norm_eps": _k_norm_eps(module, view)})
    return out


def _forward(module, step, hidden_states, *args, **kwargs):
    """LatentAttention.forward replacement: (o_proj(KVLatentAttention(...)) [b, s, hidden], None)."""
    layer = step.layer_of[id(module)]
    b, s, _ = hidden_states.shape
    query = module.queries(hidden_states)
    c_k, c_v = module.latents(hidden_states)
    past = step.layer_past(layer)
    cos, sin = module._rope[0].upto(past[0].shape[2], query)
    attrs = step.layer_attributes(layer, query, module.scaling, module.sliding_window, module.softcap,
                                  **step.latent_attributes[layer])
    dtype = query.dtype
    kv_width = module.k_proj.out_features
    k_bias = module.k_proj.bias if module.k_proj.bias is not None else torch.zeros(kv_width, dtype=dtype)
    v_bias = module.v_proj.bias if module.v_proj.bias is not None else torch.zeros(kv_width, dtype=dtype)
    k_norm = module.k_norm.weight if module.k_norm is not None else torch.ones(module.head_dim, dtype=dtype)
    new = (c_k,) if module.joint else (c_k, c_v)
    outs = kv_latent_attention(query, *new, *past, step._cache_length, module.k_proj.weight.t(), k_bias,
                               module.v_proj.weight.t(), v_bias, k_norm, cos[0], sin[0], attrs=attrs)
    step._presents[layer] = outs[1:]
    return module.o_proj(outs[0].reshape(b, s, -1)), None


@contextmanager
def latent_attention_routed(step):
    """While active, each LatentAttention of `step.model` runs `_forward` (instance attribute, then removed)."""
    modules = [step.model.get_submodule(step.view.layer_prefix(i)) for i in range(step.view.num_layers)]
    try:
        for m in modules:
            m.forward = functools.partial(_forward, m, step)
        yield
    finally:
        for m in modules:
            m.__dict__.pop("forward", None)
