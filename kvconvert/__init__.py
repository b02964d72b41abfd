"""kvconvert: make an LLM's KV cache small (MHA->GQA, latent KV, sparse attention) and ship it."""

from ._version import __version__
from .errors import PassFailed, UserError

__all__ = ["PassFailed", "UserError", "__version__", "sparse"]


def __getattr__(name):
    if name == "sparse":
        from .runtime.sparse.attention import sparse

        return sparse
    raise AttributeError(f"module 'kvconvert' has no attribute {name!r}")
