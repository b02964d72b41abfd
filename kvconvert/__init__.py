"""kvconvert: make an LLM's KV cache small (MHA->GQA, latent KV, sparse attention) and ship it."""

from ._version import __version__
from .errors import PassFailed, UserError
from .runtime.latent.autoregister import install as _register_latent_model_type


def load_latent(path, dtype=None, device_map=None):
    """Load a `kvconvert fit-latent` output folder as a transformers causal LM (cache stores latents)."""
    from .runtime.latent import load_latent as _load

    return _load(path, dtype=dtype, device_map=device_map)


def __getattr__(name):
    if name == "sparse":
        from .runtime.sparse.attention import sparse

        return sparse
    raise AttributeError(f"module 'kvconvert' has no attribute {name!r}")


_register_latent_model_type()

__all__ = ["PassFailed", "UserError", "__version__", "load_latent", "sparse"]
