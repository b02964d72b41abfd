"""A traceable decoder step: the stock transformers model with its attention routed to KVAttention.

Embeddings, norms, MLPs, projections, biases, qk-norm and RoPE stay the model's own modules (so every
registered architecture exports the same way); only the attention function is swapped, through
transformers' `AttentionInterface`, for one that reads/writes explicit fixed-capacity cache buffers.
Latent-KV models instead have each `LatentAttention` module's forward routed to KVLatentAttention
(`latent_wrapper.py`), since their K/V are rebuilt from the cached latents inside the op.
"""

from __future__ import annotations

import contextlib
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from ...errors import UserError
from ...models import AttentionView
from .attention_op import kv_attention, node_attributes
from .cache_layout import CacheLayout

ATTN_IMPLEMENTATION = "kvconvert_onnx"
_ACTIVE: list[DecoderStep] = []


def _attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, sliding_window=None,
               softcap=None, **kwargs):
    """transformers attention-function signature; returns (output [B, S, H, Dv], None)."""
    if not _ACTIVE:
        raise RuntimeError(f"the '{ATTN_IMPLEMENTATION}' attention only runs inside DecoderStep.forward")
    step = _ACTIVE[-1]
    layer = step.layer_of[id(module)]
    attrs = step.layer_attributes(layer, query, scaling, sliding_window, softcap)
    past_key, past_value = step.layer_past(layer)
    out, present_key, present_value = kv_attention(query, key, value, past_key, past_value, step._cache_length,
                                                   attrs)
    step._presents[layer] = (present_key, present_value)
    return out, None


def _register() -> None:
    from transformers import AttentionInterface

    if ATTN_IMPLEMENTATION not in AttentionInterface._global_mapping:
        AttentionInterface.register(ATTN_IMPLEMENTATION, _attention)


@contextmanager
def attention_implementation(model: nn.Module, name: str):
    """Temporarily set `config._attn_implementation` on every config the model's modules hold."""
    configs = {id(c): c for m in model.modules() if (c := getattr(m, "config", None)) is not None
               and hasattr(c, "_attn_implementation")}
    saved = {k: c._attn_implementation for k, c in configs.items()}
    try:
        for c in configs.values():
            c._attn_implementation = name
        yield
    finally:
        for k, c in configs.items():
            c._attn_implementation = saved[k]


class DecoderStep(nn.Module):
    """forward(input_ids [B,S], position_ids [B,S], cache_length [B], *past buffers of `layout`)
    -> (logits [B,S|1,V], *present buffers): past_key_0, past_value_0, ... or the latent buffers."""

    def __init__(self, model: nn.Module, view: AttentionView, layout: CacheLayout, *, logits: str = "all",
                 policy_attributes: list[dict[str, Any]] | None = None):
        super().__init__()
        _register()
        self.model = model
        self.view = view
        self.layout = layout
        self.logits_to_keep = 1 if logits == "last" else 0
        self.policy_attributes = policy_attributes or [{} for _ in range(view.num_layers)]
        self.layer_of: dict[int, int] = {}
        for i in range(view.num_layers):
            try:
                self.layer_of[id(model.get_submodule(view.layer_prefix(i)))] = i
            except AttributeError:
                raise UserError(f"{view.model_type}: attention module '{view.layer_prefix(i)}' not found; "
                                "is the architecture adapter's attn_prefix right?") from None
        self.attributes: list[dict[str, Any] | None] = [None] * view.num_layers
        self._past: tuple[torch.Tensor, ...] = ()
        self._cache_length: torch.Tensor | None = None
        self._presents: dict[int, tuple[torch.Tensor, ...]] = {}
        self.latent_attributes: list[dict[str, Any]] = []
        if layout.latent:
            from .latent_wrapper import latent_layer_attributes

            self.latent_attributes = latent_layer_attributes(model, view, layout.kind == "joint_latent")
        self.eval()

    def layer_past(self, layer: int) -> tuple[torch.Tensor, ...]:
        """The past buffers of `layer` passed to the current forward (in `layout` order)."""
        return tuple(t for t, b in zip(self._past, self.layout.buffers) if b.layer == layer)

    def layer_attributes(self, layer: int, query: torch.Tensor, scaling, sliding_window, softcap,
                         **extra: Any) -> dict[str, Any]:
        num_heads, head_dim = query.shape[1], query.shape[3]
        policy = self.policy_attributes[layer]
        if softcap or sliding_window:  # as kvconvert.sparse: such layers keep the model's own attention
            policy = {"kind": policy["kind"]} if policy else {}
        attrs = node_attributes(num_heads=num_heads, num_kv_heads=self.view.num_kv_heads,
                                head_dim=head_dim, scale=head_dim ** -0.5 if scaling is None else float(scaling),
                                softcap=softcap or 0.0, sliding_window=sliding_window or 0, layer=layer,
                                policy=policy) | extra
        self.attributes[layer] = attrs
        return attrs

    def forward(self, input_ids, position_ids, cache_length, *past):
        if len(past) != len(self.layout.buffers):
            raise ValueError(f"expected {len(self.layout.buffers)} cache buffers, got {len(past)}")
        self._past, self._cache_length, self._presents = past, cache_length, {}
        _ACTIVE.append(self)
        try:
            with attention_implementation(self.model, ATTN_IMPLEMENTATION), self._latent_routing():
                out = self.model(input_ids=input_ids, position_ids=position_ids, use_cache=False,
                                 logits_to_keep=self.logits_to_keep)
        finally:
            _ACTIVE.pop()
            self._past, self._cache_length = (), None
        presents = []
        for i in range(self.view.num_layers):
            presents.extend(self._presents[i])
        self._presents = {}
        return (out.logits, *presents)

    def _latent_routing(self):
        if not self.layout.latent:
            return contextlib.nullcontext()
        from .latent_wrapper import latent_attention_routed

        return latent_attention_routed(self)
