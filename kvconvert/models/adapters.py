"""Built-in architecture adapters. See docs/architecture.md for how to add one."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from .registry import ArchitectureAdapter, get_adapter, register
from .view import AttentionView, ProjectionNames, RopeSpec


def _rope(config: Any, head_dim: int) -> RopeSpec | None:
    get = ArchitectureAdapter.get
    params = get(config, "rope_parameters") or {}
    if not isinstance(params, dict):
        params = dict(params)
    theta = params.get("rope_theta", get(config, "rope_theta", 10000.0))
    factor = params.get("partial_rotary_factor", get(config, "partial_rotary_factor", None)) or 1.0
    rotary_dim = int(head_dim * factor)
    scaling = {k: v for k, v in params.items() if k not in ("rope_theta", "partial_rotary_factor")}
    if scaling.get("rope_type", "default") == "default" and len(scaling) <= 1:
        scaling = None
    return RopeSpec(theta=float(theta), rotary_dim=rotary_dim, scaling=scaling)


class LlamaLike(ArchitectureAdapter):
    """Separate q/k/v/o projections under `model.layers.{layer}.self_attn`, rotate-half RoPE."""

    names = ProjectionNames()
    attn_prefix = "model.layers.{layer}.self_attn"
    qk_norm = False

    def biases(self, config: Any) -> tuple[bool, bool, bool, bool]:
        b = bool(self.get(config, "attention_bias", False))
        return b, b, b, b

    def view(self, config: Any) -> AttentionView:
        get = self.get
        heads = int(get(config, "num_attention_heads"))
        hidden = int(get(config, "hidden_size"))
        kv = get(config, "num_key_value_heads") or heads
        head_dim = get(config, "head_dim") or hidden // heads
        qb, kb, vb, ob = self.biases(config)
        return AttentionView(
            model_type=get(config, "model_type"),
            num_layers=int(get(config, "num_hidden_layers")),
            hidden_size=hidden,
            num_heads=heads,
            num_kv_heads=int(kv),
            head_dim=int(head_dim),
            rope=_rope(config, int(head_dim)),
            names=self.names,
            attn_prefix=self.attn_prefix,
            q_bias=qb,
            k_bias=kb,
            v_bias=vb,
            o_bias=ob,
            qk_norm=self.qk_norm,
            supports_gqa=self.supports_gqa,
            gqa_note=self.gqa_note,
            sliding_window=get(config, "sliding_window"),
            max_position_embeddings=get(config, "max_position_embeddings"),
        )


@register("llama")
class LlamaAdapter(LlamaLike):
    pass


@register("mistral")
class MistralAdapter(LlamaLike):
    pass


@register("qwen2")
class Qwen2Adapter(LlamaLike):
    def biases(self, config: Any) -> tuple[bool, bool, bool, bool]:
        return True, True, True, False


@register("qwen3")
class Qwen3Adapter(LlamaLike):
    names = ProjectionNames(q_norm="q_norm", k_norm="k_norm")
    qk_norm = True


@register("phi3")
class Phi3Adapter(LlamaLike):
    names = ProjectionNames(q=None, k=None, v=None, qkv="qkv_proj")

    def biases(self, config: Any) -> tuple[bool, bool, bool, bool]:
        return False, False, False, False


@register("gemma")
class GemmaAdapter(LlamaLike):
    pass


@register("gemma2")
class Gemma2Adapter(LlamaLike):
    pass


class MhaOnly(ArchitectureAdapter):
    """Architectures whose transformers class ignores `num_key_value_heads`.

    They are described (so `inspect` works) but no GQA checkpoint is written for them: stock
    transformers could not load it.
    """

    supports_gqa = False
    gqa_note = "its transformers class has no num_key_value_heads, so a GQA checkpoint would not load"
    names = ProjectionNames()
    attn_prefix = ""
    head_key = "num_attention_heads"
    layers_key = "num_hidden_layers"
    hidden_key = "hidden_size"
    rotary = False

    def view(self, config: Any) -> AttentionView:
        get = self.get
        heads = int(get(config, self.head_key))
        hidden = int(get(config, self.hidden_key))
        head_dim = hidden // heads
        return AttentionView(
            model_type=get(config, "model_type"),
            num_layers=int(get(config, self.layers_key)),
            hidden_size=hidden,
            num_heads=heads,
            num_kv_heads=heads,
            head_dim=head_dim,
            rope=_rope(config, head_dim) if self.rotary else None,
            names=self.names,
            attn_prefix=self.attn_prefix,
            q_bias=True,
            k_bias=True,
            v_bias=True,
            o_bias=True,
            supports_gqa=False,
            gqa_note=f"{get(config, 'model_type')}: {self.gqa_note}",
            max_position_embeddings=get(config, "max_position_embeddings"),
        )


@register("gpt2")
class Gpt2Adapter(MhaOnly):
    names = ProjectionNames(q=None, k=None, v=None, o="c_proj", qkv="c_attn")
    attn_prefix = "transformer.h.{layer}.attn"
    head_key, layers_key, hidden_key = "n_head", "n_layer", "n_embd"


@register("opt")
class OptAdapter(MhaOnly):
    names = ProjectionNames(o="out_proj")
    attn_prefix = "model.decoder.layers.{layer}.self_attn"


@register("gpt_neox")
class GptNeoXAdapter(MhaOnly):
    names = ProjectionNames(q=None, k=None, v=None, o="dense", qkv="query_key_value")
    attn_prefix = "gpt_neox.layers.{layer}.attention"
    rotary = True


@register("kvconvert_latent")
class LatentKVAdapter(ArchitectureAdapter):
    """`kvconvert fit-latent` output: the base architecture (`base_model_type`) with K/V from cached latents.

    Inside each attention block: `q_proj`, `k_latent`/`v_latent` (or `kv_latent`), `k_proj`/`v_proj` (latent
    -> K/V, with the base biases), `o_proj`, and `q_norm`/`k_norm` for QK-norm bases; `kv_widths` (set by
    `describe` from `kvconvert_latent.kv_widths`) are the latent widths the cache stores.
    """

    supports_gqa = False
    gqa_note = "latent checkpoints are not re-grouped; run mha-to-gqa before fit-latent"

    def view(self, config: Any) -> AttentionView:
        base_type = self.get(config, "base_model_type") or "llama"
        base = get_adapter(base_type).view(config)
        names = ProjectionNames(o=base.names.o, q_norm=base.names.q_norm, k_norm=base.names.k_norm)
        return replace(base, model_type="kvconvert_latent", names=names, supports_gqa=False,
                       gqa_note=f"kvconvert_latent: {self.gqa_note}", kv_widths=self.declared_kv_widths(config))
