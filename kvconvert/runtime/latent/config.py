"""`KVLatentConfig`: the base architecture's config, flattened, plus the latent layout.

config.json of a latent folder = the base model's config.json with
`model_type: "kvconvert_latent"`, `base_model_type: "<llama|qwen2|...>"` and
`kvconvert_latent: {"kv_widths": [[k, v], ...], "joint_kv": bool, ...}`.
Every base attribute is set on this config, so the base decoder classes build from it unchanged.
"""

from __future__ import annotations

from typing import Any

from transformers import AutoConfig, PretrainedConfig

from . import MODEL_TYPE
_NOT_COPIED = {"model_type", "architectures", "transformers_version", "base_model_type", "kvconvert_latent"}


class KVLatentConfig(PretrainedConfig):
    model_type = MODEL_TYPE

    def __post_init__(self, **kwargs: Any) -> None:
        base_type = kwargs.pop("base_model_type", None) or "llama"
        latent = kwargs.pop("kvconvert_latent", None) or {}
        for key in ("model_type", "transformers_version"):
            kwargs.pop(key, None)
        own = {k: v for k, v in self.__dict__.items() if not k.startswith("_") and k not in _NOT_COPIED}
        base = AutoConfig.for_model(base_type, **{**own, **kwargs})
        super().__post_init__(**kwargs)
        for key, value in base.to_dict().items():
            if key not in _NOT_COPIED:
                setattr(self, key, value)
        self.base_model_type = base_type
        self.kvconvert_latent = dict(latent)

    def base_config(self) -> PretrainedConfig:
        """The equivalent config of the base architecture (a fresh object)."""
        data = {k: v for k, v in self.to_dict().items() if k not in _NOT_COPIED}
        return AutoConfig.for_model(self.base_model_type, **data)

    def layer_widths(self, full_width: int) -> list[tuple[int, int]]:
        """Per layer (k_width, v_width) of the cached latents; full width when the config names none."""
        widths = self.kvconvert_latent.get("kv_widths")
        if widths:
            return [(int(k), int(v)) for k, v in widths]
        return [(full_width, 0 if self.joint_kv else full_width)] * self.num_hidden_layers

    @property
    def joint_kv(self) -> bool:
        return bool(self.kvconvert_latent.get("joint_kv", False))
