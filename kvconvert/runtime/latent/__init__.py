"""Latent-KV runtime: models whose cache stores low-rank K/V latents (see docs/architecture.md).

Kept import-light (transformers is imported on first use), because `import kvconvert` reaches here.
"""

from __future__ import annotations

import importlib

MODEL_TYPE = "kvconvert_latent"
_LAZY = {
    "KVLatentConfig": ".config",
    "KVLatentForCausalLM": ".modeling",
    "install_latent_attention": ".modeling",
    "latent_class_for": ".modeling",
    "LatentAttention": ".attention",
    "cache_bytes": ".cache",
}
_REGISTERED = False


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def register() -> None:
    """Make AutoConfig / AutoModelForCausalLM know `kvconvert_latent` (idempotent)."""
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers import AutoConfig, AutoModelForCausalLM

    from .config import KVLatentConfig
    from .modeling import KVLatentForCausalLM

    AutoConfig.register(MODEL_TYPE, KVLatentConfig, exist_ok=True)
    AutoModelForCausalLM.register(KVLatentConfig, KVLatentForCausalLM, exist_ok=True)
    _REGISTERED = True


def load_latent(path, dtype=None, device_map=None):
    """Load a `kvconvert fit-latent` folder (fp32 unless `dtype`), ready for `generate()`."""
    import torch
    from transformers import AutoModelForCausalLM

    register()
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32, device_map=device_map).eval()


__all__ = ["KVLatentConfig", "KVLatentForCausalLM", "LatentAttention", "MODEL_TYPE", "cache_bytes",
           "install_latent_attention", "latent_class_for", "load_latent", "register"]
