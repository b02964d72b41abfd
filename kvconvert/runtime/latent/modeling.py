"""Latent-KV causal LMs: the stock decoder of the base architecture with `LatentAttention` swapped in.

`KVLatentForCausalLM` is what AutoModelForCausalLM maps `kvconvert_latent` to; loading dispatches to a
subclass of the base architecture's own causal-LM class (built once per base type), so parameter names stay
the base ones (`model.layers.{i}.self_attn.*`) and generation, masks and caches are transformers' own.
"""

from __future__ import annotations

from transformers import AutoModelForCausalLM, PreTrainedModel

from ...models import describe
from .attention import LatentAttention, RopeTable
from .config import KVLatentConfig

_CLASSES: dict[str, type] = {}


def _attention_parent(model, view, layer: int):
    prefix = view.layer_prefix(layer)
    parent_name, _, attr = prefix.rpartition(".")
    return model.get_submodule(parent_name), attr


def install_latent_attention(model, config: KVLatentConfig) -> None:
    """Replace every attention module of `model` (built from `config`) by a `LatentAttention`."""
    view = describe(config.base_config())
    rope = RopeTable(model.get_submodule(_decoder_prefix(view) + "rotary_emb"))
    widths = config.layer_widths(view.kv_width)
    for layer in range(view.num_layers):
        parent, attr = _attention_parent(model, view, layer)
        stock = getattr(parent, attr)
        k_w, v_w = widths[layer]
        setattr(parent, attr, LatentAttention(stock, view, k_w, v_w, config.joint_kv, rope))


def _decoder_prefix(view) -> str:
    """'model.' for model.layers.{i}.self_attn: where the decoder (and its rotary_emb) lives."""
    return view.attn_prefix.split("layers.")[0]


class _LatentMixin:
    def __init__(self, config: KVLatentConfig, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        install_latent_attention(self, config)
        self.post_init()


def latent_class_for(base_model_type: str) -> type:
    """The latent causal-LM class for a base model_type (a subclass of its transformers class)."""
    if base_model_type not in _CLASSES:
        from transformers import AutoConfig

        base_cls = AutoModelForCausalLM._model_mapping[type(AutoConfig.for_model(base_model_type))]
        name = f"KVLatent{base_cls.__name__}"
        cls = type(name, (_LatentMixin, base_cls), {"config_class": KVLatentConfig, "__module__": __name__})
        globals()[name] = cls
        _CLASSES[base_model_type] = cls
    return _CLASSES[base_model_type]


class KVLatentForCausalLM(PreTrainedModel):
    """Registered for `kvconvert_latent`; never instantiated itself: it hands over to `latent_class_for`."""

    config_class = KVLatentConfig

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, config=None, **kwargs):
        if config is None:
            config = KVLatentConfig.from_pretrained(pretrained_model_name_or_path)
        return latent_class_for(config.base_model_type).from_pretrained(
            pretrained_model_name_or_path, *args, config=config, **kwargs)

    @classmethod
    def _from_config(cls, config, **kwargs):
        return latent_class_for(config.base_model_type)._from_config(config, **kwargs)
