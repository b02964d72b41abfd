"""kvconvert: make an LLM's KV cache small (MHA->GQA, latent KV, sparse attention) and ship it."""

from ._version import __version__
from .errors import PassFailed, UserError

__all__ = ["PassFailed", "UserError", "__version__"]
